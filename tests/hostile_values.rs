//! Hostile values: every numeric option of the public API at 0, 1, MAX, NaN and inverted
//! ranges. Each case runs under a timeout and must end in one of two ways: a configuration
//! error naming the option and the value (all problems at once), or a run that completes with
//! a balanced report (a documented meaning). Never a panic, a hang, or an internal error.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use flowline::prelude::*;
use flowline::{
    ConfigProblem, CursorOptions, Gather, MemoryCheckpoints, MemoryStore, Page, ProgressOptions,
    StallAction,
};
use futures_util::FutureExt as _;

type Case = Pin<Box<dyn Future<Output = Result<Report, Error>> + Send>>;

/// What a case must end in.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A configuration error with a problem for this option.
    Rejects(&'static str),
    /// A run that completes, balanced, with at least one item delivered.
    Runs,
}
use Expect::*;

const MAX: Duration = Duration::MAX;
const ZERO: Duration = Duration::ZERO;

fn src() -> Pipeline<u32> {
    Pipeline::from_iter(0..50u32)
}

async fn ok(x: u32) -> Result<u32, String> {
    Ok(x)
}

fn cases() -> Vec<(&'static str, Expect, Case)> {
    let mut v: Vec<(&'static str, Expect, Case)> = Vec::new();
    macro_rules! case {
        ($name:expr, $expect:expr, $fut:expr) => {
            v.push(($name, $expect, Box::pin($fut)))
        };
    }
    // Stage options.
    case!(
        "workers(0)",
        Rejects("workers"),
        src()
            .map_async("s", |x| async move { x })
            .workers(0)
            .run()
            .into_future()
    );
    case!(
        "workers(MAX)",
        Runs,
        src()
            .map_async("s", |x| async move { x })
            .workers(usize::MAX)
            .run()
            .into_future()
    );
    case!(
        "timeout(ZERO)",
        Rejects("timeout"),
        src()
            .map_async("s", |x| async move { x })
            .timeout(ZERO)
            .run()
            .into_future()
    );
    case!(
        "timeout(MAX)",
        Runs,
        src()
            .map_async("s", |x| async move { x })
            .timeout(MAX)
            .run()
            .into_future()
    );
    case!(
        "buffer(0)",
        Rejects("capacity"),
        src().buffer(0).run().into_future()
    );
    case!(
        "buffer(MAX)",
        Runs,
        src().buffer(usize::MAX).run().into_future()
    );
    // Batching.
    case!(
        "batch(0, 1s)",
        Rejects("size"),
        src().batch(0, Duration::from_secs(1)).run().into_future()
    );
    case!(
        "batch(MAX, 1ms)",
        Runs,
        src()
            .batch(usize::MAX, Duration::from_millis(1))
            .run()
            .into_future()
    );
    case!(
        "batch(10, ZERO)",
        Rejects("max_wait"),
        src().batch(10, ZERO).run().into_future()
    );
    case!(
        "batch(10, MAX)",
        Runs,
        src().batch(10, MAX).run().into_future()
    );
    case!(
        "batch_dedup_by(10, MAX)",
        Runs,
        src().batch_dedup_by(10, MAX, |x| *x).run().into_future()
    );
    case!(
        "batch_dedup_by(0, 1s)",
        Rejects("size"),
        src()
            .batch_dedup_by(0, Duration::from_secs(1), |x| *x)
            .run()
            .into_future()
    );
    case!(
        "dedup ttl(ZERO)",
        Rejects("ttl"),
        src()
            .dedup_by(|x| *x, Window::ttl(ZERO))
            .run()
            .into_future()
    );
    case!(
        "dedup ttl(MAX)",
        Runs,
        src().dedup_by(|x| *x, Window::ttl(MAX)).run().into_future()
    );
    case!(
        "dedup last(0)",
        Rejects("window.last"),
        src().dedup_by(|x| *x, Window::last(0)).run().into_future()
    );
    case!(
        "dedup last(MAX)",
        Runs,
        src()
            .dedup_by(|x| *x, Window::last(usize::MAX))
            .run()
            .into_future()
    );
    case!(
        "dedup max_keys(MAX)",
        Runs,
        src()
            .dedup_by(
                |x| *x,
                Window::ttl(Duration::from_secs(1)).max_keys(usize::MAX)
            )
            .run()
            .into_future()
    );
    case!(
        "debounce(ZERO)",
        Rejects("period"),
        src().debounce(ZERO).run().into_future()
    );
    case!(
        "debounce(MAX)",
        Runs,
        src().debounce(MAX).run().into_future()
    );
    case!(
        "debounce max_wait(ZERO)",
        Rejects("max_wait"),
        src()
            .debounce(Duration::from_millis(1))
            .max_wait(ZERO)
            .run()
            .into_future()
    );
    case!(
        "debounce max_wait(MAX)",
        Runs,
        src()
            .debounce(Duration::from_millis(1))
            .max_wait(MAX)
            .run()
            .into_future()
    );
    case!(
        "throttle(ZERO)",
        Rejects("interval"),
        src().throttle(ZERO, Throttle::Leading).run().into_future()
    );
    case!(
        "throttle(MAX)",
        Runs,
        src().throttle(MAX, Throttle::Leading).run().into_future()
    );
    case!(
        "throttle(MAX) trailing",
        Runs,
        src().throttle(MAX, Throttle::Trailing).run().into_future()
    );
    case!(
        "idempotent ttl(ZERO)",
        Rejects("ttl"),
        src()
            .idempotent(MemoryStore::new(), |x| *x)
            .ttl(ZERO)
            .run()
            .into_future()
    );
    case!(
        "idempotent ttl(MAX)",
        Runs,
        src()
            .idempotent(MemoryStore::new(), |x| *x)
            .ttl(MAX)
            .run()
            .into_future()
    );
    case!(
        "idempotent busy_wait(ZERO)",
        Runs,
        src()
            .idempotent(MemoryStore::new(), |x| *x)
            .busy_wait(ZERO)
            .run()
            .into_future()
    );
    case!(
        "idempotent busy_wait(MAX)",
        Runs,
        src()
            .idempotent(MemoryStore::new(), |x| *x)
            .busy_wait(MAX)
            .run()
            .into_future()
    );
    // Rates.
    case!(
        "pace per_second(0)",
        Rejects("rate"),
        src().pace(Rate::per_second(0)).run().into_future()
    );
    case!(
        "pace per(1, ZERO)",
        Rejects("rate"),
        src().pace(Rate::per(1, ZERO)).run().into_future()
    );
    case!(
        "pace per(1, MAX)",
        Rejects("rate"),
        src().pace(Rate::per(1, MAX)).run().into_future()
    );
    case!(
        "pace per_second(MAX)",
        Rejects("rate"),
        src().pace(Rate::per_second(u64::MAX)).run().into_future()
    );
    case!(
        "pace burst(0)",
        Rejects("burst"),
        src()
            .pace(Rate::per_second(10).burst(0))
            .run()
            .into_future()
    );
    case!(
        "pace burst(MAX)",
        Runs,
        src()
            .pace(Rate::per_second(10).burst(u64::MAX))
            .run()
            .into_future()
    );
    case!(
        "stage rate per_second(0)",
        Rejects("rate"),
        src()
            .map_async("s", |x| async move { x })
            .rate_limit(Rate::per_second(0))
            .run()
            .into_future()
    );
    case!(
        "inflight(0)",
        Rejects("inflight"),
        src()
            .map_async("s", |x| async move { x })
            .inflight(&Inflight::new(0))
            .run()
            .into_future()
    );
    case!(
        "inflight(MAX)",
        Runs,
        src()
            .map_async("s", |x| async move { x })
            .inflight(&Inflight::new(usize::MAX))
            .run()
            .into_future()
    );
    // Retry.
    case!(
        "retry constant(MAX)",
        Runs,
        src()
            .try_map_async("s", ok)
            .retry(Retry::constant(MAX))
            .run()
            .into_future()
    );
    case!(
        "retry exponential(ZERO)",
        Rejects("base"),
        src()
            .try_map_async("s", ok)
            .retry(Retry::exponential(ZERO))
            .run()
            .into_future()
    );
    case!(
        "retry fibonacci(ZERO)",
        Rejects("base"),
        src()
            .try_map_async("s", ok)
            .retry(Retry::fibonacci(ZERO))
            .run()
            .into_future()
    );
    case!(
        "retry factor(NaN)",
        Rejects("factor"),
        src()
            .try_map_async("s", ok)
            .retry(Retry::exponential(Duration::from_millis(1)).factor(f64::NAN))
            .run()
            .into_future()
    );
    case!(
        "retry factor(MAX)",
        Runs,
        src()
            .try_map_async("s", ok)
            .retry(Retry::exponential(Duration::from_millis(1)).factor(f64::MAX))
            .run()
            .into_future()
    );
    case!(
        "retry factor(0.5)",
        Rejects("factor"),
        src()
            .try_map_async("s", ok)
            .retry(Retry::exponential(Duration::from_millis(1)).factor(0.5))
            .run()
            .into_future()
    );
    case!(
        "retry factor(NaN) on constant",
        Rejects("retry.factor"),
        src()
            .try_map_async("s", ok)
            .retry(Retry::constant(Duration::from_millis(1)).factor(f64::NAN))
            .run()
            .into_future()
    );
    case!(
        "retry max_attempts(0)",
        Rejects("max_attempts"),
        src()
            .try_map_async("s", ok)
            .retry(Retry::constant(Duration::from_millis(1)).max_attempts(0))
            .run()
            .into_future()
    );
    case!(
        "retry max_delay(ZERO)",
        Rejects("max_delay"),
        src()
            .try_map_async("s", ok)
            .retry(Retry::exponential(Duration::from_millis(1)).max_delay(ZERO))
            .run()
            .into_future()
    );
    case!(
        "retry max_elapsed(ZERO)",
        Rejects("max_elapsed"),
        src()
            .try_map_async("s", ok)
            .retry(Retry::exponential(Duration::from_millis(1)).max_elapsed(ZERO))
            .run()
            .into_future()
    );
    case!(
        "retry budget ratio(NaN)",
        Rejects("budget"),
        src()
            .try_map_async("s", ok)
            .retry(Retry::constant(Duration::from_millis(1)).budget(RetryBudget::ratio(f64::NAN)))
            .run()
            .into_future()
    );
    // A server's Retry-After is outside input: clamped, never trusted.
    case!("Retry-After u64::MAX s", Runs, {
        let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        src()
            .try_map_async("s", move |x| {
                let fail = first.swap(false, std::sync::atomic::Ordering::Relaxed);
                async move {
                    if fail && x == 0 {
                        Err(RetryAfter::new(Duration::from_secs(u64::MAX), "slow down"))
                    } else {
                        Ok(x)
                    }
                }
            })
            .retry(Retry::constant(Duration::from_millis(1)).max_delay(Duration::from_millis(5)))
            .run()
            .into_future()
    });
    // Breaker.
    case!(
        "breaker consecutive_failures(0)",
        Rejects("consecutive_failures"),
        src()
            .try_map_async("s", ok)
            .circuit_breaker(Breaker::consecutive_failures(0))
            .run()
            .into_future()
    );
    case!(
        "breaker failure_ratio(NaN)",
        Rejects("breaker.ratio"),
        src()
            .try_map_async("s", ok)
            .circuit_breaker(Breaker::failure_ratio(f64::NAN, 10))
            .run()
            .into_future()
    );
    case!(
        "breaker failure_ratio(2.0)",
        Rejects("breaker.ratio"),
        src()
            .try_map_async("s", ok)
            .circuit_breaker(Breaker::failure_ratio(2.0, 10))
            .run()
            .into_future()
    );
    case!(
        "breaker window(0)",
        Rejects("window"),
        src()
            .try_map_async("s", ok)
            .circuit_breaker(Breaker::failure_ratio(0.5, 0))
            .run()
            .into_future()
    );
    case!(
        "breaker cooldown(ZERO)",
        Rejects("cooldown"),
        src()
            .try_map_async("s", ok)
            .circuit_breaker(Breaker::consecutive_failures(3).cooldown(ZERO))
            .run()
            .into_future()
    );
    case!(
        "breaker cooldown(MAX)",
        Runs,
        src()
            .try_map_async("s", ok)
            .circuit_breaker(Breaker::consecutive_failures(3).cooldown(MAX))
            .run()
            .into_future()
    );
    case!(
        "breaker probes(0)",
        Rejects("probes"),
        src()
            .try_map_async("s", ok)
            .circuit_breaker(Breaker::consecutive_failures(3).probes(0))
            .run()
            .into_future()
    );
    // Adaptive.
    case!(
        "adaptive aimd(0..=0)",
        Rejects("adaptive"),
        src()
            .map_async("s", |x| async move { x })
            .adaptive(Adaptive::aimd(0..=0))
            .run()
            .into_future()
    );
    #[allow(clippy::reversed_empty_ranges)]
    let inverted = 10..=1;
    case!(
        "adaptive vegas(10..=1)",
        Rejects("adaptive"),
        src()
            .map_async("s", |x| async move { x })
            .adaptive(Adaptive::vegas(inverted))
            .run()
            .into_future()
    );
    case!(
        "adaptive aimd(1..=MAX)",
        Runs,
        src()
            .map_async("s", |x| async move { x })
            .adaptive(Adaptive::aimd(1..=usize::MAX))
            .run()
            .into_future()
    );
    case!(
        "adaptive backoff(NaN)",
        Rejects("backoff"),
        src()
            .map_async("s", |x| async move { x })
            .adaptive(Adaptive::vegas(1..=8).backoff(f64::NAN))
            .run()
            .into_future()
    );
    case!(
        "adaptive latency_limit(ZERO)",
        Rejects("latency_limit"),
        src()
            .map_async("s", |x| async move { x })
            .adaptive(Adaptive::aimd(1..=8).latency_limit(ZERO))
            .run()
            .into_future()
    );
    // Observers.
    case!(
        "heartbeat(ZERO)",
        Rejects("every"),
        src().heartbeat(ZERO, |_| {}).run().into_future()
    );
    case!(
        "heartbeat(MAX)",
        Runs,
        src().heartbeat(MAX, |_| {}).run().into_future()
    );
    case!(
        "progress every(ZERO)",
        Rejects("every"),
        src()
            .progress_with(ProgressOptions::new().every(ZERO))
            .run()
            .into_future()
    );
    case!(
        "progress every(MAX)",
        Runs,
        src()
            .progress_with(ProgressOptions::new().every(MAX))
            .run()
            .into_future()
    );
    case!(
        "stall_after(ZERO)",
        Rejects("after"),
        src()
            .stall_after(ZERO, StallAction::Cancel)
            .run()
            .into_future()
    );
    case!(
        "stall_after(MAX)",
        Runs,
        src()
            .stall_after(MAX, StallAction::Cancel)
            .run()
            .into_future()
    );
    // Topology.
    case!("route(0)", Rejects("branches"), {
        let mut lanes = src().route(0, |_| 0);
        lanes.pop().unwrap().run().into_future()
    });
    case!("broadcast(0)", Rejects("branches"), {
        let mut b = src().broadcast(0);
        b.pop().unwrap().run().into_future()
    });
    case!(
        "partition(0)",
        Rejects("lanes"),
        src().partition(0, |x| *x, |p| p).run().into_future()
    );
    case!(
        "Gather::new(ZERO, 1)",
        Rejects("timeout"),
        Gather::<u32, u32>::new(ZERO, 1)
            .part("a", src().map(|x| (x, x)))
            .run()
            .into_future()
    );
    case!(
        "Gather::new(MAX, 8)",
        Runs,
        Gather::<u32, u32>::new(MAX, 8)
            .part("a", src().map(|x| (x, x)))
            .run()
            .into_future()
    );
    case!(
        "Gather::new(1s, 0)",
        Rejects("max_open"),
        Gather::<u32, u32>::new(Duration::from_secs(1), 0)
            .part("a", src().map(|x| (x, x)))
            .run()
            .into_future()
    );
    // Sources.
    let pages = |after: Option<u32>| async move {
        let start = after.map_or(0, |a| a + 1);
        let items: Vec<u32> = (start..50).take(10).collect();
        Ok::<_, String>(match items.last().copied() {
            Some(last) => Page::next(items, last),
            None => Page::end(items),
        })
    };
    case!(
        "cursor commit_every(MAX)",
        Runs,
        Pipeline::from_cursor_with(
            MemoryCheckpoints::new(),
            "c",
            CursorOptions::new().commit_every(MAX),
            pages
        )
        .run()
        .into_future()
    );
    case!(
        "cursor read_ahead(0)",
        Runs,
        Pipeline::from_cursor_with(
            MemoryCheckpoints::new(),
            "c",
            CursorOptions::new().read_ahead(0),
            pages
        )
        .run()
        .into_future()
    );
    // Run options.
    case!(
        "deadline(ZERO)",
        Rejects("deadline"),
        src().run().deadline(ZERO).into_future()
    );
    case!(
        "deadline(MAX)",
        Runs,
        src().run().deadline(MAX).into_future()
    );
    v
}

/// How a case ended, judged against what it must end in.
fn judge(expect: Expect, outcome: Result<Result<Report, Error>, String>) -> Result<(), String> {
    let result = outcome?;
    match (expect, result) {
        (Runs, Ok(report)) if report.is_balanced() && report.delivered() > 0 => Ok(()),
        (Runs, Ok(report)) => Err(format!("ran but: {report}")),
        (Runs, Err(e)) => Err(format!("expected a run, got: {e}")),
        (Rejects(option), Err(Error::Config { problems })) => {
            let named = problems
                .iter()
                .any(|p: &ConfigProblem| p.option.contains(option));
            let valued = problems.iter().all(|p| !p.value.is_empty());
            if named && valued {
                Ok(())
            } else {
                Err(format!("rejected, but not naming `{option}`: {problems:?}"))
            }
        }
        (Rejects(option), Err(e)) => Err(format!("expected `{option}` rejected, got: {e}")),
        (Rejects(option), Ok(_)) => {
            Err(format!("silently accepted (expected `{option}` rejected)"))
        }
    }
}

#[test]
fn every_option_at_hostile_values_is_a_clear_error_or_a_documented_meaning() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut failures = Vec::new();
    let all = rt.block_on(async { cases() });
    let count = all.len();
    for (name, expect, fut) in all {
        let outcome = rt.block_on(async {
            match tokio::time::timeout(
                Duration::from_secs(10),
                std::panic::AssertUnwindSafe(fut).catch_unwind(),
            )
            .await
            {
                Err(_) => Err("hung (no end within 10 s)".to_string()),
                Ok(Err(_)) => Err("panicked".to_string()),
                Ok(Ok(r)) => Ok(r),
            }
        });
        if let Err(why) = judge(expect, outcome) {
            failures.push(format!("{name}: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
