//! The PROXY protocol header (HAProxy's specification, versions 1 and 2) that a balancer puts
//! in front of a connection to say who the client is. Pure: [`parse`] never consumes
//! anything; it returns the header with its length once the whole header is there.
//!
//! - v1: one text line, `PROXY TCP4|TCP6 SRC DST SRCPORT DSTPORT\r\n` or `PROXY UNKNOWN…\r\n`,
//!   at most 107 bytes.
//! - v2: a 12-byte signature, version/command, family, a 16-bit length, the addresses, then
//!   TLVs (skipped). `LOCAL` (a balancer's health check) carries no client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest v1 line, CRLF included (the specification's bound).
pub const V1_MAX_LEN: usize = 107;

/// Longest v2 header wsgate accepts (16 fixed bytes plus addresses and TLVs).
pub const V2_MAX_LEN: usize = 16 + 4096;

/// What a PROXY header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection is relayed for this client (to this address on the balancer).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// No client address: v2 `LOCAL` (health checks), v1 `UNKNOWN`, or a family wsgate does
    /// not use (UDP, unix). The connection's own peer is the client.
    Local,
}

/// Why a PROXY header is refused; the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection does not start with a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// It starts like one but breaks the specification.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// Longer than wsgate accepts.
    #[error("PROXY protocol header too long")]
    TooLong,
}

impl ProxyHeaderError {
    /// Fixed label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyHeaderError::Missing => "missing",
            ProxyHeaderError::Malformed(_) => "malformed",
            ProxyHeaderError::TooLong => "too_long",
        }
    }
}

/// Parses the header at the start of `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some((header, len)))` when it is whole (`len` bytes belong to it).
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyHeaderError> {
    const V1_PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return if n < V1_PREFIX.len() {
            Ok(None)
        } else {
            parse_v1(buf)
        };
    }
    Err(ProxyHeaderError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyHeaderError> {
    let malformed = ProxyHeaderError::Malformed;
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyHeaderError::TooLong)
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| malformed("v1 line is not ASCII"))?;
    let len = end + 2;
    let mut parts = line.split(' ');
    let family = parts.next().unwrap_or("");
    if family == "UNKNOWN" {
        // The rest of the line is to be ignored.
        return Ok(Some((ProxyHeader::Local, len)));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(malformed("v1 needs 4 fields after the family"));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
        match family {
            "TCP4" => s
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| malformed("v1 TCP4 address")),
            "TCP6" => s
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| malformed("v1 TCP6 address")),
            _ => Err(malformed("v1 family is not TCP4, TCP6 or UNKNOWN")),
        }
    };
    let port = |s: &str| -> Result<u16, ProxyHeaderError> {
        // Decimal without leading zeros or signs, as the specification writes them.
        if s.is_empty()
            || (s.len() > 1 && s.starts_with('0'))
            || !s.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(malformed("v1 port"));
        }
        s.parse().map_err(|_| malformed("v1 port"))
    };
    Ok(Some((
        ProxyHeader::Proxied {
            source: SocketAddr::new(ip(src)?, port(sport)?),
            destination: SocketAddr::new(ip(dst)?, port(dport)?),
        },
        len,
    )))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyHeaderError> {
    let malformed = ProxyHeaderError::Malformed;
    if buf.len() < 16 {
        return Ok(None);
    }
    let version_command = buf[12];
    let family = buf[13];
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if version_command >> 4 != 2 {
        return Err(malformed("v2 version is not 2"));
    }
    let len = 16 + body;
    if len > V2_MAX_LEN {
        return Err(ProxyHeaderError::TooLong);
    }
    let command = version_command & 0x0F;
    if command > 1 {
        return Err(malformed("v2 command is not LOCAL or PROXY"));
    }
    if buf.len() < len {
        return Ok(None);
    }
    if command == 0 {
        // LOCAL: the balancer's own connection (a health check); addresses are ignored.
        return Ok(Some((ProxyHeader::Local, len)));
    }
    let addresses = &buf[16..len];
    let header = match family {
        // TCP over IPv4: 4 + 4 + 2 + 2 bytes, then TLVs.
        0x11 => {
            let a = addresses
                .get(..12)
                .ok_or(malformed("v2 TCP4 addresses cut short"))?;
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        // TCP over IPv6: 16 + 16 + 2 + 2 bytes, then TLVs.
        0x21 => {
            let a = addresses
                .get(..36)
                .ok_or(malformed("v2 TCP6 addresses cut short"))?;
            let ip = |i: usize| {
                let octets: [u8; 16] = a[i..i + 16].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // UNSPEC, UDP, unix sockets: accepted, but there is no TCP client to use.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => ProxyHeader::Local,
        _ => return Err(malformed("v2 address family")),
    };
    Ok(Some((header, len)))
}

/// Encodes a v1 header for `source` → `destination` (both of one IP family, or `UNKNOWN`).
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => format!(
            "PROXY TCP6 {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
        _ => "PROXY UNKNOWN\r\n".to_owned(),
    }
    .into_bytes()
}

/// Encodes a v2 `PROXY` header for `source` → `destination` (no TLVs); mixed families are
/// sent as IPv6 with IPv4-mapped addresses.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 8080\r\nGET /";
        assert_eq!(
            parse(line),
            Ok(Some((
                ProxyHeader::Proxied {
                    source: addr("192.0.2.7:5555"),
                    destination: addr("10.0.0.1:8080")
                },
                41
            )))
        );
        let line = b"PROXY TCP6 2001:db8::1 ::1 65535 443\r\n";
        assert!(matches!(
            parse(line),
            Ok(Some((ProxyHeader::Proxied { source, .. }, 38))) if source == addr("[2001:db8::1]:65535")
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN whatever\r\n"),
            Ok(Some((ProxyHeader::Local, 24)))
        );
    }

    #[test]
    fn v1_needs_more_until_crlf_and_is_bounded() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 8080\r\n";
        for cut in 0..line.len() {
            assert_eq!(parse(&line[..cut]), Ok(None), "cut at {cut}");
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(ProxyHeaderError::TooLong));
    }

    #[test]
    fn v1_malformed() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 5555\r\n"[..],
            b"PROXY TCP4 1.2.3.999 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 65536 2\r\n",
            b"PROXY UDP4 1.2.3.4 10.0.0.1 1 2\r\n",
            b"PROXY TCP4  1.2.3.4 10.0.0.1 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyHeaderError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(b"\x16\x03\x01"), Err(ProxyHeaderError::Missing));
    }

    #[test]
    fn v2_round_trips_and_needs_more_bytes() {
        for (s, d) in [
            (addr("192.0.2.7:5555"), addr("10.0.0.1:8080")),
            (addr("[2001:db8::7]:5555"), addr("[2001:db8::1]:443")),
        ] {
            let mut header = encode_v2(s, d);
            let len = header.len();
            for cut in 0..len {
                assert_eq!(parse(&header[..cut]), Ok(None), "cut at {cut}");
            }
            header.extend_from_slice(b"GET / HTTP/1.1");
            assert_eq!(
                parse(&header),
                Ok(Some((
                    ProxyHeader::Proxied {
                        source: s,
                        destination: d
                    },
                    len
                )))
            );
        }
        let v1 = encode_v1(addr("192.0.2.7:5555"), addr("10.0.0.1:8080"));
        assert_eq!(v1, b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 8080\r\n");
    }

    #[test]
    fn v2_local_tlvs_and_errors() {
        // LOCAL with a body that is skipped.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x03, 1, 2, 3]);
        assert_eq!(parse(&local), Ok(Some((ProxyHeader::Local, 19))));
        // PROXY TCP4 with a TLV behind the addresses: skipped.
        let mut tlv = encode_v2(addr("192.0.2.7:1"), addr("10.0.0.1:2"));
        tlv[15] += 5;
        tlv.extend_from_slice(&[0x04, 0x00, 0x02, 0xAB, 0xCD]);
        assert!(matches!(
            parse(&tlv),
            Ok(Some((ProxyHeader::Proxied { .. }, 33)))
        ));
        // Version 1 in a v2 header, an unknown command, a body too short for TCP4.
        let mut bad = encode_v2(addr("192.0.2.7:1"), addr("10.0.0.1:2"));
        bad[12] = 0x11;
        assert!(matches!(parse(&bad), Err(ProxyHeaderError::Malformed(_))));
        bad[12] = 0x22;
        assert!(matches!(parse(&bad), Err(ProxyHeaderError::Malformed(_))));
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert!(matches!(parse(&short), Err(ProxyHeaderError::Malformed(_))));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(parse(&huge), Err(ProxyHeaderError::TooLong));
    }
}
