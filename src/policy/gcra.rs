//! GCRA's decision as a pure function over clock values: no timer, no lock, no runtime.
//!
//! [`Rate`](crate::Rate) runs it on tokio's clock; a limit kept on a server (flowline-redis's
//! `RedisRate`, whose Lua script makes the same decision on the server's clock) is checked
//! against it. Both read the same four values: the theoretical arrival time of the next
//! permit (TAT), the emission interval, the burst tolerance (`(burst - 1) × interval`), and
//! `floor`, the earliest instant a caller is owed slots from (`now`, or earlier for a caller
//! that has been waiting).

use std::time::Duration;

use tokio::time::Instant;

/// A clock value GCRA can decide on: an instant, or a count of ticks (`u64`, in whatever
/// unit the caller keeps its times: nanoseconds, a server's microseconds).
///
/// ```
/// use flowline::gcra::Clock;
/// assert_eq!(5u64.later(u64::MAX), u64::MAX);
/// assert_eq!(5u64.earlier(6), None);
/// ```
pub trait Clock: Copy + Ord {
    /// A length of time on this clock.
    type Span: Copy;
    /// `self + span`, saturating at the clock's end.
    fn later(self, span: Self::Span) -> Self;
    /// `self - span`, or `None` before the clock's start.
    fn earlier(self, span: Self::Span) -> Option<Self>;
}

impl Clock for u64 {
    type Span = u64;
    fn later(self, span: u64) -> u64 {
        self.saturating_add(span)
    }
    fn earlier(self, span: u64) -> Option<u64> {
        self.checked_sub(span)
    }
}

impl Clock for Instant {
    type Span = Duration;
    /// Spans capped at thirty years (`Instant + Duration::MAX` would panic).
    fn later(self, span: Duration) -> Instant {
        crate::util::time::after(self, span)
    }
    fn earlier(self, span: Duration) -> Option<Instant> {
        self.checked_sub(span)
    }
}

/// What GCRA says about the next permit.
///
/// ```
/// use flowline::gcra::{Decision, decide};
/// // 1 per 10 ticks, no burst, never used: the first permit goes at once.
/// assert_eq!(decide(None, 10, 0, 100, 100), Decision::Admit { at: 100, tat: 110 });
/// // The next one waits for its slot.
/// assert_eq!(decide(Some(110), 10, 0, 105, 105), Decision::Wait { until: 110 });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<T> {
    /// The permit conforms: it goes, and the TAT becomes `tat`. `at` is the slot it takes
    /// (at most `now`: a waiting caller's owed slot may lie in the past).
    Admit {
        /// The earliest instant the permit conformed.
        at: T,
        /// The theoretical arrival time of the permit after it.
        tat: T,
    },
    /// The permit does not conform before `until` (later than `now`): ask again then.
    Wait {
        /// When it conforms.
        until: T,
    },
}

impl<T: Copy> Decision<T> {
    /// The earliest instant the permit conforms: its slot if admitted, else when to ask again.
    ///
    /// ```
    /// use flowline::gcra::decide;
    /// assert_eq!(decide(Some(50u64), 10, 0, 0, 0).conforms_at(), 50);
    /// ```
    pub fn conforms_at(&self) -> T {
        match *self {
            Decision::Admit { at, .. } => at,
            Decision::Wait { until } => until,
        }
    }
}

/// GCRA's decision on one permit at `now`: `tat` is the theoretical arrival time of the next
/// permit (`None`: never used), `interval` the time between two permits, `tolerance` how far
/// ahead of its slot a permit may go (`(burst - 1) × interval`), and `floor` the earliest
/// instant the permit may take its slot from (`now`, or earlier for a caller owed the slots
/// that passed while it waited; never later than `now`).
///
/// A permit conforms from `max(tat - tolerance, floor)`; once admitted, the TAT becomes
/// `max(tat, slot) + interval`. Arithmetic saturates at the clock's ends, so no value
/// panics or wraps: a tolerance reaching back past the clock's start conforms from `floor`.
///
/// ```
/// use flowline::gcra::{Decision, decide};
/// // A burst of 3 at 1 per 10 ticks: tolerance 20, three permits at once.
/// let mut tat = None;
/// for _ in 0..3 {
///     let Decision::Admit { tat: next, .. } = decide(tat, 10, 20, 0, 0) else { panic!() };
///     tat = Some(next);
/// }
/// assert_eq!(decide(tat, 10, 20, 0, 0), Decision::Wait { until: 10 });
/// ```
pub fn decide<T: Clock>(
    tat: Option<T>,
    interval: T::Span,
    tolerance: T::Span,
    floor: T,
    now: T,
) -> Decision<T> {
    let t = tat.unwrap_or(floor);
    let slot = t.earlier(tolerance).map_or(floor, |s| s.max(floor));
    if slot > now {
        Decision::Wait { until: slot }
    } else {
        Decision::Admit {
            at: slot,
            tat: t.max(slot).later(interval),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admits at `now` as long as the permits conform; returns how many went.
    fn run_of(mut tat: Option<u64>, interval: u64, tolerance: u64, now: u64, max: u64) -> u64 {
        let mut n = 0;
        while n < max {
            match decide(tat, interval, tolerance, now, now) {
                Decision::Admit { tat: t, .. } => tat = Some(t),
                Decision::Wait { .. } => break,
            }
            n += 1;
        }
        n
    }

    #[test]
    fn spacing_without_a_burst() {
        let mut tat = None;
        let mut times = Vec::new();
        let mut now = 1_000u64;
        while times.len() < 4 {
            match decide(tat, 10, 0, now, now) {
                Decision::Admit { tat: t, at } => {
                    times.push(at);
                    tat = Some(t);
                }
                Decision::Wait { until } => {
                    assert!(until > now);
                    now = until;
                }
            }
        }
        assert_eq!(times, [1_000, 1_010, 1_020, 1_030]);
    }

    #[test]
    fn a_burst_of_b_goes_at_once_then_waits_one_interval() {
        assert_eq!(run_of(None, 10, 4 * 10, 500, 100), 5);
        // After an idle time as long as the burst, the burst is back whole; not more.
        assert_eq!(run_of(Some(550), 10, 40, 550, 100), 5);
        assert_eq!(run_of(Some(550), 10, 40, 10_000, 100), 5);
    }

    #[test]
    fn a_waiting_caller_is_owed_the_slots_since_its_floor() {
        // TAT 100, now 130, waiting since 100: the slots 100, 110, 120, 130 are owed.
        let mut tat = Some(100u64);
        let mut got = Vec::new();
        while let Decision::Admit { at, tat: t } = decide(tat, 10, 0, 100, 130) {
            got.push(at);
            tat = Some(t);
        }
        assert_eq!(got, [100, 110, 120, 130]);
        // Without the wait (floor = now), the slots before now are lost.
        assert_eq!(
            decide(Some(100u64), 10, 0, 130, 130),
            Decision::Admit { at: 130, tat: 140 }
        );
    }

    #[test]
    fn hostile_values_neither_panic_nor_wrap() {
        // Zero interval: every permit conforms, the TAT never moves past now.
        assert_eq!(run_of(None, 0, 0, 7, 1_000), 1_000);
        // The TAT at the clock's end saturates instead of wrapping to 0.
        assert_eq!(
            decide(Some(u64::MAX - 5), 10, 0, u64::MAX, u64::MAX),
            Decision::Admit {
                at: u64::MAX,
                tat: u64::MAX
            }
        );
        assert_eq!(
            decide(Some(u64::MAX), u64::MAX, 0, 0, 0),
            Decision::Wait { until: u64::MAX }
        );
        // A huge burst at the clock's start: the tolerance reaches before 0, so a permit
        // conforms from the floor, not never.
        assert_eq!(run_of(None, 1, u64::MAX, 0, 10_000), 10_000);
        assert_eq!(
            decide(Some(u64::MAX), u64::MAX, u64::MAX, 0, 0),
            Decision::Admit {
                at: 0,
                tat: u64::MAX
            }
        );
        // Now at 0 with a TAT ahead: wait, never admit early.
        assert_eq!(decide(Some(1u64), 1, 0, 0, 0), Decision::Wait { until: 1 });
    }

    #[test]
    fn instants_behave_as_ticks() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(
            decide(Some(t0 + ms(20)), ms(10), ms(20), t0, t0),
            Decision::Admit {
                at: t0,
                tat: t0 + ms(30)
            }
        );
        assert_eq!(
            decide(Some(t0 + ms(30)), ms(10), ms(20), t0, t0),
            Decision::Wait { until: t0 + ms(10) }
        );
        // A tolerance longer than the clock has run: conforms from the floor.
        assert_eq!(
            decide(Some(t0), ms(10), Duration::MAX, t0, t0),
            Decision::Admit {
                at: t0,
                tat: t0 + ms(10)
            }
        );
        // An interval of Duration::MAX is thirty years, not a panic.
        let Decision::Admit { tat, .. } = decide(None, Duration::MAX, Duration::ZERO, t0, t0)
        else {
            panic!()
        };
        assert_eq!(tat, t0 + crate::util::time::FAR);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_with_a_burst_longer_than_the_clock_has_run_still_bursts() {
        // A tolerance of about 11.6 days reaches before the monotonic clock's start on a
        // machine up for less: the burst goes at once all the same.
        let rate = crate::Rate::per_second(1).burst(1_000_000);
        let t0 = Instant::now();
        for _ in 0..1_000 {
            rate.acquire().await.unwrap();
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }
}
