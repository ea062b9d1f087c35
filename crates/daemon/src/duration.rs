//! Durations as operators write them: `500ms`, `3s`, `30s`, `2m`, `1h`, for every flag of
//! every program. The bridge's flags took bare numbers before (seconds for `--ttl` and
//! `--resync`, milliseconds for `--retry-interval`); [`seconds_or_duration`] and
//! [`millis_or_duration`] still read them so.

use std::time::Duration;

/// A duration that cannot be read, with how to write it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a duration; write it like 500ms, 3s, 30s, 2m or 1h")]
pub struct DurationError {
    pub input: String,
}

/// `<digits><unit>` with the unit `ms`, `s`, `m` or `h`.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = || DurationError {
        input: input.to_string(),
    };
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| err())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
        _ => return Err(err()),
    };
    Ok(d)
}

/// A duration, or a bare number of seconds (`15` = `15s`).
pub fn seconds_or_duration(input: &str) -> Result<Duration, DurationError> {
    bare_or_duration(input, Duration::from_secs)
}

/// A duration, or a bare number of milliseconds (`500` = `500ms`).
pub fn millis_or_duration(input: &str) -> Result<Duration, DurationError> {
    bare_or_duration(input, Duration::from_millis)
}

fn bare_or_duration(input: &str, unit: fn(u64) -> Duration) -> Result<Duration, DurationError> {
    let s = input.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map(unit).map_err(|_| DurationError {
            input: input.to_string(),
        });
    }
    parse_duration(input)
}

/// A duration within `[min, max]`, as a clap value parser's error when it is not: the message
/// says the range in the flag's own terms.
pub fn within(d: Duration, min: Duration, max: Duration) -> Result<Duration, String> {
    if d < min || d > max {
        Err(format!(
            "{} is outside {} to {}",
            show(d),
            show(min),
            show(max)
        ))
    } else {
        Ok(d)
    }
}

/// `1500ms`, `15s`, `2m`, `1h`: the shortest exact form.
pub fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        format!("{ms}ms")
    } else if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "30", "s", "3 s", "-1s", "2d", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bare_numbers_keep_the_flags_old_unit() {
        assert_eq!(seconds_or_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(seconds_or_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(seconds_or_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(millis_or_duration("500"), Ok(Duration::from_millis(500)));
        assert_eq!(millis_or_duration("1s"), Ok(Duration::from_secs(1)));
        for bad in ["", "abc", "-1", "1.5", "15 s"] {
            assert!(seconds_or_duration(bad).is_err(), "{bad}");
            assert!(millis_or_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_are_said_in_the_flags_terms() {
        let min = Duration::from_secs(3);
        let max = Duration::from_secs(3600);
        assert!(within(Duration::from_secs(15), min, max).is_ok());
        let err = within(Duration::from_secs(1), min, max).expect_err("too short");
        assert_eq!(err, "1s is outside 3s to 1h");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
    }
}
