//! Log timestamps: RFC 3339 in UTC with microseconds (`2026-12-01T10:52:51.974882Z`), the
//! form tracing-subscriber's `SystemTime` writes, with the part up to the second formatted
//! once per second per thread instead of on every line: that date arithmetic and its eight
//! padded numbers were a fifth of the cost of a session's two log lines (callgrind, 400
//! sessions).

use std::cell::RefCell;
use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// The timer for wsgate's log lines (text and JSON).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timestamps;

impl FormatTime for Timestamps {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        // A clock before 1970 prints as 1970: log lines need no dates before wsgate existed.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seconds = now.as_secs();
        thread_local! {
            /// The second last formatted on this thread, and its text up to the seconds.
            static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
        }
        SECOND.with(|second| {
            let mut second = second.borrow_mut();
            if second.0 != seconds {
                second.1.clear();
                write_second(&mut second.1, seconds)?;
                second.0 = seconds;
            }
            w.write_str(&second.1)?;
            let mut fraction = *b".000000Z";
            let mut micros = now.subsec_micros();
            for digit in fraction[1..7].iter_mut().rev() {
                *digit = b'0' + (micros % 10) as u8;
                micros /= 10;
            }
            // Only ASCII digits and punctuation were written.
            w.write_str(std::str::from_utf8(&fraction).map_err(|_| fmt::Error)?)
        })
    }
}

/// RFC 3339 (`YYYY-MM-DDTHH:MM:SSZ`) of `seconds` since the epoch, for the admin listener.
pub(crate) fn rfc3339(seconds: u64) -> String {
    let mut out = String::with_capacity(20);
    let _ = write_second(&mut out, seconds);
    out.push('Z');
    out
}

/// `YYYY-MM-DDTHH:MM:SS` of `seconds` since 1970-01-01T00:00:00Z.
fn write_second(out: &mut String, seconds: u64) -> fmt::Result {
    let (days, in_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_date(days);
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60
    )
}

/// Year, month (1–12) and day (1–31) of the day `days` after 1970-01-01 (proleptic
/// Gregorian calendar; Howard Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_date(days: u64) -> (u64, u64, u64) {
    // Days counted from 0000-03-01, so that a leap day is the last day of its year.
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(seconds: u64) -> String {
        let mut out = String::new();
        write_second(&mut out, seconds).unwrap();
        out
    }

    #[test]
    fn dates_across_leap_days_and_century_rules() {
        assert_eq!(second(0), "1970-01-01T00:00:00");
        assert_eq!(second(86_399), "1970-01-01T23:59:59");
        assert_eq!(second(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(second(951_868_800), "2000-03-01T00:00:00");
        assert_eq!(second(1_709_164_800), "2024-02-29T00:00:00");
        assert_eq!(second(1_798_761_599), "2026-12-31T23:59:59");
        assert_eq!(second(1_798_761_600), "2027-01-01T00:00:00");
        // 2100 is not a leap year: February 28th is followed by March 1st.
        assert_eq!(second(4_107_456_000), "2100-02-28T00:00:00");
        assert_eq!(second(4_107_542_400), "2100-03-01T00:00:00");
    }

    /// Day by day over 1970–2400, each date is the one after the day before.
    #[test]
    fn every_day_follows_the_one_before() {
        let mut last = civil_date(0);
        assert_eq!(last, (1970, 1, 1));
        for days in 1..(430 * 366) {
            let (year, month, day) = last;
            let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
            let lengths = [
                31,
                28 + u64::from(leap),
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            let next = if day < lengths[month as usize - 1] {
                (year, month, day + 1)
            } else if month < 12 {
                (year, month + 1, 1)
            } else {
                (year + 1, 1, 1)
            };
            assert_eq!(civil_date(days), next, "day {days}");
            last = next;
        }
    }

    /// The same text as tracing-subscriber's own timer, read back to back (one of two
    /// readings of ours brackets its reading to the second).
    #[test]
    fn matches_tracing_subscribers_timer() {
        let read = |timer: &dyn FormatTime| {
            let mut out = String::new();
            timer.format_time(&mut Writer::new(&mut out)).unwrap();
            out
        };
        let before = read(&Timestamps);
        let theirs = read(&tracing_subscriber::fmt::time::SystemTime);
        let after = read(&Timestamps);
        assert_eq!(before.len(), theirs.len(), "{before} {theirs}");
        assert!(
            theirs[..19] == before[..19] || theirs[..19] == after[..19],
            "{before} {theirs} {after}"
        );
        assert_eq!(&theirs[19..20], ".");
        assert!(before.ends_with('Z') && before.as_bytes()[19] == b'.');
    }
}
