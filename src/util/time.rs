//! Durations a user gives (`Duration::MAX` included) turned into instants safely.
//!
//! `Instant + Duration::MAX` overflows and panics. Every timer of the crate goes through
//! [`after`], which caps a duration at [`FAR`]: thirty years, the same horizon tokio uses for
//! a `sleep(Duration::MAX)`. So `Duration::MAX` means "never" wherever a duration is a wait,
//! a period or a time to live, and no run can tell the difference.

use std::time::Duration;

use tokio::time::Instant;

/// Thirty years: longer than any run, short enough that instant arithmetic cannot overflow.
pub(crate) const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `at + d`, with `d` capped at [`FAR`].
pub(crate) fn after(at: Instant, d: Duration) -> Instant {
    at + d.min(FAR)
}

/// A tokio interval whose first tick is one `period` from now (periods capped at [`FAR`]).
pub(crate) fn interval_from_now(period: Duration) -> tokio::time::Interval {
    let period = period.min(FAR);
    tokio::time::interval_at(after(Instant::now(), period), period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_is_capped_not_overflowed() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::MAX), now + FAR);
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_interval_of_max_never_ticks_in_a_run() {
        let mut ticks = interval_from_now(Duration::MAX);
        let ticked = tokio::time::timeout(Duration::from_secs(86_400), ticks.tick()).await;
        assert!(ticked.is_err());
    }
}
