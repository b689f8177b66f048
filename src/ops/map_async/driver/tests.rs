//! The driver's tests: plain stages over mixed calls, and stops around a failing call.

use crate::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A plain stage (no policy, no retry) over 3,000 items whose calls are ready at once,
/// wait (every 7th), fail (every 97th), or panic when made (100) or when polled (200):
/// returns what came out, in order, and the report.
async fn plain_mix(ordered: bool) -> (Vec<u32>, Report) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let seen = out.clone();
    let stage = Pipeline::from_iter(0..3_000u32)
        .try_map_async("mix", |x| {
            assert_ne!(x, 100, "panics when made");
            async move {
                assert_ne!(x, 200, "panics when polled");
                if x % 7 == 0 {
                    tokio::time::sleep(Duration::from_millis(u64::from(x % 5) + 1)).await;
                }
                if x % 97 == 0 { Err("bad") } else { Ok(x) }
            }
        })
        .workers(8);
    let stage = if ordered { stage } else { stage.unordered() };
    let report = stage
        .inspect(move |x| seen.lock().unwrap().push(*x))
        .run()
        .await
        .unwrap();
    let out = out.lock().unwrap().clone();
    (out, report)
}

fn expected() -> Vec<u32> {
    (0..3_000u32)
        .filter(|x| x % 97 != 0 && *x != 100 && *x != 200)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_plain_ordered_stage_mixes_quick_and_waiting_calls_in_input_order() {
    let (out, report) = plain_mix(true).await;
    assert_eq!(out, expected());
    assert_eq!(report.failures, 3_000 - expected().len() as u64);
    assert!(report.is_balanced());
}

#[tokio::test(start_paused = true)]
async fn a_plain_unordered_stage_accounts_for_every_item() {
    let (mut out, report) = plain_mix(false).await;
    // Unordered: a waiting call does not hold the quick ones behind it.
    assert_ne!(out, expected());
    out.sort_unstable();
    assert_eq!(out, expected());
    assert_eq!(report.failures, 3_000 - expected().len() as u64);
    assert!(report.is_balanced());
}

/// An ordered stage stopped while its first item's call is in flight, the results behind
/// it already done: the first call fails after the stop, and whether its item would be
/// tried again (a retry) or held (a pausing breaker), it is left unfinished and the
/// results behind it go out; the run ends.
async fn stopped_with_a_failing_first_call(retry: Option<Retry>, breaker: Option<Breaker>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let seen = out.clone();
    let mut work = Pipeline::from_iter(1..=3u32)
        .try_map_async("work", |x| async move {
            let ms = if x == 1 { 30 } else { 5 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if x == 1 { Err("down") } else { Ok(x) }
        })
        .workers(3);
    if let Some(retry) = retry {
        work = work.retry(retry);
    }
    if let Some(breaker) = breaker {
        work = work.circuit_breaker(breaker);
    }
    let handle = work
        .for_each(move |x| {
            seen.lock().unwrap().push(x);
            async {}
        })
        .deadline(Duration::from_secs(3600))
        .spawn();
    tokio::time::sleep(Duration::from_millis(10)).await;
    handle.stop();
    let report = handle.join().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Stopped);
    assert_eq!(*out.lock().unwrap(), vec![2, 3]);
    let work = report.stage("work").unwrap();
    assert_eq!((work.passed, work.failed, work.unfinished), (2, 0, 1));
    assert!(report.is_balanced(), "{report}");
}

#[tokio::test(start_paused = true)]
async fn a_stop_leaves_an_item_due_for_a_retry_and_sends_the_results_behind_it() {
    let retry = Retry::exponential(Duration::from_millis(10)).max_attempts(3);
    stopped_with_a_failing_first_call(Some(retry), None).await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_leaves_an_item_a_pausing_breaker_holds_and_sends_the_results_behind_it() {
    let breaker = Breaker::consecutive_failures(1)
        .cooldown(Duration::from_millis(50))
        .on_open(OnOpen::Pause);
    stopped_with_a_failing_first_call(None, Some(breaker)).await;
}
