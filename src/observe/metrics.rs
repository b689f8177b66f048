//! Metrics through the `metrics` facade (feature `metrics`): the application installs the
//! recorder it wants (e.g. `metrics-exporter-prometheus`), flowline only emits.
//!
//! Every metric has the labels `pipeline` (the run's name, [`RunOptions::name`]) and
//! `stage` (the stage's unique name in the run):
//!
//! | metric | type | what |
//! |---|---|---|
//! | `flowline_stage_received_items_total` | counter | items that entered the stage |
//! | `flowline_stage_sent_items_total` | counter | items the stage sent on (its outputs) |
//! | `flowline_stage_failed_items_total` | counter | items that failed, label `reason`: `error`, `timeout`, `panic`, `circuit_open`, or a refusing policy's own |
//! | `flowline_stage_dropped_items_total` | counter | items the stage dropped by design (filtered, deduplicated, throttled) |
//! | `flowline_stage_retries_total` | counter | retry attempts |
//! | `flowline_stage_in_flight` | gauge | items inside the stage (received, not yet out) |
//! | `flowline_stage_queue_depth` | gauge | items the stage sent on that wait in the queue to the next stage (a stage whose items go on in the same task has none) |
//! | `flowline_stage_workers` | gauge | an async stage's limit on calls in flight (its `workers`, as changed while running; for an adaptive stage the cap set while running, if any) |
//! | `flowline_stage_rate_per_second` | gauge | an async stage's rate limit, in calls per second, as changed while running |
//! | `flowline_adaptive_limit` | gauge | an adaptive stage's limit on calls in flight |
//! | `flowline_breaker_state` | gauge | a breaker's state: 0 closed, 1 half-open, 2 open |
//! | `flowline_stage_sampled_call_duration_seconds` | histogram | call latency of async stages, from the sampled calls the report's percentiles use (at most about 1,024 a second per stage): its `_count` is the sample's size, not the number of calls; the call rate is about that of `flowline_stage_received_items_total` plus `flowline_stage_retries_total` |
//!
//! The stages keep their counters anyway (for the report, progress and snapshots). The
//! exporter reads them on a schedule ([`EVERY`]) and once more when the run has ended, and
//! adds what changed to the metrics: the stages' hot path pays nothing for metrics (no
//! second set of counters, no facade call per item or per chunk), and the totals are exact
//! when the run ends.
//!
//! [`RunOptions::name`]: crate::RunOptions::name

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use metrics::{Counter, Gauge, Label};

use super::RunView;
use crate::report::StageStats;
use crate::util::time::interval_from_now;

/// How often the metrics are brought up to date while a run goes on.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

const RECEIVED: &str = "flowline_stage_received_items_total";
const SENT: &str = "flowline_stage_sent_items_total";
const FAILED: &str = "flowline_stage_failed_items_total";
const DROPPED: &str = "flowline_stage_dropped_items_total";
const RETRIES: &str = "flowline_stage_retries_total";
const IN_FLIGHT: &str = "flowline_stage_in_flight";
const QUEUE_DEPTH: &str = "flowline_stage_queue_depth";
const DURATION: &str = "flowline_stage_sampled_call_duration_seconds";
const WORKERS: &str = "flowline_stage_workers";
const RATE: &str = "flowline_stage_rate_per_second";

/// Exports the run's metrics until it ends (a run-level observer).
pub(crate) async fn export(run: Arc<dyn RunView>) {
    describe();
    let mut exporter = Exporter::default();
    let mut ticks = interval_from_now(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = run.ended().cancelled() => break,
            _ = ticks.tick() => exporter.export(&*run, false),
        }
    }
    exporter.export(&*run, true);
}

fn describe() {
    use metrics::Unit;
    metrics::describe_counter!(RECEIVED, Unit::Count, "Items that entered the stage.");
    metrics::describe_counter!(SENT, Unit::Count, "Items the stage sent on.");
    metrics::describe_counter!(
        FAILED,
        Unit::Count,
        "Items that failed in the stage, by reason."
    );
    metrics::describe_counter!(
        DROPPED,
        Unit::Count,
        "Items the stage dropped by design (filtered, deduplicated, throttled)."
    );
    metrics::describe_counter!(RETRIES, Unit::Count, "Retry attempts of the stage.");
    metrics::describe_gauge!(IN_FLIGHT, Unit::Count, "Items inside the stage.");
    metrics::describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Items the stage sent on, waiting in the queue to the next stage."
    );
    metrics::describe_gauge!(
        WORKERS,
        Unit::Count,
        "The most calls in flight of the async stage (as changed while running)."
    );
    metrics::describe_gauge!(
        RATE,
        "The async stage's rate limit, calls per second (as changed while running)."
    );
    metrics::describe_gauge!(
        "flowline_adaptive_limit",
        Unit::Count,
        "The adaptive limit on the stage's calls in flight."
    );
    metrics::describe_gauge!(
        "flowline_breaker_state",
        "The stage's circuit breaker: 0 closed, 1 half-open, 2 open."
    );
    metrics::describe_histogram!(
        DURATION,
        Unit::Seconds,
        "Call latency of the stage (a sample of its calls)."
    );
}

/// A counter and the total it was last brought to.
struct Total {
    counter: Counter,
    sent: u64,
}

impl Total {
    fn new(name: &'static str, labels: &[Label]) -> Self {
        Total {
            counter: metrics::counter!(name, labels.iter()),
            sent: 0,
        }
    }

    fn to(&mut self, total: u64) {
        if total > self.sent {
            self.counter.increment(total - self.sent);
            self.sent = total;
        }
    }
}

/// One stage's metrics.
struct StageMetrics {
    labels: Vec<Label>,
    received: Total,
    sent: Total,
    dropped: Total,
    retries: Total,
    in_flight: Gauge,
    /// Registered once the stage is seen to send through a queue.
    queue_depth: Option<Gauge>,
    /// By reason.
    failed: Vec<(&'static str, Total)>,
    /// Registered once the stage has timed a call (sync stages never do).
    duration: Option<metrics::Histogram>,
    /// The latency histogram as last exported (what is new is the difference).
    latency: Option<Histogram<u64>>,
}

impl StageMetrics {
    fn new(pipeline: &Arc<str>, stage: &StageStats) -> Self {
        let labels = vec![
            Label::new("pipeline", pipeline.to_string()),
            Label::new("stage", stage.name.to_string()),
        ];
        StageMetrics {
            received: Total::new(RECEIVED, &labels),
            sent: Total::new(SENT, &labels),
            dropped: Total::new(DROPPED, &labels),
            retries: Total::new(RETRIES, &labels),
            in_flight: metrics::gauge!(IN_FLIGHT, labels.iter()),
            queue_depth: None,
            failed: Vec::new(),
            duration: None,
            latency: None,
            labels,
        }
    }

    fn failed(&mut self, reason: &'static str, total: u64) {
        let i = match self.failed.iter().position(|(r, _)| *r == reason) {
            Some(i) => i,
            None => {
                let mut labels = self.labels.clone();
                labels.push(Label::from_static_parts("reason", reason));
                self.failed.push((reason, Total::new(FAILED, &labels)));
                self.failed.len() - 1
            }
        };
        self.failed[i].1.to(total);
    }

    /// Records the calls timed since the last export into the histogram: all of them, or
    /// for a busy stage a sample of [`MAX_EXPORTED`] in the same proportions. An exporter
    /// records a value at a time (`record_many` of a Prometheus histogram is a loop), so
    /// handing it a million calls a second would cost more than the calls; the number of
    /// calls is in the counters.
    fn latency(&mut self, now: Option<Histogram<u64>>) {
        let Some(now) = now else { return };
        let labels = &self.labels;
        let duration = self
            .duration
            .get_or_insert_with(|| metrics::histogram!(DURATION, labels.iter()));
        let mut new = now.clone();
        if let Some(before) = &self.latency {
            if new.subtract(before).is_err() {
                return;
            }
        }
        let scale = (MAX_EXPORTED as f64 / new.len().max(1) as f64).min(1.0);
        for v in new.iter_recorded() {
            let seconds = v.value_iterated_to() as f64 / 1e9;
            let n = (v.count_at_value() as f64 * scale).ceil() as usize;
            duration.record_many(seconds, n);
        }
        self.latency = Some(now);
    }
}

/// The most latency samples a stage hands the exporter per export (once a second), give
/// or take one per distinct value.
const MAX_EXPORTED: u64 = 1_024;

#[derive(Default)]
struct Exporter {
    /// In the order of the run's stages.
    stages: Vec<StageMetrics>,
    /// The gauges of the stages' policies, registered once.
    policies: Vec<(Arc<str>, usize, Gauge)>,
    /// The gauges of the async stages' limits (workers, rate), by stage, registered once.
    limits: Vec<(Arc<str>, &'static str, Gauge)>,
}

impl Exporter {
    /// Brings every metric up to the stages' counters (`ended`: the run is over, nothing is
    /// in flight any more).
    fn export(&mut self, run: &dyn RunView, ended: bool) {
        let stats = run.stats();
        for s in &stats[self.stages.len().min(stats.len())..] {
            self.stages.push(StageMetrics::new(run.name(), s));
        }
        for (s, m) in stats.iter().zip(self.stages.iter_mut()) {
            let r = s.snapshot(false);
            m.received.to(r.received);
            m.sent.to(r.emitted);
            m.dropped.to(r.dropped);
            m.retries.to(r.retried);
            m.in_flight
                .set(if ended { 0.0 } else { r.unfinished as f64 });
            if let Some(queued) = s.queued() {
                let labels = &m.labels;
                m.queue_depth
                    .get_or_insert_with(|| metrics::gauge!(QUEUE_DEPTH, labels.iter()))
                    .set(if ended { 0.0 } else { queued as f64 });
            }
            m.latency(s.latency_histogram());
        }
        for (stage, reasons) in run.failure_log().totals() {
            if let Some(m) = self
                .stages
                .iter_mut()
                .find(|m| m.labels.get(1).is_some_and(|l| l.value() == &*stage))
            {
                for (reason, n) in reasons.iter() {
                    m.failed(reason, n);
                }
            }
        }
        for (stage, l) in run.limits() {
            let workers = l.workers.map(|w| w as f64);
            let rate = l.rate.map(|(c, p)| c as f64 / p.as_secs_f64());
            for (name, value) in [(WORKERS, workers), (RATE, rate)] {
                if let Some(v) = value {
                    self.limit_gauge(run, &stage, name).set(v);
                }
            }
        }
        for (stage, list) in &run.policies() {
            for (i, p) in list.iter().enumerate() {
                let Some((name, value)) = p.gauge() else {
                    continue;
                };
                let gauge = match self.policies.iter().find(|(s, j, _)| s == stage && *j == i) {
                    Some((_, _, g)) => g,
                    None => {
                        self.policies
                            .push((stage.clone(), i, stage_gauge(run, stage, name)));
                        &self.policies[self.policies.len() - 1].2
                    }
                };
                gauge.set(value);
            }
        }
    }
}

/// A gauge of one stage of the run.
fn stage_gauge(run: &dyn RunView, stage: &str, name: &'static str) -> Gauge {
    let labels = [
        Label::new("pipeline", run.name().to_string()),
        Label::new("stage", stage.to_string()),
    ];
    metrics::gauge!(name, labels.iter())
}

impl Exporter {
    fn limit_gauge(&mut self, run: &dyn RunView, stage: &Arc<str>, name: &'static str) -> &Gauge {
        let i = match self
            .limits
            .iter()
            .position(|(s, n, _)| s == stage && *n == name)
        {
            Some(i) => i,
            None => {
                let g = stage_gauge(run, stage, name);
                self.limits.push((stage.clone(), name, g));
                self.limits.len() - 1
            }
        };
        &self.limits[i].2
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use metrics::{
        Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata,
        Recorder, SharedString, Unit,
    };
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// One metric's value: a counter's total, a gauge's value, a histogram's samples.
    #[derive(Default)]
    struct Value {
        counter: AtomicU64,
        gauge: Mutex<f64>,
        samples: Mutex<Vec<f64>>,
    }

    impl CounterFn for Value {
        fn increment(&self, n: u64) {
            self.counter.fetch_add(n, Relaxed);
        }
        fn absolute(&self, n: u64) {
            self.counter.fetch_max(n, Relaxed);
        }
    }

    impl GaugeFn for Value {
        fn increment(&self, v: f64) {
            *self.gauge.lock().unwrap() += v;
        }
        fn decrement(&self, v: f64) {
            *self.gauge.lock().unwrap() -= v;
        }
        fn set(&self, v: f64) {
            *self.gauge.lock().unwrap() = v;
        }
    }

    impl HistogramFn for Value {
        fn record(&self, v: f64) {
            self.samples.lock().unwrap().push(v);
        }
    }

    /// A recorder that keeps every metric by (name, stage, reason) (a test's own, so that
    /// flowline's tests need no recorder crate).
    #[derive(Default, Clone)]
    struct Keep(Arc<Mutex<BTreeMap<Name, Arc<Value>>>>);

    /// (metric, stage, reason).
    type Name = (String, String, String);

    impl Keep {
        fn value(&self, key: &Key) -> Arc<Value> {
            let label = |n: &str| {
                key.labels()
                    .find(|l| l.key() == n)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            };
            assert_eq!(label("pipeline"), "known", "{key:?}");
            let k = (key.name().to_string(), label("stage"), label("reason"));
            self.0.lock().unwrap().entry(k).or_default().clone()
        }

        fn get(&self, name: &str, stage: &str, reason: &str) -> Arc<Value> {
            let k = (name.to_string(), stage.to_string(), reason.to_string());
            let all = self.0.lock().unwrap();
            all.get(&k)
                .unwrap_or_else(|| panic!("no {k:?} in {:?}", all.keys()))
                .clone()
        }

        fn counter(&self, name: &str, stage: &str) -> u64 {
            self.get(name, stage, "").counter.load(Relaxed)
        }

        fn gauge(&self, name: &str, stage: &str) -> f64 {
            *self.get(name, stage, "").gauge.lock().unwrap()
        }
    }

    impl Recorder for Keep {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.value(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.value(key))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(self.value(key))
        }
    }

    /// Runs `f` on a current-thread runtime on tokio's paused clock, with `keep` as the
    /// thread's recorder.
    fn with<F: std::future::Future>(keep: &Keep, f: impl FnOnce() -> F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        metrics::with_local_recorder(keep, || rt.block_on(f()))
    }

    #[test]
    fn a_busy_stage_exports_a_bounded_sample_of_its_call_times() {
        let keep = Keep::default();
        let report = with(&keep, || async move {
            Pipeline::from_iter(0..50_000u64)
                .map_async("call", |x| async move { x })
                .run()
                .name("known")
                .await
                .unwrap()
        });
        let timed = report.stage("call").unwrap().latency.unwrap().samples;
        assert!(timed > 40_000, "{timed}");
        let exported = keep
            .get("flowline_stage_sampled_call_duration_seconds", "call", "")
            .samples
            .lock()
            .unwrap()
            .len() as u64;
        // One export (the run is shorter than a second): the sample, plus at most one more
        // per distinct value (instant calls take a handful of distinct times).
        assert!(
            (1..=super::MAX_EXPORTED + 64).contains(&exported),
            "{exported}"
        );
    }

    #[test]
    fn a_run_exports_its_exact_counts() {
        let keep = Keep::default();
        let adaptive = Adaptive::aimd(1..=8);
        let a = adaptive.clone();
        let report = with(&keep, || async move {
            Pipeline::from_iter(0..100u64)
                .try_map_async("call", |x| async move {
                    match x % 10 {
                        0 => Err("503"),                   // fails every attempt
                        5 => std::future::pending().await, // times out every attempt
                        _ => Ok(x),
                    }
                })
                .workers(4)
                .timeout(Duration::from_secs(1))
                .retry(Retry::constant(Duration::from_millis(10)).max_attempts(3))
                .filter(|x| x % 2 == 0)
                .map_async("store", |x| async move { x })
                .adaptive(a)
                .circuit_breaker(Breaker::consecutive_failures(1000))
                .run()
                .name("known")
                .await
                .unwrap()
        });
        assert_eq!(report.failures, 20);
        let failed = |reason| {
            keep.get("flowline_stage_failed_items_total", "call", reason)
                .counter
                .load(Relaxed)
        };
        // call: 100 in, 10 errors and 10 timeouts after 3 attempts each, 80 out.
        assert_eq!(
            keep.counter("flowline_stage_received_items_total", "call"),
            100
        );
        assert_eq!(keep.counter("flowline_stage_sent_items_total", "call"), 80);
        assert_eq!((failed("error"), failed("timeout")), (10, 10));
        assert_eq!(keep.counter("flowline_stage_retries_total", "call"), 40);
        // filter: the 40 odd ones dropped.
        assert_eq!(
            keep.counter("flowline_stage_dropped_items_total", "filter"),
            40
        );
        assert_eq!(
            keep.counter("flowline_stage_sent_items_total", "filter"),
            40
        );
        assert_eq!(
            keep.counter("flowline_stage_received_items_total", "sink"),
            40
        );
        assert_eq!(keep.gauge("flowline_stage_in_flight", "call"), 0.0);
        assert_eq!(
            keep.gauge("flowline_adaptive_limit", "store"),
            adaptive.limit() as f64
        );
        assert_eq!(keep.gauge("flowline_breaker_state", "store"), 0.0);
        // Fewer calls than an export samples: every call the report timed is there, once.
        let samples = keep
            .get("flowline_stage_sampled_call_duration_seconds", "call", "")
            .samples
            .lock()
            .unwrap()
            .len() as u64;
        assert_eq!(
            samples,
            report.stage("call").unwrap().latency.unwrap().samples
        );
        assert!(samples > 0);
        // A stage that makes no calls has no call-duration histogram.
        let key = (
            "flowline_stage_sampled_call_duration_seconds".to_string(),
            "filter".to_string(),
            String::new(),
        );
        assert!(!keep.0.lock().unwrap().contains_key(&key));
        for s in &report.stages {
            let received = keep.counter("flowline_stage_received_items_total", &s.name);
            assert_eq!(received, s.received, "{}", s.name);
        }
    }

    /// Refuses the first `n` calls with a reason of its own ("quota"), lets the rest go.
    #[derive(Debug)]
    struct Quota(u64);

    impl crate::policy::Policy for Quota {
        fn invalid(&self) -> Option<crate::policy::Invalid> {
            None
        }
        fn admission(&self) -> Box<dyn crate::policy::Admission> {
            Box::new(QuotaLeft {
                left: self.0,
                last: None,
            })
        }
    }

    struct QuotaLeft {
        left: u64,
        /// The call last refused (a call asks until it is answered).
        last: Option<u64>,
    }

    impl crate::policy::Admission for QuotaLeft {
        fn poll_admit(
            &mut self,
            _: &mut std::task::Context<'_>,
            call: u64,
            _: usize,
        ) -> std::task::Poll<crate::policy::Verdict> {
            if self.left > 0 && self.last != Some(call) {
                self.left -= 1;
                self.last = Some(call);
                let e = ItemError::refused("quota", "over the tenant's quota");
                return std::task::Poll::Ready(crate::policy::Verdict::Refuse(e));
            }
            std::task::Poll::Ready(crate::policy::Verdict::Go)
        }
    }

    #[cfg(feature = "jsonl")]
    #[test]
    fn a_refusing_policy_names_the_reason_in_report_dead_letters_and_metrics() {
        let keep = Keep::default();
        let path = std::env::temp_dir().join(format!(
            "flowline-refusal-{}-{:?}.jsonl",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = path.clone();
        let report = with(&keep, || async move {
            Pipeline::from_iter(0..10u64)
                .try_map_async("call", |x| async move {
                    if x == 9 { Err("404") } else { Ok(x) }
                })
                .workers(1)
                .policy(Quota(4))
                .run()
                .name("known")
                .dead_letter(DeadLetter::jsonl(&file))
                .await
                .unwrap()
        });
        let lines = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        // Report: the policy's reason beside the built-in ones, by name.
        let call = report.stage("call").unwrap();
        assert_eq!(call.failed, 5);
        assert_eq!(
            call.failed_by.iter().collect::<Vec<_>>(),
            [("error", 1), ("quota", 4)]
        );
        assert_eq!(call.failed_by.get("quota"), 4);
        assert!(
            report
                .to_string()
                .contains("\nfailed at call: error 1, quota 4\n"),
            "{report}"
        );
        let json = report.to_json();
        assert!(
            json.contains(r#""failed_by":{"error":1,"quota":4}"#),
            "{json}"
        );
        assert!(json.contains(r#""reason":"quota","error":"over the tenant's quota""#));
        // Dead letters: each line says why.
        let kinds: Vec<String> = lines
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].to_string())
            .collect();
        assert_eq!(
            kinds.iter().filter(|k| *k == "\"quota\"").count(),
            4,
            "{lines}"
        );
        assert_eq!(
            kinds.iter().filter(|k| *k == "\"error\"").count(),
            1,
            "{lines}"
        );
        // Metrics: the reason is the label.
        let failed = |reason| {
            keep.get("flowline_stage_failed_items_total", "call", reason)
                .counter
                .load(Relaxed)
        };
        assert_eq!((failed("quota"), failed("error")), (4, 1));
    }

    #[test]
    fn counters_follow_a_run_and_add_up_over_runs() {
        let keep = Keep::default();
        let run = || {
            Pipeline::from_iter(0..30u64)
                .map_async("tick", |x| async move {
                    tokio::time::sleep(Duration::from_millis(130)).await;
                    x
                })
                .run()
                .name("known")
        };
        let k = keep.clone();
        with(&keep, || async move {
            let handle = run().spawn();
            // At 1.5 s the export of 1 s has seen the 7 calls done by then (one in 130 ms).
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(k.counter("flowline_stage_sent_items_total", "tick"), 7);
            let received = k.counter("flowline_stage_received_items_total", "tick");
            assert_eq!(
                k.gauge("flowline_stage_in_flight", "tick"),
                (received - 7) as f64
            );
            handle.join().await.unwrap();
            assert_eq!(k.counter("flowline_stage_sent_items_total", "tick"), 30);
            // A second run of the same pipeline adds to the same counters.
            run().await.unwrap();
            assert_eq!(k.counter("flowline_stage_sent_items_total", "tick"), 60);
        });
    }

    #[test]
    fn the_queue_before_a_slow_stage_shows_its_depth() {
        let keep = Keep::default();
        let k = keep.clone();
        with(&keep, || async move {
            let handle = Pipeline::from_iter(0..3_000u64)
                .map_async("fast", |x| async move { x })
                .map_async("slow", |x| async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    x
                })
                .filter(|_| true)
                .run()
                .name("known")
                .spawn();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            // "slow" took one chunk of 512 and works through it; "fast" filled the queue
            // between them (4 chunks of 512) and waits.
            assert_eq!(k.gauge("flowline_stage_queue_depth", "fast"), 2_048.0);
            // The sink takes what "slow" sends at once; the filter, fused into the sink's
            // task, has no queue of its own.
            assert_eq!(k.gauge("flowline_stage_queue_depth", "slow"), 0.0);
            assert!(k.counter("flowline_stage_sent_items_total", "slow") > 0);
            let has_queue = |stage: &str| {
                let key = ("flowline_stage_queue_depth".into(), stage.into(), "".into());
                k.0.lock().unwrap().contains_key(&key)
            };
            assert!(!has_queue("filter"));
            handle.join().await.unwrap();
            assert_eq!(k.gauge("flowline_stage_queue_depth", "fast"), 0.0);
        });
    }

    #[test]
    fn the_limits_gauges_follow_changes_while_running() {
        let keep = Keep::default();
        let k = keep.clone();
        with(&keep, || async move {
            let handle = Pipeline::from_iter(0..u64::MAX)
                .map_async("api", |x| async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    x
                })
                .workers(4)
                .rate_limit(Rate::per_second(200))
                .run()
                .name("known")
                .spawn();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(k.gauge("flowline_stage_workers", "api"), 4.0);
            assert_eq!(k.gauge("flowline_stage_rate_per_second", "api"), 200.0);
            handle.set_workers("api", 16).unwrap();
            handle
                .set_rate("api", &Rate::per(1, Duration::from_millis(40)))
                .unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(k.gauge("flowline_stage_workers", "api"), 16.0);
            assert_eq!(k.gauge("flowline_stage_rate_per_second", "api"), 25.0);
            // A refused value changes neither the limit nor its gauge.
            assert!(handle.set_workers("api", 0).is_err());
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(k.gauge("flowline_stage_workers", "api"), 16.0);
            handle.stop();
            handle.join().await.unwrap();
        });
    }
}
