//! `Outage`: how long a run rides out a server it needs being down, and how it waits.
//!
//! Every part of flowline that talks to a server (a store, a checkpoint store, a stream
//! source, its acks and leases, a shared limit) goes through one [`Outage`]: a failed
//! request is tried again after a jittered, growing wait; while it fails the part does not
//! move on (no new pulls, no new calls, no checkpoint past an unfinished item), so the job
//! pauses; when the server answers again the job resumes by itself. Only an outage longer
//! than the policy's limit ends the run, with an [`OutageError`] naming the server and the
//! last error. Items are never failed for it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::failure::BoxError;
use crate::fault::transient::is_permanent;
use crate::util::jitter::Jitter;
use crate::util::time::FAR;

/// How long a run keeps trying a server that fails, and how long it waits between tries.
///
/// The default keeps trying for [`Outage::DEFAULT_LIMIT`] (5 minutes), waiting 50 ms after
/// the first failure, doubling up to 1 s, each wait drawn between half and all of that (so
/// many workers do not retry in step). A server back after a long outage is found again
/// within about a second.
///
/// ```
/// use flowline::Outage;
/// use std::time::Duration;
/// let o = Outage::keep_trying_for(Duration::from_secs(30))
///     .backoff(Duration::from_millis(100), Duration::from_secs(2));
/// assert_eq!(o.limit(), Some(Duration::from_secs(30)));
/// assert_eq!(Outage::default().limit(), Some(Outage::DEFAULT_LIMIT));
/// assert_eq!(Outage::forever().limit(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    limit: Option<Duration>,
    min: Duration,
    max: Duration,
}

impl Default for Outage {
    fn default() -> Self {
        Outage {
            limit: Some(Self::DEFAULT_LIMIT),
            min: Duration::from_millis(50),
            max: Duration::from_secs(1),
        }
    }
}

impl Outage {
    /// How long the default policy keeps trying: 5 minutes, longer than a server restart or
    /// a failover takes, short enough that a job whose server is gone says so the same hour.
    pub const DEFAULT_LIMIT: Duration = Duration::from_secs(300);

    /// Keeps trying for `limit` from the first failure of an outage, then gives up. Zero
    /// gives up at the first failure (nothing is retried). `Duration::MAX` is the same as
    /// [`forever`](Outage::forever).
    ///
    /// ```
    /// let o = flowline::Outage::keep_trying_for(std::time::Duration::ZERO);
    /// assert_eq!(o.limit(), Some(std::time::Duration::ZERO));
    /// ```
    pub fn keep_trying_for(limit: Duration) -> Self {
        Outage {
            limit: (limit < FAR).then_some(limit),
            ..Self::default()
        }
    }

    /// Never gives up: the job waits for its servers as long as it runs (a deadline or a
    /// cancel still ends it).
    ///
    /// ```
    /// assert_eq!(flowline::Outage::forever().limit(), None);
    /// ```
    pub fn forever() -> Self {
        Outage {
            limit: None,
            ..Self::default()
        }
    }

    /// The first wait after a failure (`min`) and the longest (`max`); each failure in a row
    /// doubles the wait. `min` is at least 1 ms and `max` at least `min` (smaller values are
    /// raised to that); both are capped at one hour, so a hostile value cannot park a job.
    ///
    /// ```
    /// use flowline::Outage;
    /// use std::time::Duration;
    /// let o = Outage::default().backoff(Duration::ZERO, Duration::MAX);
    /// assert_eq!(o.backoff_range(), (Duration::from_millis(1), Duration::from_secs(3600)));
    /// ```
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        const HOUR: Duration = Duration::from_secs(3600);
        self.min = min.clamp(Duration::from_millis(1), HOUR);
        self.max = max.clamp(self.min, HOUR);
        self
    }

    /// How long an outage is ridden out before giving up (`None`: forever).
    ///
    /// ```
    /// assert!(flowline::Outage::default().limit().is_some());
    /// ```
    pub fn limit(&self) -> Option<Duration> {
        self.limit
    }

    /// The shortest and the longest wait between two tries.
    ///
    /// ```
    /// let (min, max) = flowline::Outage::default().backoff_range();
    /// assert!(min < max);
    /// ```
    pub fn backoff_range(&self) -> (Duration, Duration) {
        (self.min, self.max)
    }

    /// The state of one part's requests to `server` under this policy, for a loop that
    /// cannot be written as one [`retry`](Outage::retry) (a source's read loop, a committer).
    ///
    /// ```
    /// use flowline::Outage;
    /// use std::time::Duration;
    /// let mut state = Outage::keep_trying_for(Duration::from_secs(10)).watch("redis 127.0.0.1:6379");
    /// let wait = state.failed("connection refused").unwrap();     // wait, then try again
    /// assert!(wait <= Duration::from_millis(50) && state.is_down());
    /// state.succeeded();
    /// assert!(!state.is_down());
    /// ```
    pub fn watch(&self, server: impl Into<Arc<str>>) -> OutageWatch {
        OutageWatch {
            policy: *self,
            server: server.into(),
            since: None,
            attempts: 0,
            jitter: Jitter::new(),
        }
    }

    /// Runs `op` until it succeeds: after each failure it waits (see
    /// [`backoff`](Outage::backoff)) and tries again, until the outage has lasted longer than
    /// the limit. An error marked [`Permanent`](crate::Permanent) is not retried. The first
    /// failure is logged at `warn`, the recovery at `info`, with the server's name.
    ///
    /// ```
    /// use flowline::Outage;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let mut tries = 0;
    /// let v = Outage::default()
    ///     .retry("db", || { tries += 1; let t = tries; async move {
    ///         if t < 3 { Err("connection reset") } else { Ok(t) }
    ///     }})
    ///     .await
    ///     .unwrap();
    /// assert_eq!(v, 3);
    ///
    /// let err = Outage::keep_trying_for(Duration::from_secs(2))
    ///     .retry("db", || async { Err::<(), _>("connection refused") })
    ///     .await
    ///     .unwrap_err();
    /// assert_eq!(err.server(), "db");
    /// assert!(err.to_string().contains("connection refused"));
    /// # }
    /// ```
    pub async fn retry<T, E, F, Fut>(&self, server: &str, mut op: F) -> Result<T, OutageError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        let mut watch = self.watch(server);
        loop {
            match op().await {
                Ok(v) => {
                    watch.succeeded();
                    return Ok(v);
                }
                Err(e) => {
                    let wait = watch.failed(e)?;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// One part's view of its server under an [`Outage`] policy: whether the server is down,
/// since when, and how long to wait before the next try. Made by [`Outage::watch`].
///
/// ```
/// use flowline::Outage;
/// use std::time::Duration;
/// let mut w = Outage::keep_trying_for(Duration::ZERO).watch("db");
/// let err = w.failed("connection refused").unwrap_err();       // a zero limit: give up at once
/// assert_eq!(err.attempts(), 1);
/// ```
#[derive(Debug)]
pub struct OutageWatch {
    policy: Outage,
    server: Arc<str>,
    /// When the current outage began (its first failure), if the server is down.
    since: Option<Instant>,
    /// Failures in a row.
    attempts: u32,
    jitter: Jitter,
}

impl OutageWatch {
    /// A request failed with `error`. Returns how long to wait before the next try, or the
    /// error that ends the run: the outage outlasted the policy, or the error is
    /// [`Permanent`](crate::Permanent).
    pub fn failed(&mut self, error: impl Into<BoxError>) -> Result<Duration, OutageError> {
        let error: BoxError = error.into();
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        self.attempts = self.attempts.saturating_add(1);
        let elapsed = now - since;
        let give_up =
            is_permanent(&*error) || self.policy.limit.is_some_and(|limit| elapsed >= limit);
        if give_up {
            return Err(OutageError {
                server: self.server.clone(),
                error: Arc::from(error),
                elapsed,
                attempts: self.attempts,
            });
        }
        if self.attempts == 1 {
            tracing::warn!(
                server = %self.server,
                error = %crate::fault::error_chain(&*error),
                "server unreachable; the job waits for it and tries again"
            );
        } else {
            tracing::debug!(server = %self.server, attempts = self.attempts, error = %error, "still unreachable");
        }
        // Doubling from `min`, capped at `max`; then drawn from [wait/2, wait].
        let doublings = (self.attempts - 1).min(30);
        let wait = self
            .policy
            .min
            .saturating_mul(1u32 << doublings)
            .min(self.policy.max);
        let wait = wait.mul_f64(0.5 + 0.5 * self.jitter.next());
        // Never wait past the point of giving up by more than one wait.
        Ok(match self.policy.limit {
            Some(limit) => wait
                .min(limit.saturating_sub(elapsed))
                .max(Duration::from_millis(1)),
            None => wait,
        })
    }

    /// A request succeeded: the outage (if any) is over. Returns how long it lasted.
    pub fn succeeded(&mut self) -> Option<Duration> {
        let since = self.since.take()?;
        let lasted = since.elapsed();
        tracing::info!(server = %self.server, after = ?lasted, attempts = self.attempts, "server back; the job goes on");
        self.attempts = 0;
        Some(lasted)
    }

    /// Whether the last request failed (the server is taken to be down).
    pub fn is_down(&self) -> bool {
        self.since.is_some()
    }

    /// The server's name, as given to [`Outage::watch`].
    pub fn server(&self) -> &str {
        &self.server
    }
}

/// A server stayed unreachable longer than the run's [`Outage`] policy allows, or answered
/// with an error that trying again cannot fix ([`Permanent`](crate::Permanent)). The items
/// that needed it are left unfinished, never failed: a rerun does them.
///
/// Its `Display` is one readable line: the server, how long it was tried, and the last error
/// with its causes.
///
/// ```
/// use flowline::Outage;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let err = Outage::keep_trying_for(std::time::Duration::from_secs(1))
///     .retry("postgres 127.0.0.1:5432", || async { Err::<(), _>("connection refused") })
///     .await
///     .unwrap_err();
/// assert!(err.to_string().starts_with("postgres 127.0.0.1:5432 unreachable for 1"), "{err}");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct OutageError {
    server: Arc<str>,
    error: Arc<dyn std::error::Error + Send + Sync + 'static>,
    elapsed: Duration,
    attempts: u32,
}

impl OutageError {
    /// The server's name.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The last error the server gave.
    pub fn last_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }

    /// How long the outage had lasted when it was given up (zero for a permanent error at
    /// the first try).
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// How many tries failed in a row.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether it ended because the error cannot be fixed by trying again, rather than by
    /// the outage outlasting the policy.
    pub fn is_permanent(&self) -> bool {
        is_permanent(&*self.error)
    }
}

impl fmt::Display for OutageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = crate::fault::error_chain(&*self.error);
        if self.is_permanent() {
            write!(f, "{}: {last}", self.server)
        } else {
            write!(
                f,
                "{} unreachable for {:.1?} ({} tries); gave up. Last error: {last}",
                self.server, self.elapsed, self.attempts
            )
        }
    }
}

impl std::error::Error for OutageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Permanent;

    #[tokio::test(start_paused = true)]
    async fn gives_up_once_the_limit_has_passed_and_not_before() {
        let start = Instant::now();
        let mut tries = Vec::new();
        let err = Outage::keep_trying_for(Duration::from_secs(3))
            .retry("s", || {
                tries.push(start.elapsed());
                async { Err::<(), _>("down") }
            })
            .await
            .unwrap_err();
        let last = *tries.last().unwrap();
        assert_eq!(last, Duration::from_secs(3), "{tries:?}");
        assert_eq!(err.elapsed(), Duration::from_secs(3));
        assert_eq!(err.attempts() as usize, tries.len());
        // Waits grow from 25–50 ms to at most 1 s.
        for pair in tries.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(1) && gap <= Duration::from_secs(1),
                "{gap:?}"
            );
        }
        assert!(tries[1] <= Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_back_is_tried_within_the_longest_wait() {
        // Down for 10 s: the first success comes at most one `max` wait after it is back.
        let start = Instant::now();
        let back = Duration::from_secs(10);
        let at = Outage::default()
            .retry("s", || {
                let up = start.elapsed() >= back;
                async move { if up { Ok(start.elapsed()) } else { Err("down") } }
            })
            .await
            .unwrap();
        assert!(at >= back && at <= back + Duration::from_secs(1), "{at:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_is_not_retried() {
        let mut n = 0;
        let err = Outage::forever()
            .retry("s", || {
                n += 1;
                async { Err::<(), _>(Permanent::new("WRONGTYPE")) }
            })
            .await
            .unwrap_err();
        assert_eq!(n, 1);
        assert!(err.is_permanent());
        assert_eq!(err.to_string(), "s: WRONGTYPE");
    }

    #[tokio::test(start_paused = true)]
    async fn forever_keeps_trying_past_the_default_limit() {
        let start = Instant::now();
        let v = Outage::forever()
            .retry("s", || {
                let up = start.elapsed() >= Duration::from_secs(3600);
                async move { if up { Ok(()) } else { Err("down") } }
            })
            .await;
        assert!(v.is_ok());
    }

    #[test]
    fn hostile_backoffs_are_brought_into_range() {
        let o = Outage::default().backoff(Duration::from_secs(10), Duration::ZERO);
        assert_eq!(
            o.backoff_range(),
            (Duration::from_secs(10), Duration::from_secs(10))
        );
        let o = Outage::keep_trying_for(Duration::MAX);
        assert_eq!(o.limit(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_resets_after_a_success() {
        let mut w = Outage::keep_trying_for(Duration::from_secs(1)).watch("s");
        w.failed("x").unwrap();
        tokio::time::advance(Duration::from_millis(900)).await;
        w.failed("x").unwrap();
        assert_eq!(w.succeeded(), Some(Duration::from_millis(900)));
        // A new outage has its own second.
        tokio::time::advance(Duration::from_secs(5)).await;
        w.failed("x").unwrap();
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(w.failed("x").is_ok());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(w.failed("x").is_err());
    }
}
