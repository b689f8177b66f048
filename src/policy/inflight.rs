//! `Inflight`: a bound on concurrent calls, shared by every stage (and pipeline) it is given to.

use std::fmt;
use std::sync::Arc;
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
pub struct Inflight {
    sem: Arc<Semaphore>,
    limit: usize,
}

impl fmt::Debug for Inflight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Inflight({} of {})", self.in_flight(), self.limit)
    }
}

impl Inflight {
    /// A bound of `n` concurrent calls. `n` must be at least 1 (a stage given `Inflight::new(0)`
    /// is rejected with a configuration error).
    pub fn new(n: usize) -> Self {
        Inflight {
            sem: Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS))),
            limit: n,
        }
    }

    /// The bound.
    ///
    /// ```
    /// assert_eq!(flowline::Inflight::new(4).limit(), 4);
    /// ```
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Calls in flight now.
    ///
    /// ```
    /// assert_eq!(flowline::Inflight::new(4).in_flight(), 0);
    /// ```
    pub fn in_flight(&self) -> usize {
        self.limit.saturating_sub(self.sem.available_permits())
    }
}

impl Policy for Inflight {
    fn invalid(&self) -> Option<Invalid> {
        (self.limit == 0).then(|| ("inflight", "0".to_string(), "must be at least 1"))
    }

    fn admission(&self) -> Box<dyn Admission> {
        Box::new(Slots {
            sem: PollSemaphore::new(self.sem.clone()),
            held: 0,
        })
    }
}

/// A stage's share of an [`Inflight`] bound: the permits its calls in flight hold. They are
/// counted rather than kept one per call, so that a call carries nothing of the bound's.
struct Slots {
    sem: PollSemaphore,
    held: usize,
}

impl Slots {
    fn release(&mut self, n: usize) {
        if n > 0 {
            self.held -= n;
            self.sem.add_permits(n);
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
}
