//! Property test of the accounting rule: for random inputs, failures, panics, worker counts,
//! orderings, per-item delays and cancel/stop points, every item is accounted for exactly
//! once, nothing is delivered twice, and ordered stages keep input order.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Interrupt {
    None,
    Cancel(u64),
    Stop(u64),
}

#[derive(Debug, Clone)]
struct Case {
    n: u32,
    workers: usize,
    ordered: bool,
    drop_mod: u32,
    fail_mod: u32,
    panic_mod: u32,
    delay_seed: u64,
    boundary: bool,
    interrupt: Interrupt,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u32..600,
        1usize..12,
        any::<bool>(),
        2u32..9,
        3u32..13,
        5u32..17,
        any::<u64>(),
        any::<bool>(),
        prop_oneof![
            Just(Interrupt::None),
            (0u64..60).prop_map(Interrupt::Cancel),
            (0u64..60).prop_map(Interrupt::Stop),
        ],
    )
        .prop_map(
            |(
                n,
                workers,
                ordered,
                drop_mod,
                fail_mod,
                panic_mod,
                delay_seed,
                boundary,
                interrupt,
            )| Case {
                n,
                workers,
                ordered,
                drop_mod,
                fail_mod,
                panic_mod,
                delay_seed,
                boundary,
                interrupt,
            },
        )
}

fn delay(seed: u64, id: u32) -> Duration {
    let h = (id as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59;
    Duration::from_millis(h) // 0..=31 ms
}

/// The plan under test, up to (and including) the async stage.
fn plan(c: &Case) -> Pipeline<u32> {
    let (fail_mod, panic_mod, seed, drop_mod) = (c.fail_mod, c.panic_mod, c.delay_seed, c.drop_mod);
    let mut plan = Pipeline::from_iter(0..c.n).filter(move |x| x % drop_mod != 0);
    if c.boundary {
        plan = plan.buffer(64);
    }
    let stage = plan
        .try_map_async("work", move |id: u32| async move {
            tokio::time::sleep(delay(seed, id)).await;
            if id % panic_mod == 1 {
                panic!("item {id} panics");
            }
            if id % fail_mod == 1 {
                return Err(format!("item {id} fails"));
            }
            Ok(id)
        })
        .workers(c.workers)
        .keep_input();
    if c.ordered {
        stage.into_pipeline()
    } else {
        stage.unordered().into_pipeline()
    }
}

async fn run_case(c: Case) -> Result<(), TestCaseError> {
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let (at, cancel) = match c.interrupt {
        Interrupt::None => {
            let sink = delivered.clone();
            let report = plan(&c)
                .map(|x| x)
                .for_each(move |x| {
                    let sink = sink.clone();
                    async move { sink.lock().unwrap().push(x) }
                })
                .await
                .map_err(|e| TestCaseError::fail(format!("run failed: {e}")))?;
            return check(&c, &report, &delivered.lock().unwrap(), true);
        }
        Interrupt::Cancel(t) => (t, true),
        Interrupt::Stop(t) => (t, false),
    };
    let sink = delivered.clone();
    let handle = plan(&c)
        .inspect(move |x| sink.lock().unwrap().push(*x))
        .spawn();
    tokio::time::sleep(Duration::from_millis(at)).await;
    if cancel {
        handle.cancel();
    } else {
        handle.stop();
    }
    let report = match handle.join().await {
        Ok(r) => r,
        Err(Error::Cancelled { report }) => *report,
        Err(e) => return Err(TestCaseError::fail(format!("unexpected error: {e}"))),
    };
    // After a cancel, items seen by `inspect` may not have reached the sink.
    let seen = delivered.lock().unwrap().clone();
    check(&c, &report, &seen, report.outcome != RunOutcome::Cancelled)
}

fn check(
    c: &Case,
    report: &Report,
    delivered: &[u32],
    finished: bool,
) -> Result<(), TestCaseError> {
    // Nothing delivered twice, nothing invented.
    let set: HashSet<u32> = delivered.iter().copied().collect();
    prop_assert_eq!(set.len(), delivered.len(), "an item was delivered twice");
    prop_assert!(delivered.iter().all(|x| *x < c.n));
    if c.ordered {
        prop_assert!(
            delivered.windows(2).all(|w| w[0] < w[1]),
            "order broken: {:?}",
            delivered
        );
    }
    // Every stage balances, and what leaves one stage enters the next: no queue loses items.
    prop_assert!(report.is_balanced(), "unbalanced: {report}");
    for pair in report.stages.windows(2) {
        prop_assert_eq!(
            pair[0].emitted,
            pair[1].received,
            "{} -> {}",
            &pair[0].name,
            &pair[1].name
        );
    }
    let source = report.stage("source").unwrap();
    let dropped: u64 = report.stages.iter().map(|s| s.dropped).sum();
    let failed: u64 = report.stages.iter().map(|s| s.failed).sum();
    let unfinished: u64 = report.stages.iter().map(|s| s.unfinished).sum();
    // Each pulled item ended in exactly one of: delivered, dropped, failed, unfinished.
    prop_assert_eq!(
        source.passed,
        report.delivered() + dropped + failed + unfinished
    );
    prop_assert_eq!(failed, report.failures);
    if finished {
        prop_assert_eq!(unfinished, 0);
        prop_assert_eq!(report.delivered() as usize, delivered.len());
        // The failures are exactly the pulled items that were meant to fail or panic.
        let pulled = source.passed as u32;
        let expect_failed: HashSet<u32> = (0..pulled)
            .filter(|x| x % c.drop_mod != 0 && (x % c.panic_mod == 1 || x % c.fail_mod == 1))
            .collect();
        let got_failed: HashSet<u32> = report
            .failure_sample
            .iter()
            .map(|f| *f.input.as_ref().unwrap().downcast_ref::<u32>().unwrap())
            .collect();
        if expect_failed.len() <= Report::FAILURE_SAMPLE {
            prop_assert_eq!(got_failed, expect_failed);
        }
        if matches!(c.interrupt, Interrupt::None) {
            prop_assert_eq!(
                source.passed,
                c.n as u64,
                "a completed run pulls everything"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn every_item_is_accounted_for_exactly_once(c in case()) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run_case(c))?;
    }
}
