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
