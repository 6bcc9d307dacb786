//! RFC 3339 timestamps for the command line: printed in UTC, read with any offset.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `2026-11-21T10:00:00Z`, with milliseconds when there are any. Times before 1970 print
/// as the epoch (the store never holds them).
pub fn format(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let ms = d.subsec_millis();
    if ms == 0 {
        format!("{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z")
    }
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Reads `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` (a space may stand for the `T`).
pub fn parse(s: &str) -> Result<SystemTime, String> {
    let bad = || format!("{s:?} is not an RFC 3339 time (like 2026-11-21T10:00:00Z)");
    let b = s.as_bytes();
    if b.len() < 20 || !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return Err(bad());
    }
    let field = |from: usize, to: usize| s.get(from..to).and_then(digits).ok_or_else(bad);
    let sep = |at: usize, c: u8| {
        if b.get(at) == Some(&c) {
            Ok(())
        } else {
            Err(bad())
        }
    };
    sep(4, b'-')?;
    sep(7, b'-')?;
    sep(13, b':')?;
    sep(16, b':')?;
    let (y, mo, d) = (field(0, 4)?, field(5, 7)?, field(8, 10)?);
    let (h, mi, se) = (field(11, 13)?, field(14, 16)?, field(17, 19)?);
    let mut rest = s.get(19..).ok_or_else(bad)?;
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return Err(bad());
        }
        let digits9: String = frac.chars().take(n.min(9)).collect();
        let scale = 10u32.pow(u32::try_from(9 - digits9.len()).unwrap_or(0));
        nanos = digits9.parse::<u32>().map_err(|_| bad())? * scale;
        rest = frac.get(n..).ok_or_else(bad)?;
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return Err(bad()),
            };
            if rest.len() != 6 || rest.as_bytes().get(3) != Some(&b':') {
                return Err(bad());
            }
            let oh = rest.get(1..3).and_then(digits).ok_or_else(bad)?;
            let om = rest.get(4..6).and_then(digits).ok_or_else(bad)?;
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let month = u32::try_from(mo).map_err(|_| bad())?;
    let day = u32::try_from(d).map_err(|_| bad())?;
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_len = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    // A leap second (:60) is read as the last second of its minute.
    if day == 0 || day > month_len || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let secs = days_from_civil(y, month, day) * 86_400 + h * 3600 + mi * 60 + se.min(59) - offset;
    let secs = u64::try_from(secs).map_err(|_| format!("{s:?} is before 1970"))?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_offsets() {
        let t = parse("2026-11-21T10:00:00Z").expect("parse");
        assert_eq!(format(t), "2026-11-21T10:00:00Z");
        assert_eq!(parse("2026-11-21T12:30:00+02:30").expect("offset"), t);
        assert_eq!(
            parse("2026-11-21 10:00:00.250Z").map(format),
            Ok("2026-11-21T10:00:00.250Z".into())
        );
        assert_eq!(format(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            parse("2024-02-29T00:00:00Z").map(format),
            Ok("2024-02-29T00:00:00Z".into())
        );
        assert_eq!(
            parse("2000-02-29T12:00:00Z").map(format),
            Ok("2000-02-29T12:00:00Z".into())
        );
        // Negative and positive offsets that cross a year boundary in UTC.
        assert_eq!(
            parse("2026-12-31T23:30:00-01:00").map(format),
            Ok("2027-01-01T00:30:00Z".into())
        );
        assert_eq!(
            parse("2027-01-01T00:30:00+01:00").map(format),
            Ok("2026-12-31T23:30:00Z".into())
        );
        for bad in [
            "",
            "2026-11-21",
            "2026-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2026-11-21T10:00:00",
            "2026-11-21T10:00:00+2",
            "1969-12-31T23:59:59Z",
            "2100-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
