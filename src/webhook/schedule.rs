//! When a failed delivery is tried again: Svix's schedule (seconds, then
//! minutes, then hours), each delay spread by a random ±20% so that
//! endpoints failing together do not come back together, unless the
//! endpoint said when with `Retry-After`.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The delay after the n-th failed attempt at one event (n from 1): 5 s,
/// 5 min, 30 min, 2 h, 5 h, then every 10 h until the endpoint's failure
/// window (default 5 days) disables it.
pub const DEFAULT_SCHEDULE: [Duration; 6] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
];

/// The longest `Retry-After` honoured: a longer one is read as this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The shortest: `Retry-After: 0` (or a past date) from an endpoint that
/// keeps failing must not make the deliverer retry in a tight loop.
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The delay before the attempt after the `failures`-th failure:
/// `retry_after` when the endpoint gave one (from [`MIN_RETRY_AFTER`] to
/// [`MAX_RETRY_AFTER`]),
/// else the schedule's step, with `jitter` (from 0 to 1) spreading it over
/// ±20%.
pub fn delay(
    schedule: &[Duration],
    failures: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    if let Some(retry_after) = retry_after {
        return retry_after.clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER);
    }
    let index = (failures.max(1) as usize - 1).min(schedule.len().saturating_sub(1));
    let step = schedule
        .get(index)
        .copied()
        .unwrap_or(Duration::from_secs(5));
    step.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

/// A `Retry-After` header's value (RFC 9110: delay-seconds or an
/// HTTP-date), as a delay from `now`; None when it is neither.
pub fn retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_grows_then_stays_at_its_last_step() {
        let at = |failures| delay(&DEFAULT_SCHEDULE, failures, None, 0.5);
        assert_eq!(at(1), Duration::from_secs(5));
        assert_eq!(at(2), Duration::from_secs(300));
        assert_eq!(at(6), Duration::from_secs(36_000));
        assert_eq!(at(60), Duration::from_secs(36_000));
        assert_eq!(
            delay(&DEFAULT_SCHEDULE, 1, None, 0.0),
            Duration::from_secs(4)
        );
        assert_eq!(
            delay(&DEFAULT_SCHEDULE, 1, None, 1.0),
            Duration::from_secs(6)
        );
    }

    #[test]
    fn retry_after_wins_and_is_capped() {
        let given = Some(Duration::from_secs(2));
        assert_eq!(
            delay(&DEFAULT_SCHEDULE, 3, given, 0.5),
            Duration::from_secs(2)
        );
        let huge = Some(Duration::from_secs(10 * 24 * 3600));
        assert_eq!(delay(&DEFAULT_SCHEDULE, 1, huge, 0.5), MAX_RETRY_AFTER);
        let now = Some(Duration::ZERO);
        assert_eq!(delay(&DEFAULT_SCHEDULE, 1, now, 0.5), MIN_RETRY_AFTER);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = DateTime::parse_from_rfc3339("2026-12-08T08:49:37Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Tue, 08 Dec 2026 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Tue, 08 Dec 2026 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }
}
