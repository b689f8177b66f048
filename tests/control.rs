//! Steering a running pipeline on tokio's paused clock: pause freezes the source, resume
//! continues, `step(n)` lets exactly `n` items out, and nothing is dropped or duplicated.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;

fn source_count(h: &Handle) -> u64 {
    h.snapshot().stages[0].received
}

fn sink_count(h: &Handle) -> u64 {
    h.snapshot().stages.last().unwrap().passed
}

#[tokio::test(start_paused = true)]
async fn pause_freezes_the_source_step_releases_exactly_n_and_resume_finishes_everything() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let h = Pipeline::from_iter(0..2_000u32)
        .map_async("work", |x| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            x
        })
        .workers(4)
        .inspect(move |x| s.lock().unwrap().push(*x))
        .spawn();

    tokio::time::sleep(Duration::from_millis(100)).await;
    h.pause();
    assert!(h.is_paused());
    let frozen = source_count(&h);
    assert!(frozen > 0 && frozen < 2_000, "pulled {frozen}");
    // A long pause: the source count does not move; everything pulled finishes.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(source_count(&h), frozen, "paused source was pulled");
    assert_eq!(
        sink_count(&h),
        frozen,
        "in-flight items finish while paused"
    );

    // step(n): exactly n more, then frozen again.
    h.step(7);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(source_count(&h), frozen + 7);
    assert_eq!(sink_count(&h), frozen + 7);
    h.step(1);
    h.step(2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(source_count(&h), frozen + 10);
    assert!(h.is_paused());

    h.resume();
    assert!(!h.is_paused());
    let report = h.join().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Completed);
    assert_eq!(report.delivered(), 2_000);
    assert!(report.is_balanced());
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(
        got,
        (0..2_000).collect::<Vec<_>>(),
        "no item lost or duplicated"
    );
}

#[tokio::test(start_paused = true)]
async fn step_works_for_a_generator_source_and_stop_while_paused_ends_the_run() {
    let mut n = 0u64;
    let h = Pipeline::from_fn(move || {
        n += 1;
        let x = n;
        async move { Some(x) }
    })
    .map_async("work", |x| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        x
    })
    .spawn();
    h.pause();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Paused before the first pull: nothing came out.
    assert_eq!(source_count(&h), 0);
    h.step(3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!((source_count(&h), sink_count(&h)), (3, 3));
    h.stop();
    let report = h.join().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Stopped);
    assert_eq!(report.delivered(), 3);
    assert!(report.is_balanced());
}

#[tokio::test(start_paused = true)]
async fn resume_drops_unused_step_permits() {
    let h = Pipeline::from_iter(0..100u32)
        .map_async("work", |x| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            x
        })
        .spawn();
    h.pause();
    h.step(5);
    h.resume();
    h.pause();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The 5 permits were either used before `resume` or dropped by it; none survive into
    // the second pause.
    let c = source_count(&h);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(source_count(&h), c);
    h.resume();
    assert_eq!(h.join().await.unwrap().delivered(), 100);
}

/// An endless pipeline of 10 ms calls, 4 at a time.
fn endless() -> Pipeline<u64> {
    Pipeline::from_iter(0..u64::MAX)
        .map_async("work", |x| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            x
        })
        .workers(4)
        .into_pipeline()
}

#[tokio::test(start_paused = true)]
async fn a_token_handed_in_cancels_the_run_and_every_item_is_accounted_for() {
    let shutdown = flowline::CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1005)).await;
        s.cancel();
    });
    let t0 = tokio::time::Instant::now();
    let err = endless().run().cancel_on(shutdown).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_millis(1005));
    let Error::Cancelled { report } = err else {
        panic!("{err}")
    };
    assert_eq!(report.outcome, RunOutcome::Cancelled);
    assert!(report.is_balanced(), "{report}");
    let work = report.stage("work").unwrap();
    // 100 rounds of 4 calls passed; the 4 calls in flight (and the items waiting for a
    // worker) were counted, unfinished.
    assert_eq!(work.passed, 400);
    assert!(work.unfinished >= 4, "{report}");
    assert_eq!(work.received, work.passed + work.unfinished);
}

#[tokio::test(start_paused = true)]
async fn cancelling_the_run_leaves_the_token_handed_in_alone() {
    let shutdown = flowline::CancellationToken::new();
    let h = endless().run().cancel_on(shutdown.clone()).spawn();
    let out = h.cancellation_token();
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.cancel();
    assert!(
        out.is_cancelled(),
        "the run's own token says it was cancelled"
    );
    assert!(matches!(h.join().await, Err(Error::Cancelled { .. })));
    assert!(!shutdown.is_cancelled());
}

#[tokio::test(start_paused = true)]
async fn the_token_given_out_is_cancelled_with_the_run_and_cancels_it() {
    // Cancelled with the run: by a deadline.
    let h = endless().run().deadline(Duration::from_secs(1)).spawn();
    let token = h.cancellation_token();
    assert!(!token.is_cancelled());
    let beside = tokio::spawn(async move {
        token.cancelled().await;
        tokio::time::Instant::now()
    });
    let t0 = tokio::time::Instant::now();
    assert!(matches!(
        h.join().await,
        Err(Error::DeadlineExceeded { .. })
    ));
    assert_eq!(beside.await.unwrap() - t0, Duration::from_secs(1));

    // A run that completes leaves it alone.
    let h = Pipeline::from_iter(0..10u32).spawn();
    let token = h.cancellation_token();
    assert_eq!(h.join().await.unwrap().delivered(), 10);
    assert!(!token.is_cancelled());

    // Cancelling it cancels the run.
    let h = endless().spawn();
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.cancellation_token().cancel();
    let Err(Error::Cancelled { report }) = h.join().await else {
        panic!("not cancelled")
    };
    assert!(report.is_balanced(), "{report}");
}

#[tokio::test(start_paused = true)]
async fn a_cloned_control_steers_the_run_from_other_tasks() {
    let h = endless().spawn();
    let control = h.control();
    let (pauser, stopper) = (control.clone(), control.clone());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        pauser.pause();
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(h.is_paused(), "paused by a clone");
    let frozen = control.snapshot().stages[0].received;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(control.snapshot().stages[0].received, frozen);
    control.resume();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(control.snapshot().stages[0].received > frozen);
    tokio::spawn(async move { stopper.stop() });
    let report = h.join().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Stopped);
    assert!(report.is_balanced(), "{report}");
    // A stop starts nothing new: what the stage had pulled and not started is unfinished,
    // nothing failed.
    assert_eq!(report.failures, 0);
    assert_eq!(
        report.stage("work").unwrap().unfinished,
        report.stages[0].emitted - report.delivered()
    );
    // Once the run has ended, a control does nothing (and does not panic).
    control.cancel();
    control.stop();
}
