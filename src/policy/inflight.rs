//! `Inflight`: a bound on concurrent calls, shared by every stage (and pipeline) it is given to.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tokio_util::sync::PollSemaphore;

use crate::policy::{Admission, Finished, Invalid, Policy, Verdict};

/// At most `n` calls in flight across every stage that uses this value (clones share the
/// bound). A stage's own `workers(k)` still applies; the tighter bound wins.
///
/// ```
/// use flowline::prelude::*;
/// use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
/// use std::sync::Arc;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let api = Inflight::new(3);                        // the backend takes 3 calls at once
/// let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
/// let call = move |x: u32| {
///     let (now, peak) = (now.clone(), peak.clone());
///     async move {
///         peak.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
///         tokio::time::sleep(Duration::from_millis(10)).await;
///         now.fetch_sub(1, SeqCst);
///         x
///     }
/// };
/// let (a, b) = (call.clone(), call);
/// let first = Pipeline::from_iter(0..20u32).map_async("a", a).workers(8).inflight(&api).run();
/// let second = Pipeline::from_iter(0..20u32).map_async("b", b).workers(8).inflight(&api).run();
/// let (r1, r2) = tokio::join!(first, second);
/// assert_eq!(r1.unwrap().delivered() + r2.unwrap().delivered(), 40);
/// # let _ = peak;
/// # }
/// ```
#[derive(Clone)]
pub struct Inflight(Arc<Shared>);

/// The semaphore and its bound. A lowered bound takes the free permits out of the
/// semaphore at once and the rest (held by calls in flight) as those calls give them back:
/// `debt` counts them. Changes and give-backs take the lock, so that a permit given back
/// while the bound is lowered is never handed out again.
struct Shared {
    sem: Arc<Semaphore>,
    bound: Mutex<Bound>,
}

struct Bound {
    limit: usize,
    /// Permits still to be taken out as calls give them back.
    debt: usize,
}

impl fmt::Debug for Inflight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Inflight({} of {})", self.in_flight(), self.limit())
    }
}

/// The most calls in flight a bound may be set to while running (see [`Inflight::set_limit`]);
/// also the most workers a stage may be set to.
pub(crate) const MAX_LIVE: usize = 1 << 20;

impl Inflight {
    /// A bound of `n` concurrent calls. `n` must be at least 1 (a stage given `Inflight::new(0)`
    /// is rejected with a configuration error).
    pub fn new(n: usize) -> Self {
        Inflight(Arc::new(Shared {
            sem: Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS))),
            bound: Mutex::new(Bound { limit: n, debt: 0 }),
        }))
    }

    fn bound(&self) -> std::sync::MutexGuard<'_, Bound> {
        self.0.bound.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bound.
    ///
    /// ```
    /// assert_eq!(flowline::Inflight::new(4).limit(), 4);
    /// ```
    pub fn limit(&self) -> usize {
        self.bound().limit
    }

    /// Calls in flight now.
    ///
    /// ```
    /// assert_eq!(flowline::Inflight::new(4).in_flight(), 0);
    /// ```
    pub fn in_flight(&self) -> usize {
        let b = self.bound();
        (b.limit + b.debt).saturating_sub(self.0.sem.available_permits())
    }

    /// Changes the bound while the stages that share it run: a raised bound lets more calls
    /// start at once; a lowered one cancels no call in flight, it starts none until fewer
    /// than `n` are in flight. `n` must be at least 1 and at most 2^20; anything else is
    /// refused with [`Error::Config`](crate::Error::Config) naming the value, and the bound
    /// stays as it was.
    ///
    /// ```
    /// let db = flowline::Inflight::new(64);
    /// db.set_limit(8).unwrap();
    /// assert_eq!(db.limit(), 8);
    /// assert!(db.set_limit(0).unwrap_err().to_string().contains("inflight = 0"));
    /// assert_eq!(db.limit(), 8);
    /// ```
    pub fn set_limit(&self, n: usize) -> Result<(), crate::Error> {
        if let Some((option, value, reason)) = live_invalid("inflight", n) {
            return Err(crate::Error::config_text("Inflight", option, value, reason));
        }
        let mut b = self.bound();
        if n >= b.limit {
            let up = n - b.limit;
            let paid = up.min(b.debt);
            b.debt -= paid;
            self.0.sem.add_permits(up - paid);
        } else {
            let down = b.limit - n;
            let taken = self.0.sem.forget_permits(down);
            b.debt += down - taken;
        }
        b.limit = n;
        Ok(())
    }

    /// Gives back `n` permits of calls that ended: first to a lowered bound's debt.
    fn give_back(&self, n: usize) {
        let mut b = self.bound();
        let paid = n.min(b.debt);
        b.debt -= paid;
        self.0.sem.add_permits(n - paid);
    }
}

/// A limit set while running that is refused: 0, or more than [`MAX_LIVE`].
pub(crate) fn live_invalid(option: &'static str, n: usize) -> Option<Invalid> {
    match n {
        0 => Some((option, "0".into(), "must be at least 1")),
        n if n > MAX_LIVE => Some((option, n.to_string(), "must be at most 1048576 (2^20)")),
        _ => None,
    }
}

impl Policy for Inflight {
    fn invalid(&self) -> Option<Invalid> {
        (self.limit() == 0).then(|| ("inflight", "0".to_string(), "must be at least 1"))
    }

    fn admission(&self) -> Box<dyn Admission> {
        Box::new(Slots {
            sem: PollSemaphore::new(self.0.sem.clone()),
            bound: self.clone(),
            held: 0,
        })
    }
}

/// A stage's share of an [`Inflight`] bound: the permits its calls in flight hold. They are
/// counted rather than kept one per call, so that a call carries nothing of the bound's.
struct Slots {
    sem: PollSemaphore,
    bound: Inflight,
    held: usize,
}

impl Slots {
    fn release(&mut self, n: usize) {
        if n > 0 {
            self.held -= n;
            self.bound.give_back(n);
        }
    }
}

impl Admission for Slots {
    fn poll_admit(&mut self, cx: &mut Context<'_>, _call: u64, _want: usize) -> Poll<Verdict> {
        match self.sem.poll_acquire(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(permit) => {
                // `None`: the semaphore is closed, which an `Inflight` never does.
                if let Some(p) = permit {
                    p.forget();
                    self.held += 1;
                }
                Poll::Ready(Verdict::Go)
            }
        }
    }

    fn cancel(&mut self, _call: u64) {
        self.release(1.min(self.held));
    }

    fn finished(&mut self, _call: &Finished<'_>) {
        self.release(1.min(self.held));
    }
}

impl Drop for Slots {
    /// The stage ended with calls in flight (a cancelled run): their slots go back.
    fn drop(&mut self) {
        self.release(self.held);
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test]
    async fn a_zero_inflight_bound_is_rejected() {
        let err = Pipeline::from_iter(0..3u32)
            .map_async("call", |x| async move { x })
            .inflight(&Inflight::new(0))
            .run()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("stage `call`: inflight = 0"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_inflight_bound_holds_across_pipelines() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let bound = Inflight::new(3);
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let call = {
            let (now, peak) = (now.clone(), peak.clone());
            move |x: u32| {
                let (now, peak) = (now.clone(), peak.clone());
                async move {
                    peak.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    now.fetch_sub(1, SeqCst);
                    x
                }
            }
        };
        let t0 = Instant::now();
        let a = Pipeline::from_iter(0..30u32)
            .map_async("a", call.clone())
            .workers(8)
            .inflight(&bound)
            .run();
        let b = Pipeline::from_iter(0..30u32)
            .map_async("b", call)
            .workers(8)
            .unordered()
            .inflight(&bound)
            .run();
        let (ra, rb) = tokio::join!(a, b);
        assert_eq!(ra.unwrap().delivered() + rb.unwrap().delivered(), 60);
        assert_eq!(peak.load(SeqCst), 3);
        assert_eq!(t0.elapsed(), Duration::from_millis(200)); // 60 calls, 3 at a time, 10 ms each
        assert_eq!(bound.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lowered_bound_waits_out_the_calls_in_flight_and_a_raised_one_starts_at_once() {
        use crate::runtime::live::tests::{Starts, between, logged, ms};
        let bound = Inflight::new(64);
        let starts: Starts = Default::default();
        let t0 = Instant::now();
        let handle = Pipeline::from_iter(0..u64::MAX)
            .map_async("a", logged(100, t0, &starts))
            .workers(128)
            .unordered()
            .inflight(&bound)
            .spawn();
        let most = |from, to| between(&starts, from, to);
        tokio::time::sleep(ms(50)).await;
        assert_eq!((bound.in_flight(), bound.limit()), (64, 64));
        bound.set_limit(8).unwrap();
        assert_eq!((bound.in_flight(), bound.limit()), (64, 8));
        tokio::time::sleep(ms(100)).await; // 150 ms
        // The 64 calls of 0 ms end at 100 ms; then 8 start, never more.
        assert_eq!(most(1, 100), (0, 0));
        assert_eq!(most(100, 150), (8, 8));
        bound.set_limit(32).unwrap();
        tokio::time::sleep(ms(1)).await;
        assert_eq!(most(150, 151), (24, 32));
        assert_eq!(bound.in_flight(), 32);
        // Lowered below what is in flight and raised again before any call ends: the debt
        // is paid from the raise, not twice. 32 run; none starts until fewer than 16 do:
        // the 8 of 100 ms end at 200 ms (24 left), the 24 of 150 ms at 250 ms; 16 start.
        bound.set_limit(4).unwrap();
        bound.set_limit(16).unwrap();
        tokio::time::sleep(ms(100)).await; // 251 ms
        assert_eq!(most(151, 250), (0, 0));
        assert_eq!(most(250, 251), (16, 16));
        assert_eq!(bound.in_flight(), 16);
        handle.cancel();
        let _ = handle.join().await;
        assert_eq!(bound.in_flight(), 0);
        for bad in [0, (1 << 20) + 1] {
            let err = bound.set_limit(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("inflight = {bad}")), "{err}");
        }
        assert_eq!(bound.limit(), 16);
    }
}
