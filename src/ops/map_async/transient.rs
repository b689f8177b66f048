//! `transient_if`: an async stage rides out an outage of its server. The items whose calls
//! failed with a transient error wait in [`Down`] while the job is paused; one of them at a
//! time probes the server after the run's [`Outage`](crate::Outage) waits, and the first
//! answer resumes the job ([`Down::ride_out`], [`Down::poll_probe`], [`Down::back`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::Context;

use tokio::time::{Instant, Sleep};

use crate::failure::ItemError;
use crate::report::StageStats;
use crate::runtime::RunCtx;
use crate::runtime::gate::GateHold;

use super::builder::TransientIf;
use super::call::Meta;
use super::retry_queue::RetryQueue;

/// What [`Down::ride_out`] did with a finished call.
pub(super) enum Ridden<T, U> {
    /// Its item failed transiently and waits for the server.
    Taken,
    /// Its item failed transiently after a stop: it is left unfinished.
    Left(Meta),
    /// Not the server being down: the call ends as any other.
    Back(Meta, Result<U, ItemError>, Option<T>),
}

/// The stage's watch on its server, and the items waiting for it.
pub(super) struct Down<T> {
    pub(super) transient: TransientIf,
    pub(super) watch: crate::OutageWatch,
    /// Items whose call failed transiently, in the order they are to be tried again.
    pub(super) queue: VecDeque<(T, Meta)>,
    /// The probe, its wait over, ready to start.
    pub(super) ready: Option<(T, Meta)>,
    /// The sequence number of the probe, from when it is ready until its call ends.
    pub(super) probe: Option<u64>,
    /// The wait before the next probe.
    pub(super) sleep: Option<Pin<Box<Sleep>>>,
    /// Keeps the run's source paused while the server is down.
    pub(super) hold: Option<GateHold>,
}

impl<T> Down<T> {
    pub(super) fn new(transient: TransientIf, watch: crate::OutageWatch) -> Self {
        Down {
            transient,
            watch,
            queue: VecDeque::new(),
            ready: None,
            probe: None,
            sleep: None,
            hold: None,
        }
    }

    /// The items waiting for the server.
    pub(super) fn len(&self) -> usize {
        self.queue.len() + usize::from(self.ready.is_some())
    }

    /// Whether the server is down: only a probe may start.
    pub(super) fn is_down(&self) -> bool {
        self.watch.is_down()
    }

    /// The server answered: the outage is over. The items that waited for it go first (in
    /// the order they failed), before the ones already due.
    pub(super) fn back(&mut self, due: &mut RetryQueue<T>) {
        self.watch.succeeded();
        self.probe = None;
        self.sleep = None;
        self.hold = None;
        for (item, meta) in self
            .ready
            .take()
            .into_iter()
            .chain(self.queue.drain(..))
            .rev()
        {
            due.push_due_front(item, meta);
        }
    }

    /// While the server is down: when the wait is over, the first waiting item becomes the
    /// probe. True if one did.
    pub(super) fn poll_probe(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.watch.is_down() || self.probe.is_some() || self.queue.is_empty() {
            return false;
        }
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
        let Some((item, meta)) = self.queue.pop_front() else {
            return false;
        };
        self.probe = Some(meta.seq);
        self.ready = Some((item, meta));
        true
    }

    /// Takes the item of a call that failed with a transient error, to be tried again when
    /// the server answers, and notes an answer of the server (the items that waited go to
    /// `due`); gives back whatever it does not take.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn ride_out<U>(
        &mut self,
        mut meta: Meta,
        result: Result<U, ItemError>,
        again: Option<T>,
        called: bool,
        stopping: bool,
        due: &mut RetryQueue<T>,
        stats: &StageStats,
        run: &RunCtx,
    ) -> Ridden<T, U> {
        let is_probe = self.probe == Some(meta.seq);
        if !called {
            // Refused by an admission (a fail-fast breaker): no answer either way, but the
            // probe's place is free for the next one.
            if is_probe {
                self.probe = None;
            }
            return Ridden::Back(meta, result, again);
        }
        let transient = matches!(&result, Err(e) if (self.transient.0)(e));
        let (true, Some(_)) = (transient, again.as_ref()) else {
            // An answer (a result, or an error that is not the server being down): the
            // server is up.
            if self.watch.is_down() || is_probe {
                self.back(due);
            }
            return Ridden::Back(meta, result, again);
        };
        let (Err(error), Some(item)) = (result, again) else {
            unreachable!("checked above")
        };
        StageStats::add(&stats.transient_retries, 1);
        // Not an attempt: the next call of the item is its attempt again.
        meta.attempts = meta.attempts.saturating_sub(1);
        if stopping {
            return Ridden::Left(meta);
        }
        if is_probe || !self.watch.is_down() {
            // The first failure of an outage, or the probe's: the watch says how long to
            // wait, or that the outage has lasted too long.
            self.probe = None;
            match self.watch.failed(error) {
                Ok(wait) => {
                    let at = crate::util::time::after(Instant::now(), wait);
                    match self.sleep.as_mut() {
                        Some(sleep) => sleep.as_mut().reset(at),
                        None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                }
                // Cancels the run: the items waiting here end unfinished.
                Err(outage) => run.outage_ended(outage),
            }
            if self.hold.is_none() {
                self.hold = Some(run.gate.hold());
            }
        }
        if is_probe {
            self.queue.push_front((item, meta));
        } else {
            self.queue.push_back((item, meta));
        }
        Ridden::Taken
    }

    /// A graceful stop: every waiting item is let go (its meta returned, to be left
    /// unfinished), and the source is no longer held.
    pub(super) fn take_all(&mut self) -> Vec<Meta> {
        self.probe = None;
        self.sleep = None;
        self.hold = None;
        self.ready
            .take()
            .into_iter()
            .chain(self.queue.drain(..))
            .map(|(_, m)| m)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::Outage;
    use crate::prelude::*;
    use std::io::{Error as IoError, ErrorKind};
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    type CallLog = (u32, Duration, Duration, bool);

    /// A server on the paused clock, down from `down.0` to `down.1` (since the test's start):
    /// a call there fails after 1 ms with a refused connection; else it answers after 10 ms.
    /// Item `bad` (if any) is always answered with a `404` (not transient).
    #[derive(Clone)]
    struct Server {
        t0: Instant,
        down: (Duration, Duration),
        bad: Option<u32>,
        /// Every call: (item, start, end, answered).
        calls: Arc<Mutex<Vec<CallLog>>>,
        /// Items pulled from the source, with when.
        pulls: Arc<Mutex<Vec<Duration>>>,
    }

    impl Server {
        fn new(down: (u64, u64), bad: Option<u32>) -> Self {
            Server {
                t0: Instant::now(),
                down: (Duration::from_millis(down.0), Duration::from_millis(down.1)),
                bad,
                calls: Arc::default(),
                pulls: Arc::default(),
            }
        }

        fn is_down(&self, at: Duration) -> bool {
            (self.down.0..self.down.1).contains(&at)
        }

        async fn call(self, x: u32) -> Result<u32, IoError> {
            let start = self.t0.elapsed();
            let down = self.is_down(start);
            tokio::time::sleep(Duration::from_millis(if down { 1 } else { 10 })).await;
            let end = self.t0.elapsed();
            self.calls.lock().unwrap().push((x, start, end, !down));
            match (down, Some(x) == self.bad) {
                (true, _) => Err(IoError::from(ErrorKind::ConnectionRefused)),
                (false, true) => Err(IoError::other("404 not found")),
                (false, false) => Ok(x),
            }
        }

        /// `n` items, pulled one by one (each pull logged), through a stage calling the
        /// server with 4 workers.
        fn stage(
            &self,
            n: u32,
        ) -> crate::AsyncStage<u32, u32, impl crate::StageFn<u32, u32> + use<>> {
            let (pulls, t0) = (self.pulls.clone(), self.t0);
            let mut next = 0u32;
            let server = self.clone();
            Pipeline::from_fn(move || {
                pulls.lock().unwrap().push(t0.elapsed());
                next += 1;
                let k = next - 1;
                async move { (k < n).then_some(k) }
            })
            .try_map_async("db", move |x| server.clone().call(x))
            .workers(4)
        }
    }

    async fn outage_of_3_s(ordered: bool) {
        // Down from 100 ms to 3.1 s: calls of 10 ms, 4 at a time.
        let server = Server::new((100, 3_100), None);
        let stage = server.stage(400).transient_if(ItemError::is_transient);
        let stage = if ordered { stage } else { stage.unordered() };
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        let report = stage
            .inspect(move |x| o.lock().unwrap().push(*x))
            .run()
            .await
            .unwrap();
        // Nothing failed, nothing lost, every item once.
        assert_eq!((report.failures, report.delivered()), (0, 400), "{report}");
        assert!(report.is_balanced());
        let mut out = out.lock().unwrap().clone();
        if ordered {
            assert_eq!(out, (0..400).collect::<Vec<_>>());
        }
        out.sort_unstable();
        assert_eq!(out, (0..400).collect::<Vec<_>>());
        let calls = server.calls.lock().unwrap().clone();
        // The first refused call ends the first 1 ms of the outage; from then until the
        // first answer, calls go one at a time (probes) and only for items that were
        // refused before: nothing new starts.
        let first_refused = calls.iter().find(|c| !c.3).unwrap().2;
        let first_answer = calls
            .iter()
            .filter(|c| c.3 && c.1 >= first_refused)
            .map(|c| c.1)
            .min()
            .unwrap();
        let refused: Vec<_> = calls.iter().filter(|c| !c.3).collect();
        let during: Vec<_> = calls
            .iter()
            .filter(|c| c.1 >= first_refused && c.1 < first_answer)
            .collect();
        assert!(during.len() > 3, "{during:?}");
        for w in during.windows(2) {
            assert!(w[1].1 >= w[0].2, "two calls at once while down: {w:?}");
        }
        for c in &during {
            assert!(
                refused.iter().any(|r| r.0 == c.0 && r.1 < c.1),
                "{c:?} was new"
            );
        }
        // Back within one wait of the policy (at most 1 s) after the server is.
        let back = server.down.1;
        assert!(first_answer >= back && first_answer <= back + Duration::from_secs(1));
        // The source pulled nothing while the server was down (after the pulls under way
        // when the first call was refused).
        let pulls = server.pulls.lock().unwrap().clone();
        let late = pulls
            .iter()
            .filter(|t| **t > first_refused && **t < first_answer)
            .count();
        assert_eq!(late, 0, "{pulls:?}");
        // Every refused call counted as a transient retry, none as an attempt.
        let stage = report.stage("db").unwrap();
        assert_eq!(stage.transient_retries, refused.len() as u64);
        assert_eq!((stage.retried, stage.failed), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_of_3_s_costs_no_item_and_only_probes_run_while_down() {
        outage_of_3_s(true).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_unordered_stage_rides_out_the_outage_too() {
        outage_of_3_s(false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_past_the_policy_ends_the_run_with_every_waiting_item_unfinished() {
        let server = Server::new((100, u64::MAX), None);
        let t0 = Instant::now();
        let err = server
            .stage(400)
            .transient_if(ItemError::is_transient)
            .run()
            .outage(Outage::keep_trying_for(Duration::from_secs(2)))
            .await
            .unwrap_err();
        let Error::Outage { error, report } = &err else {
            panic!("{err}")
        };
        assert_eq!(error.server(), "db");
        assert!(err.to_string().contains("connection refused"), "{err}");
        // Given up when the probe made 2 s after the first refusal (at 101 ms) was refused
        // too, 1 ms later.
        assert_eq!(error.elapsed(), Duration::from_millis(2_001));
        assert!(
            t0.elapsed() <= Duration::from_millis(2_102),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(report.outcome, RunOutcome::Outage);
        assert_eq!(report.failures, 0);
        let stage = report.stage("db").unwrap();
        // The 4 calls refused at 101 ms (and every item pulled after them) are unfinished.
        assert_eq!(stage.failed, 0);
        assert!(stage.unfinished >= 4, "{report}");
        assert_eq!(stage.received, stage.passed + stage.unfinished, "{report}");
        assert!(report.is_balanced(), "{report}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_while_the_server_is_down_leaves_the_waiting_items_unfinished() {
        let server = Server::new((100, u64::MAX), None);
        let handle = server
            .stage(400)
            .transient_if(ItemError::is_transient)
            .spawn();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        handle.stop();
        let report = handle.join().await.unwrap();
        assert_eq!(report.outcome, RunOutcome::Stopped);
        let calls = server.calls.lock().unwrap().clone();
        assert!(
            calls.iter().all(|c| c.1 <= Duration::from_millis(1_500)),
            "{calls:?}"
        );
        assert!(
            calls.len() > 4,
            "probes were made before the stop: {calls:?}"
        );
        assert_eq!(report.failures, 0);
        let stage = report.stage("db").unwrap();
        assert_eq!(stage.received, stage.passed + stage.unfinished, "{report}");
        assert!(stage.unfinished >= 4 && report.is_balanced(), "{report}");
    }

    #[tokio::test(start_paused = true)]
    async fn errors_the_predicate_does_not_call_transient_are_ordinary_failures() {
        // A predicate that says no: the refused calls fail their items.
        let server = Server::new((0, u64::MAX), None);
        let report = server
            .stage(10)
            .transient_if(|_| false)
            .run()
            .await
            .unwrap();
        assert_eq!(report.failures, 10);
        assert_eq!(report.stage("db").unwrap().transient_retries, 0);
        assert_eq!(report.failure_sample[0].attempts, 1);
        // A 404 is no outage: it fails at once, the others go through.
        let server = Server::new((0, 0), Some(3));
        let report = server
            .stage(10)
            .transient_if(ItemError::is_transient)
            .run()
            .await
            .unwrap();
        assert_eq!((report.failures, report.delivered()), (1, 9));
        assert!(report.failure_sample[0].error.to_string().contains("404"));
    }

    #[tokio::test(start_paused = true)]
    async fn with_retry_only_the_other_errors_are_attempts() {
        // Item 3 gets a 404 every time (3 attempts, 2 retries); the outage in the middle
        // costs no attempt of any item.
        let server = Server::new((5, 2_000), Some(3));
        let report = server
            .stage(40)
            .transient_if(ItemError::is_transient)
            .retry(Retry::constant(Duration::from_millis(50)).max_attempts(3))
            .run()
            .await
            .unwrap();
        assert_eq!((report.failures, report.delivered()), (1, 39), "{report}");
        let f = &report.failure_sample[0];
        assert_eq!(f.attempts, 3);
        assert!(f.error.to_string().contains("404"));
        let stage = report.stage("db").unwrap();
        assert_eq!(stage.retried, 2);
        assert!(stage.transient_retries >= 4, "{report}");
        let answered = server.calls.lock().unwrap().iter().filter(|c| c.3).count();
        assert_eq!(
            answered,
            39 + 3,
            "one answered call per item, three for item 3"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn composes_with_a_timeout_a_breaker_and_a_rate() {
        // A hung server (calls never answer) for 2 s: the timeout turns each call into a
        // timeout, which the predicate calls transient. A breaker in pause mode and a rate
        // see the calls as usual; nothing fails.
        let t0 = Instant::now();
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let out = Pipeline::from_iter(0..50u32)
            .try_map_async("api", move |x| {
                c.fetch_add(1, SeqCst);
                async move {
                    if t0.elapsed() < Duration::from_secs(2) {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, IoError>(x)
                }
            })
            .workers(4)
            .timeout(Duration::from_millis(100))
            .circuit_breaker(Breaker::consecutive_failures(100))
            .rate_limit(Rate::per_second(100))
            .transient_if(|e| matches!(e, ItemError::Timeout(_)) || e.is_transient())
            .collect()
            .await
            .unwrap();
        assert_eq!(out, (0..50).collect::<Vec<_>>());
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
        assert!(calls.load(SeqCst) > 50);
    }
}
