//! The value forms config keys take: durations with a unit, sizes with an optional unit, and
//! HTTP tokens (subprotocol names).

use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A duration written with a unit: "250ms", "10s", "5m", "1h".
pub(super) struct Dur(pub(super) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d).map_err(|_| {
            de::Error::custom("a duration is a string with a unit, e.g. \"10s\", \"5m\", \"250ms\"")
        })?;
        parse_duration(&text).map(Dur).map_err(de::Error::custom)
    }
}

/// A size in bytes: an integer, or a string such as "64KiB", "16MiB", "1GB".
pub(super) struct Size(pub(super) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom("a size is a byte count or a string such as \"16MiB\"")
        })? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(t) => parse_size(&t).map(Size).map_err(de::Error::custom),
        }
    }
}

/// Splits "16MiB" into 16 and "MiB": a whole number, then its unit (trimmed).
fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    Some((num.parse().ok()?, unit.trim()))
}

/// Parses "250ms", "10s", "5m", "1h" (whole numbers).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(text).ok_or_else(|| {
        format!("invalid duration {text:?} (use e.g. \"10s\", \"5m\", \"250ms\")")
    })?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => {
            return Err(format!(
                "invalid duration {text:?}: unit must be ms, s, m or h"
            ))
        }
    };
    Ok(Duration::from_secs(secs))
}

/// Parses "512", "512B", "64KiB", "16MiB", "1GiB", "10KB", "1MB" (whole numbers).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (n, unit) = number_and_unit(text)
        .ok_or_else(|| format!("invalid size {text:?} (use e.g. 65536, \"64KiB\", \"16MiB\")"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "invalid size {text:?}: unit must be B, KiB, MiB, GiB, KB, MB or GB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Whether `s` is an HTTP token (RFC 9110 §5.6.2), as subprotocol names must be.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
