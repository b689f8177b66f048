//! `Retry`: how an async stage retries a failed call — backoff, jitter, limits, which errors,
//! server hints and a retry budget. The stage keeps a retrying item in a delay queue inside
//! its driver, so an item in backoff does not occupy a worker; what it asks this module is
//! only whether, and when, to try again ([`RetryPolicy`]).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::failure::{BoxError, ItemError};
use crate::policy::{Again, Failed, Invalid, RetryPolicy};

type Predicate = Arc<dyn Fn(&ItemError) -> bool + Send + Sync>;
type Hint = Arc<dyn Fn(&ItemError) -> Option<Duration> + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backoff {
    Constant(Duration),
    Exponential { base: Duration, factor: f64 },
    Fibonacci(Duration),
}

/// A retry policy for an async stage ([`AsyncStage::retry`](crate::AsyncStage::retry)).
///
/// The delay before retry `k` (1 for the first retry) is `base`, `base·factor^(k−1)` or
/// `base·fib(k)`, capped by [`max_delay`](Retry::max_delay) (without one, by
/// [`Retry::WAIT_CAP`], one hour), made random in `[0, delay]` by [`jitter`](Retry::jitter)
/// ("full jitter"), and replaced by the error's own hint when it has one ([`RetryAfter`]).
/// An item is retried while its error is retryable, attempts are left, the next attempt
/// would start within [`max_elapsed`](Retry::max_elapsed), and the [`RetryBudget`] (if any)
/// has room. Each attempt honours the stage's `timeout`.
///
/// A hint is outside input (a server's `Retry-After`), so it never parks an item for
/// longer than the policy allows: with `max_delay` it is cut to `max_delay`; without, a hint
/// over [`Retry::WAIT_CAP`], or one that would start the next attempt past `max_elapsed`,
/// fails the item at once, with an error that says so (its source is the call's error).
///
/// ```
/// use flowline::prelude::*;
/// use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
/// use std::sync::Arc;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let calls = Arc::new(AtomicU32::new(0));
/// let c = calls.clone();
/// let out = Pipeline::from_iter([7u32])
///     .try_map_async("flaky", move |x| {
///         let n = c.fetch_add(1, SeqCst);
///         async move { if n < 2 { Err("busy") } else { Ok(x) } }   // fails twice
///     })
///     .retry(Retry::exponential(Duration::from_millis(100)).max_attempts(5))
///     .collect()
///     .await
///     .unwrap();
/// assert_eq!(out, vec![7]);
/// assert_eq!(calls.load(SeqCst), 3);
/// # }
/// ```
#[derive(Clone)]
#[must_use = "an option set does nothing until it is passed to a stage or source"]
pub struct Retry {
    backoff: Backoff,
    max_attempts: u32,
    max_elapsed: Option<Duration>,
    max_delay: Option<Duration>,
    jitter: bool,
    retry_if: Option<Predicate>,
    hint: Option<Hint>,
    budget: Option<RetryBudget>,
    pause_source: bool,
    /// A factor given to a backoff that has none (rejected, so that it is not lost silently).
    stray_factor: Option<f64>,
}

impl fmt::Debug for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("backoff", &self.backoff)
            .field("max_attempts", &self.max_attempts)
            .field("max_elapsed", &self.max_elapsed)
            .field("jitter", &self.jitter)
            .field("pause_source", &self.pause_source)
            .finish_non_exhaustive()
    }
}

impl Retry {
    /// The longest wait before one retry when no [`max_delay`](Retry::max_delay) is given:
    /// one hour. A computed delay (a huge base, a factor of `f64::MAX`) is cut to it; a
    /// server's hint over it fails the item instead of parking it for longer.
    ///
    /// ```
    /// use flowline::Retry;
    /// use std::time::Duration;
    /// let r = Retry::exponential(Duration::from_secs(1)).factor(f64::MAX);
    /// assert_eq!(r.delay_for(2), Retry::WAIT_CAP);
    /// assert_eq!(Retry::constant(Duration::MAX).delay_for(1), Duration::from_secs(3600));
    /// ```
    pub const WAIT_CAP: Duration = Duration::from_secs(3600);

    fn with(backoff: Backoff) -> Self {
        Retry {
            backoff,
            max_attempts: 3,
            max_elapsed: None,
            max_delay: None,
            jitter: false,
            retry_if: None,
            hint: None,
            budget: None,
            pause_source: false,
            stray_factor: None,
        }
    }

    /// The same delay before every retry. Default: 3 attempts in all.
    ///
    /// ```
    /// use std::time::Duration;
    /// let r = flowline::Retry::constant(Duration::from_millis(50));
    /// assert_eq!(r.delay_for(3), Duration::from_millis(50));
    /// ```
    pub fn constant(delay: Duration) -> Self {
        Retry::with(Backoff::Constant(delay))
    }

    /// Doubling delays: `base`, `2·base`, `4·base`, ... Default: 3 attempts in all.
    ///
    /// ```
    /// use std::time::Duration;
    /// let r = flowline::Retry::exponential(Duration::from_millis(10));
    /// assert_eq!(r.delay_for(3), Duration::from_millis(40));
    /// ```
    pub fn exponential(base: Duration) -> Self {
        Retry::with(Backoff::Exponential { base, factor: 2.0 })
    }

    /// Fibonacci delays: `base`, `base`, `2·base`, `3·base`, `5·base`, ...
    ///
    /// ```
    /// use std::time::Duration;
    /// let r = flowline::Retry::fibonacci(Duration::from_millis(10));
    /// assert_eq!(r.delay_for(5), Duration::from_millis(50));
    /// ```
    pub fn fibonacci(base: Duration) -> Self {
        Retry::with(Backoff::Fibonacci(base))
    }

    /// The growth factor of an exponential backoff (default 2; must be at least 1).
    ///
    /// ```
    /// use std::time::Duration;
    /// let r = flowline::Retry::exponential(Duration::from_millis(10)).factor(3.0);
    /// assert_eq!(r.delay_for(3), Duration::from_millis(90));
    /// ```
    pub fn factor(mut self, factor: f64) -> Self {
        match self.backoff {
            Backoff::Exponential { base, .. } => {
                self.backoff = Backoff::Exponential { base, factor }
            }
            _ => self.stray_factor = Some(factor),
        }
        self
    }

    /// Attempts in all, the first call included (default 3; must be at least 1).
    ///
    /// ```
    /// let r = flowline::Retry::constant(std::time::Duration::ZERO).max_attempts(5);
    /// # let _ = r;
    /// ```
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Gives up when the next attempt would start later than `limit` after the first one.
    ///
    /// ```
    /// use std::time::Duration;
    /// let r = flowline::Retry::exponential(Duration::from_millis(100)).max_attempts(20)
    ///     .max_elapsed(Duration::from_secs(30));
    /// # let _ = r;
    /// ```
    pub fn max_elapsed(mut self, limit: Duration) -> Self {
        self.max_elapsed = Some(limit);
        self
    }

    /// Caps each delay (before jitter).
    ///
    /// ```
    /// use std::time::Duration;
    /// let r = flowline::Retry::exponential(Duration::from_secs(1)).max_delay(Duration::from_secs(5));
    /// assert_eq!(r.delay_for(10), Duration::from_secs(5));
    /// ```
    pub fn max_delay(mut self, cap: Duration) -> Self {
        self.max_delay = Some(cap);
        self
    }

    /// Full jitter: each delay is drawn uniformly from `[0, delay]`, so that many items
    /// failing together do not retry together.
    ///
    /// ```
    /// let r = flowline::Retry::exponential(std::time::Duration::from_millis(50)).jitter();
    /// # let _ = r;
    /// ```
    pub fn jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// Which errors are retried (default: user errors and timeouts; never panics or a
    /// policy's refusal, [`ItemError::CircuitOpen`] or [`ItemError::Refused`]).
    ///
    /// ```
    /// use flowline::{ItemError, Retry};
    /// let r = Retry::constant(std::time::Duration::ZERO)
    ///     .retry_if(|e| matches!(e, ItemError::Timeout(_)));
    /// assert!(!r.is_retryable(&ItemError::user("404")));
    /// ```
    pub fn retry_if(mut self, f: impl Fn(&ItemError) -> bool + Send + Sync + 'static) -> Self {
        self.retry_if = Some(Arc::new(f));
        self
    }

    /// Reads a delay hint from an error (e.g. an HTTP `Retry-After` header); a hint replaces
    /// the backoff's delay. By default a [`RetryAfter`] error is recognised.
    ///
    /// ```
    /// use flowline::{ItemError, Retry};
    /// use std::time::Duration;
    /// let r = Retry::constant(Duration::from_millis(10))
    ///     .delay_hint(|e| e.to_string().strip_prefix("429 wait ").and_then(|s| s.parse().ok()).map(Duration::from_secs));
    /// assert_eq!(r.hint_of(&ItemError::user("429 wait 3")), Some(Duration::from_secs(3)));
    /// ```
    pub fn delay_hint(
        mut self,
        f: impl Fn(&ItemError) -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        self.hint = Some(Arc::new(f));
        self
    }

    /// Limits retries to a share of first attempts (see [`RetryBudget`]); clones of one
    /// budget are shared.
    ///
    /// ```
    /// use flowline::{Retry, RetryBudget};
    /// let r = Retry::constant(std::time::Duration::ZERO).budget(RetryBudget::ratio(0.1));
    /// # let _ = r;
    /// ```
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Pauses the job while any item of this stage is in backoff ("pause the job on error,
    /// and retry after sleep"): the run's source pulls nothing, and the stage starts no new
    /// item — items it has already received wait too. Calls already in flight finish; when
    /// the backoff is over, the waiting item is tried again and the job goes on.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let t0 = tokio::time::Instant::now();
    /// let starts = Arc::new(Mutex::new(Vec::new()));
    /// let s = starts.clone();
    /// Pipeline::from_iter(0..3u32)
    ///     .try_map_async("api", move |x| {
    ///         let mut starts = s.lock().unwrap();
    ///         starts.push((x, t0.elapsed().as_millis()));
    ///         let fail = starts.len() == 1;                  // the very first call fails
    ///         async move { if fail { Err("503") } else { Ok(x) } }
    ///     })
    ///     .workers(3)
    ///     .retry(Retry::constant(Duration::from_secs(1)).pause_source())
    ///     .run().await.unwrap();
    /// // Items 1 and 2 were ready at once, yet nothing starts until item 0's retry.
    /// assert_eq!(*starts.lock().unwrap(), vec![(0, 0), (0, 1000), (1, 1000), (2, 1000)]);
    /// # }
    /// ```
    pub fn pause_source(mut self) -> Self {
        self.pause_source = true;
        self
    }

    /// The delay before retry `k` (1 = the first retry), without jitter or hint: capped by
    /// [`max_delay`](Retry::max_delay), or else by [`Retry::WAIT_CAP`].
    ///
    /// ```
    /// use std::time::Duration;
    /// let r = flowline::Retry::exponential(Duration::from_secs(1)).max_delay(Duration::from_secs(5));
    /// assert_eq!(r.delay_for(2), Duration::from_secs(2));
    /// assert_eq!(r.delay_for(60), Duration::from_secs(5));
    /// ```
    pub fn delay_for(&self, k: u32) -> Duration {
        let k = k.max(1);
        let d = match self.backoff {
            Backoff::Constant(d) => d,
            Backoff::Exponential { base, factor } => {
                let f = factor.powi((k - 1).min(1000) as i32);
                Duration::try_from_secs_f64(base.as_secs_f64() * f).unwrap_or(Duration::MAX)
            }
            Backoff::Fibonacci(base) => {
                let (mut a, mut b) = (1u64, 1u64);
                for _ in 1..k {
                    (a, b) = (b, a.saturating_add(b));
                }
                base.saturating_mul(a.min(u32::MAX as u64) as u32)
            }
        };
        d.min(self.wait_cap())
    }

    /// The longest single wait: `max_delay`, else [`Retry::WAIT_CAP`].
    fn wait_cap(&self) -> Duration {
        self.max_delay.unwrap_or(Self::WAIT_CAP)
    }

    /// Whether `e` may be retried.
    pub fn is_retryable(&self, e: &ItemError) -> bool {
        match &self.retry_if {
            Some(f) => f(e),
            None => matches!(e, ItemError::User(_) | ItemError::Timeout(_)),
        }
    }

    /// The delay hint carried by `e`, if any.
    pub fn hint_of(&self, e: &ItemError) -> Option<Duration> {
        match &self.hint {
            Some(f) => f(e),
            None => RetryAfter::find(e),
        }
    }

    /// The delay before retry `k` for error `e`; `rand` is a uniform draw in `[0, 1)`. A
    /// hint is outside input (a server's `Retry-After`): cut to `max_delay` when one is
    /// given; without, a hint over [`Retry::WAIT_CAP`] is refused (`Err` with the hint).
    fn next_delay(&self, k: u32, e: &ItemError, rand: f64) -> Result<Duration, Duration> {
        if let Some(h) = self.hint_of(e) {
            return match self.max_delay {
                Some(cap) => Ok(h.min(cap)),
                None if h > Self::WAIT_CAP => Err(h),
                None => Ok(h),
            };
        }
        let d = self.delay_for(k);
        Ok(if self.jitter { d.mul_f64(rand) } else { d })
    }

    pub(crate) fn invalid(&self) -> Option<Invalid> {
        if self.max_attempts == 0 {
            return Some(("retry.max_attempts", "0".into(), "must be at least 1"));
        }
        if let Backoff::Exponential { factor, .. } = self.backoff {
            if !(factor >= 1.0 && factor.is_finite()) {
                return Some(("retry.factor", format!("{factor}"), "must be a number ≥ 1"));
            }
        }
        if let Some(f) = self.stray_factor {
            return Some((
                "retry.factor",
                format!("{f}"),
                "only an exponential backoff has a factor",
            ));
        }
        match self.backoff {
            Backoff::Exponential { base, .. } | Backoff::Fibonacci(base) if base.is_zero() => {
                return Some((
                    "retry.base",
                    "0ns".into(),
                    "must be more than zero (Retry::constant(Duration::ZERO) retries at once)",
                ));
            }
            _ => {}
        }
        if self.max_delay == Some(Duration::ZERO) {
            return Some(("retry.max_delay", "0ns".into(), "must be more than zero"));
        }
        if self.max_elapsed == Some(Duration::ZERO) {
            return Some(("retry.max_elapsed", "0ns".into(), "must be more than zero"));
        }
        if let Some(b) = &self.budget {
            if !(b.ratio >= 0.0 && b.ratio <= 1.0) {
                return Some((
                    "retry.budget",
                    format!("{}", b.ratio),
                    "ratio must be within 0..=1",
                ));
            }
        }
        None
    }

    /// This policy's state for one stage.
    pub(crate) fn stage(&self) -> Box<dyn RetryPolicy> {
        Box::new(Retrying {
            cfg: self.clone(),
            rng: crate::util::jitter::Jitter::new(),
            fresh: 0,
        })
    }
}

/// A retry policy as one stage uses it.
struct Retrying {
    cfg: Retry,
    rng: crate::util::jitter::Jitter,
    /// First attempts not yet deposited in the retry budget.
    fresh: u64,
}

impl RetryPolicy for Retrying {
    fn first_attempt(&mut self) {
        self.fresh += 1;
    }

    fn needs_first_at(&self) -> bool {
        self.cfg.max_elapsed.is_some()
    }

    fn again(&mut self, f: &Failed<'_>) -> Again {
        let cfg = &self.cfg;
        if f.attempts >= cfg.max_attempts || !cfg.is_retryable(f.error) {
            return Again::No;
        }
        let rand = self.rng.next();
        let cfg = &self.cfg;
        let delay = match cfg.next_delay(f.attempts, f.error, rand) {
            Ok(d) => d,
            Err(hint) => {
                return Again::GiveUp(HintTooLong::error(hint, Cap::OneWait, f.error));
            }
        };
        let at = crate::util::time::after(Instant::now(), delay);
        if let (Some(limit), Some(first)) = (cfg.max_elapsed, f.first_at) {
            if at.duration_since(first) > limit {
                return match cfg.hint_of(f.error) {
                    Some(hint) => Again::GiveUp(HintTooLong::error(hint, Cap::MaxElapsed, f.error)),
                    None => Again::No,
                };
            }
        }
        if let Some(b) = &cfg.budget {
            if !b.deposit_and_withdraw(std::mem::take(&mut self.fresh), true) {
                return Again::No;
            }
        }
        Again::At(at)
    }

    fn pauses_source(&self) -> bool {
        self.cfg.pause_source
    }
}

/// A server asked for a wait the retry policy does not allow: the item fails with this, its
/// source the call's own error.
#[derive(Debug)]
struct HintTooLong {
    hint: Duration,
    cap: Cap,
    error: ItemError,
}

/// Which bound a server's requested wait broke.
#[derive(Debug, Clone, Copy)]
enum Cap {
    /// Longer than [`Retry::WAIT_CAP`], the cap of any one wait.
    OneWait,
    /// The wait would end past the retry's `max_elapsed`.
    MaxElapsed,
}

impl HintTooLong {
    fn error(hint: Duration, cap: Cap, error: &ItemError) -> ItemError {
        ItemError::user(HintTooLong {
            hint,
            cap,
            error: error.clone(),
        })
    }
}

impl fmt::Display for HintTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cap = match self.cap {
            Cap::MaxElapsed => "past the retry's max_elapsed".to_string(),
            Cap::OneWait => format!("over the {:?} cap of one wait", Retry::WAIT_CAP),
        };
        write!(
            f,
            "not retried: the error asks to wait {:?}, {cap}: {}",
            self.hint, self.error
        )
    }
}

impl std::error::Error for HintTooLong {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// An error that tells when to retry (an HTTP `Retry-After`, a rate-limit reset). Return it
/// (or wrap it as the `source` of your error) from a fallible stage and a [`Retry`] waits
/// exactly that long before the next attempt.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let t = tokio::time::Instant::now();
/// let first = std::sync::atomic::AtomicBool::new(true);
/// let out = Pipeline::from_iter([1u32])
///     .try_map_async("api", move |x| {
///         let throttled = first.swap(false, std::sync::atomic::Ordering::SeqCst);
///         async move {
///             if throttled { Err(RetryAfter::new(Duration::from_secs(3), "429 Too Many Requests")) } else { Ok(x) }
///         }
///     })
///     .retry(Retry::constant(Duration::from_millis(10)))
///     .collect().await.unwrap();
/// assert_eq!((out, t.elapsed()), (vec![1], Duration::from_secs(3)));
/// # }
/// ```
#[derive(Debug)]
pub struct RetryAfter {
    /// How long to wait.
    pub delay: Duration,
    /// What went wrong.
    pub error: BoxError,
}

impl RetryAfter {
    /// An error asking to be retried after `delay`.
    pub fn new(delay: Duration, error: impl Into<BoxError>) -> Self {
        RetryAfter {
            delay,
            error: error.into(),
        }
    }

    /// Finds a `RetryAfter` in `e` or its chain of sources.
    fn find(e: &ItemError) -> Option<Duration> {
        let ItemError::User(inner) = e else {
            return None;
        };
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&**inner);
        while let Some(err) = cur {
            if let Some(r) = err.downcast_ref::<RetryAfter>() {
                return Some(r.delay);
            }
            cur = err.source();
        }
        None
    }
}

impl fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (retry after {:?})", self.error, self.delay)
    }
}

impl std::error::Error for RetryAfter {}

struct BudgetState {
    balance: f64,
}

/// A retry budget: retries may be at most `ratio` of first attempts (plus a small reserve),
/// so that a failing backend gets at most `1 + ratio` times its normal load instead of
/// `max_attempts` times. Clones share one budget (across stages and pipelines).
///
/// Each first attempt deposits `ratio`; each retry withdraws 1; the balance starts at the
/// reserve (default 10 retries) and is capped at `reserve + 100 · ratio`... so a long healthy
/// period does not bank an unbounded storm of retries.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let budget = RetryBudget::ratio(0.1).reserve(0);
/// let report = Pipeline::from_iter(0..100u32)
///     .try_map_async("down", |_| async { Err::<u32, _>("503") })   // everything fails
///     .retry(Retry::constant(Duration::from_millis(1)).max_attempts(10).budget(budget))
///     .run().await.unwrap();
/// assert_eq!(report.failures, 100);
/// assert!(report.stage("down").unwrap().retried <= 10);          // not 900
/// # }
/// ```
#[derive(Clone)]
#[must_use = "an option set does nothing until it is passed to a stage or source"]
pub struct RetryBudget {
    ratio: f64,
    reserve: f64,
    state: Arc<Mutex<BudgetState>>,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RetryBudget(ratio {}, balance {:.2})",
            self.ratio,
            self.balance()
        )
    }
}

impl RetryBudget {
    /// Retries ≤ `ratio` × first attempts (`ratio` within `0..=1`).
    pub fn ratio(ratio: f64) -> Self {
        RetryBudget {
            ratio,
            reserve: 10.0,
            state: Arc::new(Mutex::new(BudgetState { balance: 10.0 })),
        }
    }

    /// Retries allowed before any first attempt has deposited (default 10).
    pub fn reserve(self, retries: u32) -> Self {
        RetryBudget {
            ratio: self.ratio,
            reserve: retries as f64,
            state: Arc::new(Mutex::new(BudgetState {
                balance: retries as f64,
            })),
        }
    }

    /// Retries the budget allows now.
    ///
    /// ```
    /// assert_eq!(flowline::RetryBudget::ratio(0.2).balance(), 10.0);
    /// ```
    pub fn balance(&self) -> f64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).balance
    }

    /// Deposits for `first_attempts` new calls and tries to withdraw one retry.
    fn deposit_and_withdraw(&self, first_attempts: u64, withdraw: bool) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let cap = self.reserve + 100.0 * self.ratio;
        s.balance = (s.balance + first_attempts as f64 * self.ratio).min(cap.max(s.balance));
        if !withdraw {
            return false;
        }
        if s.balance >= 1.0 {
            s.balance -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoffs_grow_as_configured() {
        let ms = Duration::from_millis;
        let e = Retry::exponential(ms(10));
        assert_eq!(
            (1..=4).map(|k| e.delay_for(k)).collect::<Vec<_>>(),
            [ms(10), ms(20), ms(40), ms(80)]
        );
        let f = Retry::fibonacci(ms(10));
        assert_eq!(
            (1..=5).map(|k| f.delay_for(k)).collect::<Vec<_>>(),
            [ms(10), ms(10), ms(20), ms(30), ms(50)]
        );
        let c = Retry::constant(ms(7)).max_delay(ms(5));
        assert_eq!(c.delay_for(9), ms(5));
    }

    #[test]
    fn full_jitter_stays_within_the_delay() {
        let r = Retry::constant(Duration::from_millis(100)).jitter();
        let e = ItemError::user("x");
        assert_eq!(r.next_delay(1, &e, 0.0), Ok(Duration::ZERO));
        assert_eq!(r.next_delay(1, &e, 0.5), Ok(Duration::from_millis(50)));
    }

    #[test]
    fn hostile_delays_are_capped_at_the_wait_cap() {
        let hour = Duration::from_secs(3600);
        // A factor of f64::MAX overflows at the second retry; a base of Duration::MAX at
        // the first; a fibonacci base of Duration::MAX saturates.
        let f = Retry::exponential(Duration::from_millis(1)).factor(f64::MAX);
        assert!(f.invalid().is_none());
        assert_eq!(f.delay_for(1), Duration::from_millis(1));
        assert_eq!(f.delay_for(2), hour);
        assert_eq!(f.delay_for(u32::MAX), hour);
        assert_eq!(Retry::constant(Duration::MAX).delay_for(1), hour);
        assert_eq!(Retry::exponential(Duration::MAX).delay_for(7), hour);
        assert_eq!(Retry::fibonacci(Duration::MAX).delay_for(90), hour);
        // max_delay replaces the cap, above it as below.
        let r = Retry::constant(Duration::MAX).max_delay(2 * hour);
        assert_eq!(r.delay_for(1), 2 * hour);
        // NaN and infinite factors are rejected before a run.
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0] {
            let r = Retry::exponential(Duration::from_millis(1)).factor(bad);
            assert_eq!(r.invalid().unwrap().0, "retry.factor", "{bad}");
        }
    }

    #[test]
    fn a_hint_over_the_cap_is_refused_and_one_under_max_delay_is_cut() {
        let e = ItemError::user(RetryAfter::new(Duration::from_secs(u64::MAX), "429"));
        let r = Retry::constant(Duration::from_millis(10));
        assert_eq!(r.next_delay(1, &e, 0.5), Err(Duration::from_secs(u64::MAX)));
        let at_cap = ItemError::user(RetryAfter::new(Retry::WAIT_CAP, "429"));
        assert_eq!(r.next_delay(1, &at_cap, 0.5), Ok(Retry::WAIT_CAP));
        let cut = r.max_delay(Duration::from_secs(5));
        assert_eq!(cut.next_delay(1, &e, 0.5), Ok(Duration::from_secs(5)));
    }

    #[test]
    fn default_predicate_skips_panics_and_open_circuits() {
        let r = Retry::constant(Duration::ZERO);
        assert!(r.is_retryable(&ItemError::user("x")));
        assert!(r.is_retryable(&ItemError::Timeout(Duration::from_secs(1))));
        assert!(!r.is_retryable(&ItemError::Panic("p".into())));
        assert!(!r.is_retryable(&ItemError::CircuitOpen));
    }

    #[test]
    fn retry_after_is_found_in_the_source_chain() {
        #[derive(Debug)]
        struct Outer(RetryAfter);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("outer")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = ItemError::user(Outer(RetryAfter::new(Duration::from_secs(2), "429")));
        assert_eq!(
            Retry::constant(Duration::ZERO).hint_of(&e),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn budget_allows_ratio_of_first_attempts() {
        let b = RetryBudget::ratio(0.5).reserve(0);
        assert!(!b.deposit_and_withdraw(1, true)); // 0.5 < 1
        assert!(b.deposit_and_withdraw(1, true)); // 1.0
        assert!(!b.deposit_and_withdraw(0, true));
        assert!(b.deposit_and_withdraw(4, true)); // 2.0 -> 1.0 left
        assert!(b.deposit_and_withdraw(0, true));
        assert!(!b.deposit_and_withdraw(0, true));
    }

    #[test]
    fn invalid_settings_are_named() {
        assert_eq!(
            Retry::constant(Duration::ZERO)
                .max_attempts(0)
                .invalid()
                .unwrap()
                .0,
            "retry.max_attempts"
        );
        assert_eq!(
            Retry::exponential(Duration::ZERO)
                .factor(0.5)
                .invalid()
                .unwrap()
                .0,
            "retry.factor"
        );
        let b = Retry::constant(Duration::ZERO).budget(RetryBudget::ratio(1.5));
        assert_eq!(b.invalid().unwrap().1, "1.5");
    }

    mod stage {
        use crate::prelude::*;
        use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
        use std::sync::{Arc, Mutex};
        use std::time::Duration;
        use tokio::time::Instant;

        #[tokio::test(start_paused = true)]
        async fn delays_and_attempts_are_as_configured() {
            let t0 = Instant::now();
            let calls = Arc::new(Mutex::new(Vec::new()));
            let c = calls.clone();
            let report = Pipeline::from_iter([1u32])
                .try_map_async("down", move |_| {
                    c.lock().unwrap().push(t0.elapsed().as_millis() as u64);
                    async { Err::<u32, _>("503") }
                })
                .retry(Retry::exponential(Duration::from_millis(100)).max_attempts(4))
                .keep_input()
                .run()
                .await
                .unwrap();
            assert_eq!(*calls.lock().unwrap(), vec![0, 100, 300, 700]);
            let f = &report.failure_sample[0];
            assert_eq!((f.attempts, f.error.to_string()), (4, "503".to_string()));
            assert_eq!(f.input.as_ref().unwrap().downcast_ref::<u32>(), Some(&1));
            let s = report.stage("down").unwrap();
            assert_eq!((s.received, s.failed, s.retried), (1, 1, 3));
            assert!(report.is_balanced());
        }

        #[tokio::test(start_paused = true)]
        async fn each_attempt_honours_the_stage_timeout() {
            let t0 = Instant::now();
            let report = Pipeline::from_iter([1u32])
                .map_async("slow", |x| async move {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    x
                })
                .timeout(Duration::from_millis(50))
                .retry(Retry::constant(Duration::from_millis(10)).max_attempts(3))
                .run()
                .await
                .unwrap();
            assert_eq!(t0.elapsed(), Duration::from_millis(3 * 50 + 2 * 10));
            assert!(matches!(
                report.failure_sample[0].error,
                ItemError::Timeout(_)
            ));
        }

        #[tokio::test(start_paused = true)]
        async fn max_elapsed_stops_before_the_attempts_run_out() {
            let calls = Arc::new(AtomicU32::new(0));
            let c = calls.clone();
            Pipeline::from_iter([1u32])
                .try_map_async("down", move |_| {
                    c.fetch_add(1, SeqCst);
                    async { Err::<u32, _>("503") }
                })
                .retry(
                    Retry::constant(Duration::from_millis(100))
                        .max_attempts(100)
                        .max_elapsed(Duration::from_millis(350)),
                )
                .run()
                .await
                .unwrap();
            assert_eq!(calls.load(SeqCst), 4); // at 0, 100, 200, 300; 400 > 350
        }

        #[tokio::test(start_paused = true)]
        async fn the_budget_stops_retries() {
            let report = Pipeline::from_iter(0..10u32)
                .try_map_async("down", |_| async { Err::<u32, _>("503") })
                .retry(
                    Retry::constant(Duration::from_millis(1))
                        .max_attempts(10)
                        .budget(RetryBudget::ratio(0.5).reserve(0)),
                )
                .run()
                .await
                .unwrap();
            assert_eq!(report.failures, 10);
            assert_eq!(report.stage("down").unwrap().retried, 5); // 10 first attempts × 0.5
        }

        #[tokio::test(start_paused = true)]
        async fn retry_after_replaces_the_backoff() {
            let t0 = Instant::now();
            let calls = Arc::new(Mutex::new(Vec::new()));
            let c = calls.clone();
            Pipeline::from_iter([1u32])
                .try_map_async("api", move |x| {
                    let mut calls = c.lock().unwrap();
                    calls.push(t0.elapsed().as_millis() as u64);
                    let first = calls.len() == 1;
                    async move {
                        if first {
                            Err(RetryAfter::new(Duration::from_secs(2), "429"))
                        } else {
                            Ok(x)
                        }
                    }
                })
                .retry(Retry::constant(Duration::from_millis(10)))
                .run()
                .await
                .unwrap();
            assert_eq!(*calls.lock().unwrap(), vec![0, 2000]);
        }

        /// One item whose first call answers `429` with a `RetryAfter` of `hint`: the
        /// report, how long the run took and the call count.
        async fn hinted(hint: Duration, retry: Retry) -> (Report, Duration, u32) {
            let t0 = Instant::now();
            let calls = Arc::new(AtomicU32::new(0));
            let c = calls.clone();
            let report = Pipeline::from_iter([1u32])
                .try_map_async("api", move |x| {
                    let first = c.fetch_add(1, SeqCst) == 0;
                    async move {
                        if first {
                            Err(RetryAfter::new(hint, "429 Too Many Requests"))
                        } else {
                            Ok(x)
                        }
                    }
                })
                .retry(retry)
                .run()
                .await
                .unwrap();
            (report, t0.elapsed(), calls.load(SeqCst))
        }

        #[tokio::test(start_paused = true)]
        async fn a_hint_of_u64_max_seconds_fails_the_item_at_once_with_its_reason() {
            let hint = Duration::from_secs(u64::MAX);
            let (report, took, calls) =
                hinted(hint, Retry::constant(Duration::from_millis(10))).await;
            assert_eq!((took, calls, report.failures), (Duration::ZERO, 1, 1));
            let f = &report.failure_sample[0];
            let text = f.error.to_string();
            assert!(
                text.starts_with("not retried: the error asks to wait"),
                "{text}"
            );
            assert!(text.contains("over the 3600s cap of one wait"), "{text}");
            assert!(
                text.ends_with("429 Too Many Requests (retry after 18446744073709551615s)"),
                "{text}"
            );
            assert_eq!(f.attempts, 1);
            assert!(report.is_balanced());
        }

        #[tokio::test(start_paused = true)]
        async fn a_hint_past_max_elapsed_fails_the_item_saying_so() {
            let retry =
                Retry::constant(Duration::from_millis(10)).max_elapsed(Duration::from_secs(60));
            let (report, took, calls) = hinted(Duration::from_secs(61), retry).await;
            assert_eq!((took, calls, report.failures), (Duration::ZERO, 1, 1));
            let text = report.failure_sample[0].error.to_string();
            assert!(text.contains("past the retry's max_elapsed"), "{text}");
            // Within it, the hint is waited out.
            let retry =
                Retry::constant(Duration::from_millis(10)).max_elapsed(Duration::from_secs(60));
            let (report, took, calls) = hinted(Duration::from_secs(59), retry).await;
            assert_eq!(
                (took, calls, report.delivered()),
                (Duration::from_secs(59), 2, 1)
            );
        }

        #[tokio::test(start_paused = true)]
        async fn a_hint_over_max_delay_waits_max_delay() {
            let retry =
                Retry::constant(Duration::from_millis(10)).max_delay(Duration::from_secs(5));
            let (report, took, calls) = hinted(Duration::from_secs(u64::MAX), retry).await;
            assert_eq!(
                (took, calls, report.delivered()),
                (Duration::from_secs(5), 2, 1)
            );
        }

        #[tokio::test(start_paused = true)]
        async fn a_delay_of_duration_max_waits_the_cap_not_forever() {
            let (report, took, calls) = failing(1, Retry::constant(Duration::MAX)).await;
            assert_eq!((took, calls, report.delivered()), (Retry::WAIT_CAP, 2, 1));
            let (report, took, calls) = failing(
                u32::MAX,
                Retry::exponential(Duration::from_secs(1))
                    .factor(f64::MAX)
                    .max_attempts(3),
            )
            .await;
            // 1 s, then the factor overflows: the cap.
            assert_eq!(calls, 3);
            assert_eq!(took, Duration::from_secs(1) + Retry::WAIT_CAP);
            assert_eq!(report.failures, 1);
        }

        /// One item whose first `fails` calls fail (with no hint).
        async fn failing(fails: u32, retry: Retry) -> (Report, Duration, u32) {
            let t0 = Instant::now();
            let calls = Arc::new(AtomicU32::new(0));
            let c = calls.clone();
            let report = Pipeline::from_iter([1u32])
                .try_map_async("api", move |x| {
                    let n = c.fetch_add(1, SeqCst);
                    async move { if n < fails { Err("503") } else { Ok(x) } }
                })
                .retry(retry)
                .run()
                .await
                .unwrap();
            (report, t0.elapsed(), calls.load(SeqCst))
        }

        #[tokio::test(start_paused = true)]
        async fn a_retrying_item_does_not_block_other_items() {
            let t0 = Instant::now();
            let first = Arc::new(AtomicU32::new(0));
            let f = first.clone();
            let out = Pipeline::from_iter(0..4u32)
                .try_map_async("api", move |x| {
                    let fail = x == 0 && f.fetch_add(1, SeqCst) == 0;
                    async move {
                        if fail {
                            return Err("flaky");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Ok((x, t0.elapsed().as_millis() as u64))
                    }
                })
                .workers(1)
                .unordered()
                .retry(Retry::constant(Duration::from_secs(1)))
                .collect()
                .await
                .unwrap();
            // The one worker serves items 1..3 while item 0 waits out its backoff.
            assert_eq!(out, vec![(1, 10), (2, 20), (3, 30), (0, 1010)]);
        }

        /// Items come from a generator that logs when it is asked for the next one.
        async fn pulls_during_backoff(pause: bool) -> Vec<u64> {
            let t0 = Instant::now();
            let pulls = Arc::new(Mutex::new(Vec::new()));
            let p = pulls.clone();
            let mut n = 0u32;
            let source = Pipeline::from_fn(move || {
                p.lock().unwrap().push(t0.elapsed().as_millis() as u64);
                n += 1;
                let k = n;
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    (k <= 20).then_some(k)
                }
            });
            let failed = Arc::new(AtomicU32::new(0));
            let mut retry = Retry::constant(Duration::from_millis(500));
            if pause {
                retry = retry.pause_source();
            }
            let report = source
                .try_map_async("api", move |x| {
                    let fail = x == 1 && failed.fetch_add(1, SeqCst) == 0;
                    async move { if fail { Err("flaky") } else { Ok(x) } }
                })
                .workers(4)
                .retry(retry)
                .run()
                .await
                .unwrap();
            assert_eq!(report.delivered(), 20);
            let pulls = pulls.lock().unwrap().clone();
            pulls.into_iter().filter(|t| *t > 10 && *t < 510).collect()
        }

        /// Call starts (time, item) of a stage whose item 0 fails once after 10 ms and
        /// backs off 500 ms; the other items are all buffered in the stage from the start.
        async fn starts_around_a_backoff(pause: bool) -> Vec<(u64, u32)> {
            let t0 = Instant::now();
            let starts = Arc::new(Mutex::new(Vec::new()));
            let s = starts.clone();
            let failed = Arc::new(AtomicU32::new(0));
            let mut retry = Retry::constant(Duration::from_millis(500));
            if pause {
                retry = retry.pause_source();
            }
            let out = Pipeline::from_iter(0..100u32)
                .try_map_async("api", move |x| {
                    s.lock().unwrap().push((t0.elapsed().as_millis() as u64, x));
                    let fail = x == 0 && failed.fetch_add(1, SeqCst) == 0;
                    async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        if fail { Err("503") } else { Ok(x) }
                    }
                })
                .workers(4)
                .retry(retry)
                .collect()
                .await
                .unwrap();
            assert_eq!(out, (0..100).collect::<Vec<_>>());
            starts.lock().unwrap().clone()
        }

        #[tokio::test(start_paused = true)]
        async fn pause_source_starts_no_new_item_during_the_backoff() {
            let during = |starts: &[(u64, u32)]| {
                starts.iter().filter(|(t, _)| (10..510).contains(t)).count()
            };
            assert!(
                during(&starts_around_a_backoff(false).await) > 0,
                "without it, buffered items keep starting"
            );
            let starts = starts_around_a_backoff(true).await;
            assert_eq!(during(&starts), 0, "{starts:?}");
            // At the backoff's end the failed item goes first, then the job goes on.
            assert_eq!(starts[4], (510, 0));
            assert_eq!(starts.len(), 101);
        }

        #[tokio::test(start_paused = true)]
        async fn pause_source_freezes_the_source_during_the_backoff() {
            assert!(
                !pulls_during_backoff(false).await.is_empty(),
                "without it, pulling goes on"
            );
            assert_eq!(pulls_during_backoff(true).await, Vec::<u64>::new());
        }
    }
}
