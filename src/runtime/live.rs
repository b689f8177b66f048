//! Limits changed while a run goes on: each async stage's workers (and its rate), kept where
//! the stage's driver reads them before each call and where [`Control`](crate::Control)
//! changes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::Waker;

use futures_util::task::AtomicWaker;

use crate::Rate;
use crate::error::Error;
use crate::policy::inflight::live_invalid;

/// One async stage's limits as the run goes on.
pub(crate) struct LiveStage {
    pub(crate) name: Arc<str>,
    /// The most calls in flight; `usize::MAX` for an adaptive stage no one has capped.
    workers: AtomicUsize,
    worker_changes: AtomicU64,
    /// The stage's own rate (the first `rate_limit` given to it), if any.
    rate: Option<Rate>,
    rate_changes: AtomicU64,
    /// The stage's limit moves by itself (`adaptive`): `workers` caps it.
    adaptive: bool,
    /// The driver, woken when its limit is raised.
    driver: AtomicWaker,
}

impl LiveStage {
    pub(crate) fn new(name: Arc<str>, workers: usize, rate: Option<Rate>, adaptive: bool) -> Self {
        LiveStage {
            name,
            workers: AtomicUsize::new(if adaptive { usize::MAX } else { workers }),
            worker_changes: AtomicU64::new(0),
            rate,
            rate_changes: AtomicU64::new(0),
            adaptive,
            driver: AtomicWaker::new(),
        }
    }

    /// The most calls in flight, read before each call starts.
    #[inline]
    pub(crate) fn workers(&self) -> usize {
        self.workers.load(Relaxed)
    }

    /// The driver polls now: a raised limit wakes it.
    #[inline]
    pub(crate) fn register(&self, waker: &Waker) {
        self.driver.register(waker);
    }

    /// `n` was checked by [`LiveStages::set_workers`], the only way in.
    fn set_workers(&self, n: usize) {
        self.workers.store(n, Relaxed);
        self.worker_changes.fetch_add(1, Relaxed);
        self.driver.wake();
    }

    fn set_rate(&self, to: &Rate) -> Result<(), Error> {
        let Some(rate) = &self.rate else {
            return Err(Error::config_text(
                &self.name,
                "rate",
                format!("{to:?}"),
                "the stage has no rate_limit to change",
            ));
        };
        rate.set(to).map_err(|e| on_stage(e, &self.name))?;
        self.rate_changes.fetch_add(1, Relaxed);
        Ok(())
    }

    /// The limits now, for the report.
    pub(crate) fn report(&self) -> crate::report::LiveLimits {
        let workers = self.workers();
        crate::report::LiveLimits {
            workers: (workers != usize::MAX).then_some(workers),
            adaptive: self.adaptive,
            worker_changes: self.worker_changes.load(Relaxed),
            rate: self.rate.as_ref().map(Rate::count_per),
            rate_changes: self.rate_changes.load(Relaxed),
        }
    }
}

/// A change asked for before the run's stages were built.
enum Change {
    Workers(usize),
    Rate(Rate),
}

/// The run's async stages, by name, as [`Control`](crate::Control) finds them.
///
/// A run's stages are built by its task, when it first runs: a change asked for before
/// (right after `spawn`) has its value checked at once and is kept until then.
#[derive(Default)]
pub(crate) struct LiveStages(std::sync::Mutex<Stages>);

#[derive(Default)]
struct Stages {
    list: Vec<Arc<LiveStage>>,
    built: bool,
    pending: Vec<(String, Change)>,
}

impl LiveStages {
    pub(crate) fn add(&self, stage: Arc<LiveStage>) {
        self.lock().list.push(stage);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stages> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every stage is built: the changes asked for before apply now.
    pub(crate) fn built(&self) {
        let mut st = self.lock();
        st.built = true;
        for (name, change) in std::mem::take(&mut st.pending) {
            let applied = st.stage(&name).and_then(|s| match &change {
                Change::Workers(n) => {
                    s.set_workers(*n);
                    Ok(())
                }
                Change::Rate(r) => s.set_rate(r),
            });
            if let Err(e) = applied {
                tracing::warn!("a limit changed before the run started was not applied: {e}");
            }
        }
    }

    pub(crate) fn find(&self, name: &str) -> Option<Arc<LiveStage>> {
        self.lock().list.iter().find(|s| &*s.name == name).cloned()
    }

    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn all(&self) -> Vec<Arc<LiveStage>> {
        self.lock().list.clone()
    }

    pub(crate) fn set_workers(&self, stage: &str, n: usize) -> Result<(), Error> {
        if let Some((option, value, reason)) = live_invalid("workers", n) {
            return Err(Error::config_text(stage, option, value, reason));
        }
        let mut st = self.lock();
        if !st.built {
            st.pending.push((stage.to_string(), Change::Workers(n)));
            return Ok(());
        }
        st.stage(stage)?.set_workers(n);
        Ok(())
    }

    pub(crate) fn set_rate(&self, stage: &str, to: &Rate) -> Result<(), Error> {
        let mut st = self.lock();
        if st.built {
            // `Rate::set` checks the value.
            return st.stage(stage)?.set_rate(to);
        }
        to.check().map_err(|e| on_stage(e, stage))?;
        st.pending
            .push((stage.to_string(), Change::Rate(to.clone())));
        Ok(())
    }
}

impl Stages {
    fn stage(&self, name: &str) -> Result<&LiveStage, Error> {
        self.list
            .iter()
            .find(|s| &*s.name == name)
            .map(|s| &**s)
            .ok_or_else(|| {
                let known: Vec<&str> = self.list.iter().map(|s| &*s.name).collect();
                Error::config_text(
                    name,
                    "stage",
                    format!("{name:?} (async stages of the run: {})", known.join(", ")),
                    "no async stage of that name in the run",
                )
            })
    }
}

/// A configuration error of a value given for `stage`, with the stage's name.
fn on_stage(e: Error, stage: &str) -> Error {
    match e {
        Error::Config { mut problems } => {
            for p in &mut problems {
                p.stage = stage.to_string();
            }
            Error::Config { problems }
        }
        e => e,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    /// Each call's start: (time since `t0`, calls in flight with it).
    pub(crate) type Starts = Arc<Mutex<Vec<(Duration, usize)>>>;

    /// A call of `ms` that logs its start into `starts`.
    pub(crate) fn logged(
        ms: u64,
        t0: Instant,
        starts: &Starts,
    ) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = u64> + Send>>
    + Clone
    + Send
    + Sync
    + 'static {
        let now = Arc::new(AtomicUsize::new(0));
        let starts = starts.clone();
        move |x| {
            let n = now.fetch_add(1, SeqCst) + 1;
            starts.lock().unwrap().push((t0.elapsed(), n));
            let now = now.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                now.fetch_sub(1, SeqCst);
                x
            })
        }
    }

    pub(crate) fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Starts in `[from, to)`, and the most calls in flight any of them saw.
    pub(crate) fn between(starts: &Starts, from: u64, to: u64) -> (usize, usize) {
        let s = starts.lock().unwrap();
        let w: Vec<_> = s
            .iter()
            .filter(|(t, _)| *t >= ms(from) && *t < ms(to))
            .collect();
        (w.len(), w.iter().map(|(_, n)| *n).max().unwrap_or(0))
    }

    #[tokio::test(start_paused = true)]
    async fn workers_follow_a_raise_at_once_and_a_lowering_once_the_calls_in_flight_drain() {
        let t0 = Instant::now();
        let starts: Starts = Default::default();
        let handle = Pipeline::from_iter(0..u64::MAX)
            .map_async("api", logged(100, t0, &starts))
            .workers(4)
            .unordered()
            .spawn();
        tokio::time::sleep(ms(250)).await;
        assert_eq!(between(&starts, 0, 250), (12, 4)); // 4 at 0, 100, 200 ms
        handle.set_workers("api", 64).unwrap();
        tokio::time::sleep(ms(1)).await;
        // At the instant of the change: 60 more start beside the 4 of 200 ms.
        assert_eq!(between(&starts, 250, 251), (60, 64));
        tokio::time::sleep(ms(129)).await; // 380 ms: 4 started at 300 ms, 60 at 350 ms
        assert_eq!(between(&starts, 251, 380), (64, 64));
        handle.set_workers("api", 8).unwrap();
        tokio::time::sleep(ms(120)).await; // 500 ms
        // No call starts while 8 or more run: the 4 of 300 ms end at 400 ms (60 left),
        // the 60 of 350 ms at 450 ms; then 8 start, and never more than 8 run.
        assert_eq!(between(&starts, 380, 450), (0, 0));
        assert_eq!(between(&starts, 450, 451), (8, 8));
        tokio::time::sleep(ms(500)).await;
        assert_eq!(between(&starts, 451, 1000), (40, 8));
        handle.stop();
        let report = handle.join().await.unwrap();
        let limits = report.stage("api").unwrap().limits.clone().unwrap();
        assert_eq!((limits.workers, limits.worker_changes), (Some(8), 2));
        assert!(
            report
                .to_string()
                .contains("limits of api: workers 8 (2 changes)"),
            "{report}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn set_workers_caps_an_adaptive_limit() {
        let t0 = Instant::now();
        let starts: Starts = Default::default();
        let handle = Pipeline::from_iter(0..u64::MAX)
            .map_async("api", logged(10, t0, &starts))
            .adaptive(Adaptive::aimd(10..=100).initial(40))
            .spawn();
        tokio::time::sleep(ms(100)).await;
        let before = handle
            .snapshot()
            .stage("api")
            .unwrap()
            .limits
            .clone()
            .unwrap();
        assert_eq!((before.workers, before.adaptive), (None, true));
        assert!(between(&starts, 0, 100).1 >= 40);
        handle.set_workers("api", 5).unwrap();
        tokio::time::sleep(ms(500)).await;
        // The calls of 100 ms end by 110 ms; from then on at most 5 run, and 5 do.
        assert_eq!(between(&starts, 110, 600).1, 5);
        handle.set_workers("api", 1_000).unwrap();
        tokio::time::sleep(ms(500)).await;
        // A cap above the adaptive range leaves the adaptive limit to itself (its max, 100).
        let after = between(&starts, 610, 1100).1;
        assert!((10..=100).contains(&after) && after > 5, "{after}");
        handle.stop();
        let report = handle.join().await.unwrap();
        let limits = report.stage("api").unwrap().limits.clone().unwrap();
        assert_eq!((limits.workers, limits.worker_changes), (Some(1_000), 2));
        assert!(
            report
                .to_string()
                .contains("limits of api: adaptive, at most 1000 (2 changes)")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_follows_a_raise_and_a_lowering_within_one_call() {
        let t0 = Instant::now();
        let starts: Starts = Default::default();
        let handle = Pipeline::from_iter(0..u64::MAX)
            .map_async("api", logged(1, t0, &starts))
            .workers(8)
            .rate_limit(Rate::per_second(10))
            .spawn();
        tokio::time::sleep(ms(1050)).await; // starts at 0, 100, ..., 1000 ms
        assert_eq!(between(&starts, 0, 1050).0, 11);
        handle.set_rate("api", &Rate::per_second(100)).unwrap();
        // The next start is 10 ms after the last (1000 ms): it was owed, it goes now.
        tokio::time::sleep(ms(1000)).await; // 2050 ms
        let raised: Vec<Duration> = times(&starts, 1050, 2050);
        assert_eq!(raised.first(), Some(&ms(1050)));
        assert_eq!(raised.len(), 100);
        assert!(
            raised.windows(2).all(|w| w[1] - w[0] == ms(10)),
            "{raised:?}"
        );
        handle.set_rate("api", &Rate::per_second(4)).unwrap();
        tokio::time::sleep(ms(3000)).await;
        let lowered = times(&starts, 2050, 5050);
        // 250 ms apart from the last start (2040 ms), and no window of 1 s after the change
        // holds more than 4.
        assert_eq!(lowered.first(), Some(&ms(2290)));
        assert_eq!(lowered.len(), 12);
        for (i, s) in lowered.iter().enumerate() {
            let in_window = lowered[i..]
                .iter()
                .take_while(|t| **t < *s + ms(1000))
                .count();
            assert!(in_window <= 4, "{lowered:?}");
        }
        handle.stop();
        let report = handle.join().await.unwrap();
        let limits = report.stage("api").unwrap().limits.clone().unwrap();
        assert_eq!(limits.rate, Some((4, Duration::from_secs(1))));
        assert_eq!(limits.rate_changes, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_made_before_the_stages_are_built_applies_when_they_are() {
        let t0 = Instant::now();
        let starts: Starts = Default::default();
        let handle = Pipeline::from_iter(0..u64::MAX)
            .map_async("api", logged(100, t0, &starts))
            .workers(2)
            .spawn();
        handle.set_workers("api", 6).unwrap();
        // Checked at once, though the stages are not built yet.
        assert!(handle.set_workers("api", 0).is_err());
        tokio::time::sleep(ms(50)).await;
        assert_eq!(between(&starts, 0, 50), (6, 6));
        handle.stop();
        handle.join().await.unwrap();
    }

    fn times(starts: &Starts, from: u64, to: u64) -> Vec<Duration> {
        let s = starts.lock().unwrap();
        s.iter()
            .map(|(t, _)| *t)
            .filter(|t| *t >= ms(from) && *t < ms(to))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn bad_values_are_refused_naming_the_stage_and_the_value_and_the_limits_stay() {
        let handle = Pipeline::from_iter(0..u64::MAX)
            .map_async("api", |x| async move {
                tokio::time::sleep(ms(10)).await;
                x
            })
            .workers(4)
            .rate_limit(Rate::per_second(100))
            .map_async("plain", |x| async move { x })
            .spawn();
        // The run's task builds its stages when it first runs.
        tokio::task::yield_now().await;
        let err = |r: Result<(), Error>| r.unwrap_err().to_string();
        let prefix = "invalid configuration: stage `api`: ";
        assert_eq!(
            err(handle.set_workers("api", 0)),
            format!("{prefix}workers = 0: must be at least 1")
        );
        assert_eq!(
            err(handle.set_workers("api", (1 << 20) + 1)),
            format!("{prefix}workers = 1048577: must be at most 1048576 (2^20)")
        );
        assert!(err(handle.set_workers("api", usize::MAX)).contains(&usize::MAX.to_string()));
        let unknown = err(handle.set_workers("apl", 8));
        assert!(
            unknown.contains("stage `apl`")
                && unknown.contains("no async stage of that name")
                && unknown.contains("api, plain"),
            "{unknown}"
        );
        assert_eq!(
            err(handle.set_rate("api", &Rate::per_second(0))),
            format!("{prefix}rate = 0 per 1s: count must be at least 1")
        );
        // Faster than the clock can space (under 1 ns per item), and slower than 30 years.
        assert!(
            err(handle.set_rate("api", &Rate::per(2, Duration::from_nanos(1))))
                .contains("2 per 1ns")
        );
        assert!(
            err(handle.set_rate("api", &Rate::per(1, Duration::from_secs(u64::MAX))))
                .contains("30 years")
        );
        assert!(err(handle.set_rate("api", &Rate::per_second(5).burst(0))).contains("burst = 0"));
        let none = err(handle.set_rate("plain", &Rate::per_second(5)));
        assert!(
            none.contains("stage `plain`") && none.contains("no rate_limit"),
            "{none}"
        );
        assert!(err(handle.set_rate("nope", &Rate::per_second(5))).contains("stage `nope`"));
        tokio::time::sleep(ms(100)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        let limits = report.stage("api").unwrap().limits.clone().unwrap();
        assert_eq!(limits.workers, Some(4));
        assert_eq!(limits.rate, Some((100, Duration::from_secs(1))));
        assert_eq!(limits.worker_changes + limits.rate_changes, 0);
        assert!(!report.to_string().contains("limits of"));
    }
}
