//! Behaviour of the engine across modules: timeouts and deadlines on the paused clock,
//! cancellation and graceful stop, no leaked tasks, the starvation trap, dead-letter targets,
//! and rejection of bad configuration.

use std::future::IntoFuture as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How many tasks the runtime has alive right now.
fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(start_paused = true)]
async fn timeout_fails_the_slow_call_and_the_clock_shows_it_was_cut() {
    let start = Instant::now();
    let (out, report) = Pipeline::from_iter([50u64, 150, 50])
        .map_async("call", |d| async move {
            tokio::time::sleep(ms(d)).await;
            d
        })
        .timeout(ms(100))
        .collect_with_report()
        .await
        .unwrap();
    // One worker: 50 ms, then cut at 100 ms, then 50 ms.
    assert_eq!(start.elapsed(), ms(200));
    assert_eq!(out, vec![50, 50]);
    let stage = report.stage("call").unwrap();
    assert_eq!((stage.received, stage.passed, stage.failed), (3, 2, 1));
    assert!(matches!(report.failure_sample[0].error, ItemError::Timeout(d) if d == ms(100)));
}

#[tokio::test(start_paused = true)]
async fn workers_run_calls_concurrently() {
    let start = Instant::now();
    let report = Pipeline::from_iter(0..100u32)
        .map_async("sleep", |x| async move {
            tokio::time::sleep(ms(10)).await;
            x
        })
        .workers(10)
        .run()
        .await
        .unwrap();
    // 100 calls of 10 ms, 10 at a time: exactly 10 rounds.
    assert_eq!(start.elapsed(), ms(100));
    assert_eq!(report.delivered(), 100);
}

#[tokio::test(start_paused = true)]
async fn ordered_stage_keeps_input_order_and_unordered_does_not_wait() {
    let delays = [40u64, 10, 30, 20];
    let ordered = Pipeline::from_iter(delays)
        .map_async("s", |d| async move {
            tokio::time::sleep(ms(d)).await;
            d
        })
        .workers(4)
        .collect()
        .await
        .unwrap();
    assert_eq!(ordered, delays);
    let unordered = Pipeline::from_iter(delays)
        .map_async("s", |d| async move {
            tokio::time::sleep(ms(d)).await;
            d
        })
        .workers(4)
        .unordered()
        .collect()
        .await
        .unwrap();
    assert_eq!(unordered, vec![10, 20, 30, 40]);
}

#[tokio::test(start_paused = true)]
async fn deadline_ends_the_run_exactly_on_time_with_a_balanced_report() {
    let start = Instant::now();
    let err = Pipeline::from_iter(0..u64::MAX)
        .map_async("tick", |x| async move {
            tokio::time::sleep(ms(10)).await;
            x
        })
        .workers(2)
        .run()
        .deadline(ms(1000))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), ms(1000));
    let Error::DeadlineExceeded { deadline, report } = err else {
        panic!("expected a deadline error")
    };
    assert_eq!(deadline, ms(1000));
    assert_eq!(report.outcome, RunOutcome::DeadlineExceeded);
    assert!(report.is_balanced());
    // 2 workers × 10 ms calls for 1 s: 200 calls finished (the last round may be cut).
    let delivered = report.delivered();
    assert!((198..=200).contains(&delivered), "delivered {delivered}");
}

#[tokio::test(start_paused = true)]
async fn stop_finishes_the_calls_in_flight_and_starts_nothing_more() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let p = pulled.clone();
    let handle = Pipeline::from_iter((0..u64::MAX).inspect(move |_| {
        p.fetch_add(1, Ordering::Relaxed);
    }))
    .map_async("work", |x| async move {
        tokio::time::sleep(ms(100)).await;
        x
    })
    .workers(4)
    .spawn();
    tokio::time::sleep(ms(250)).await;
    handle.stop();
    let report = handle.join().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Stopped);
    let source = report.stage("source").unwrap();
    assert_eq!(source.passed as usize, pulled.load(Ordering::Relaxed));
    // The calls started at 0, 100 and 200 ms (4 at a time) were delivered; what was pulled
    // and not started is unfinished at the stage: nothing lost, nothing failed.
    assert_eq!(report.delivered(), 12);
    let work = report.stage("work").unwrap();
    assert_eq!(work.unfinished, source.passed - 12);
    assert_eq!(report.unfinished(), work.unfinished);
    assert_eq!(report.failures, 0);
    assert!(report.is_balanced());
}

#[tokio::test(start_paused = true)]
async fn cancel_accounts_for_every_pulled_item() {
    let handle = Pipeline::from_iter(0..100_000u64)
        .map(|x| x + 1)
        .buffer(512)
        .map_async("work", |x| async move {
            tokio::time::sleep(ms(5)).await;
            x
        })
        .workers(8)
        .map(|x| x)
        .spawn();
    tokio::time::sleep(ms(100)).await;
    handle.cancel();
    let err = handle.join().await.unwrap_err();
    let Error::Cancelled { report } = err else {
        panic!("expected cancelled")
    };
    assert!(report.is_balanced());
    // Every item that left one stage entered the next: nothing vanished in a queue.
    for pair in report.stages.windows(2) {
        assert_eq!(
            pair[0].emitted, pair[1].received,
            "{} -> {}",
            pair[0].name, pair[1].name
        );
    }
    let unfinished: u64 = report.stages.iter().map(|s| s.unfinished).sum();
    assert!(unfinished > 0, "a cancelled run had items in flight");
    assert_eq!(
        report.stage("source").unwrap().passed,
        report.delivered() + unfinished,
    );
}

/// The trap of `buffer_unordered` (futures-rs #2387): the consumer awaits a lock that a
/// buffered future holds, and the buffered future is never polled while the consumer waits.
async fn consumer_and_stage_share_a_lock_with_flowline(lock: Arc<tokio::sync::Mutex<()>>) -> u64 {
    let stage_lock = lock.clone();
    let report = Pipeline::from_iter(0..50u32)
        .map_async("hold", move |i| {
            let l = stage_lock.clone();
            async move {
                let _g = l.lock().await;
                tokio::time::sleep(ms(1)).await;
                i
            }
        })
        .workers(8)
        .unordered()
        .for_each(move |_| {
            let l = lock.clone();
            async move {
                let _g = l.lock().await;
                tokio::time::sleep(ms(1)).await;
            }
        })
        .await
        .unwrap();
    report.delivered()
}

#[tokio::test(start_paused = true)]
async fn a_busy_consumer_does_not_starve_the_stage() {
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let done = tokio::time::timeout(
        Duration::from_secs(60),
        consumer_and_stage_share_a_lock_with_flowline(lock),
    )
    .await;
    assert_eq!(done.expect("flowline must not deadlock"), 50);

    // The same shape with buffer_unordered hangs: this is what the test guards against.
    use futures_util::StreamExt;
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let stage_lock = lock.clone();
    let baseline = futures_util::stream::iter(0..50u32)
        .map(move |i| {
            let l = stage_lock.clone();
            async move {
                let _g = l.lock().await;
                tokio::time::sleep(ms(1)).await;
                i
            }
        })
        .buffer_unordered(8)
        .for_each(move |_| {
            let l = lock.clone();
            async move {
                let _g = l.lock().await;
                tokio::time::sleep(ms(1)).await;
            }
        });
    assert!(
        tokio::time::timeout(Duration::from_secs(60), baseline)
            .await
            .is_err()
    );
}

/// Runs `make` and checks that no task of the run is left, whatever way it ended.
async fn leaves_no_task<F, Fut>(make: F)
where
    F: FnOnce(Arc<()>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = alive_tasks();
    let witness = Arc::new(());
    make(witness.clone()).await;
    assert_eq!(alive_tasks(), before, "a task of the run is still alive");
    assert_eq!(
        Arc::strong_count(&witness),
        1,
        "user code captured by the run is still held"
    );
}

fn slow_plan(witness: Arc<()>) -> Pipeline<u64> {
    Pipeline::from_iter(0..1_000_000u64)
        .buffer(256)
        .map_async("work", move |x| {
            let _keep = witness.clone();
            async move {
                tokio::time::sleep(ms(1)).await;
                x
            }
        })
        .workers(4)
        .buffer(256)
        .into_pipeline()
}

#[tokio::test(start_paused = true)]
async fn no_task_outlives_cancel() {
    leaves_no_task(|w| async move {
        let h = slow_plan(w).spawn();
        tokio::time::sleep(ms(20)).await;
        h.cancel();
        assert!(matches!(h.join().await, Err(Error::Cancelled { .. })));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn no_task_outlives_stop() {
    leaves_no_task(|w| async move {
        let h = slow_plan(w).spawn();
        tokio::time::sleep(ms(20)).await;
        h.stop();
        assert_eq!(h.join().await.unwrap().outcome, RunOutcome::Stopped);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn no_task_outlives_a_deadline() {
    leaves_no_task(|w| async move {
        let r = slow_plan(w).run().deadline(ms(30)).await;
        assert!(matches!(r, Err(Error::DeadlineExceeded { .. })));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn no_task_outlives_error_policy_stop() {
    leaves_no_task(|w| async move {
        let r = slow_plan(w.clone())
            .try_map_async("check", |x| async move {
                if x == 77 { Err("bad") } else { Ok(x) }
            })
            .run()
            .error_policy(ErrorPolicy::Stop)
            .await;
        let Err(Error::ItemFailed { failure, report }) = r else {
            panic!("expected ItemFailed")
        };
        assert_eq!(&*failure.stage, "check");
        assert_eq!(report.stage("check").unwrap().failed, 1);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn no_task_outlives_a_panicking_sink_and_the_panic_fails_one_item() {
    leaves_no_task(|w| async move {
        let report = slow_plan(w)
            .filter(|x| *x < 100)
            .for_each(|x| async move {
                if x == 42 {
                    panic!("sink broke on 42");
                }
            })
            .await;
        // The source is long; stop it by deadline-free means: the filter drops the rest.
        let report = report.unwrap();
        assert_eq!(report.stage("for_each").unwrap().failed, 1);
        assert_eq!(report.delivered(), 99);
        assert_eq!(
            report.failure_sample[0].error.to_string(),
            "panicked: sink broke on 42"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn no_task_outlives_a_dropped_handle() {
    leaves_no_task(|w| async move {
        let h = slow_plan(w).spawn();
        tokio::time::sleep(ms(20)).await;
        drop(h);
        // Dropping cancels; give the runtime a moment to wind the run down.
        tokio::time::sleep(ms(100)).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_stage_fails_the_item_not_the_run() {
    let (out, report) = Pipeline::from_iter(0..10u32)
        .map_async("explode", |x| async move {
            if x % 4 == 0 {
                panic!("no multiples of four");
            }
            x
        })
        .workers(3)
        .keep_input()
        .collect_with_report()
        .await
        .unwrap();
    assert_eq!(out, vec![1, 2, 3, 5, 6, 7, 9]);
    assert_eq!(report.failures, 3);
    let mut inputs: Vec<u32> = report
        .failure_sample
        .iter()
        .map(|f| *f.input.as_ref().unwrap().downcast_ref::<u32>().unwrap())
        .collect();
    inputs.sort();
    assert_eq!(inputs, vec![0, 4, 8]);
}

#[tokio::test]
async fn dead_letters_reach_a_channel_and_a_callback() {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1); // smaller than the number of failures
    let report = Pipeline::from_iter(0..20u32)
        .try_map_async("odd", |x| async move {
            if x % 2 == 1 {
                Err(format!("odd {x}"))
            } else {
                Ok(x)
            }
        })
        .workers(4)
        .run()
        .dead_letter(DeadLetter::channel(tx));
    let reader = tokio::spawn(async move {
        let mut got = vec![];
        while let Some(f) = rx.recv().await {
            got.push(f.error.to_string());
        }
        got
    });
    let report = report.await.unwrap();
    assert_eq!(report.failures, 10);
    let mut got = reader.await.unwrap();
    got.sort();
    assert_eq!(
        got.len(),
        10,
        "every failure reached the channel before run() returned"
    );

    let seen = Arc::new(Mutex::new(0));
    let s = seen.clone();
    Pipeline::from_iter(0..5u32)
        .try_map_async("never", |_| async { Err::<u32, _>("no") })
        .run()
        .dead_letter(DeadLetter::callback(move |_| *s.lock().unwrap() += 1))
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), 5);
}

#[cfg(feature = "jsonl")]
#[tokio::test]
async fn dead_letters_are_written_to_a_jsonl_file() {
    // A file of this process's own in the system's temp folder (no temp-dir crate needed):
    // the sink appends, so a leftover of an earlier run is removed first.
    let path = std::env::temp_dir().join(format!(
        "flowline-dead-letters-{}.jsonl",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    Pipeline::from_iter(["1", "x", "3", "y"])
        .try_map_async("parse", |s| async move { s.parse::<u32>() })
        .keep_input()
        .run()
        .dead_letter(DeadLetter::jsonl(&path))
        .await
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let mut inputs: Vec<&str> = lines.iter().map(|l| l["input"].as_str().unwrap()).collect();
    inputs.sort();
    assert_eq!(inputs, vec!["\"x\"", "\"y\""]);
    assert_eq!(lines[0]["stage"], "parse");
    assert_eq!(lines[0]["kind"], "error");
    assert_eq!(lines[0]["attempts"], 1);
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn bad_configuration_is_rejected_before_anything_runs() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let p = pulled.clone();
    let src = move || {
        let p = p.clone();
        (0..10u32).inspect(move |_| {
            p.fetch_add(1, Ordering::Relaxed);
        })
    };
    let cases: Vec<(Result<Report, Error>, &str)> = vec![
        (
            Pipeline::from_iter(src())
                .map_async("fetch", |x| async move { x })
                .workers(0)
                .run()
                .await,
            "invalid configuration: stage `fetch`: workers = 0: must be at least 1",
        ),
        (
            Pipeline::from_iter(src())
                .map_async("fetch", |x| async move { x })
                .timeout(Duration::ZERO)
                .run()
                .await,
            "invalid configuration: stage `fetch`: timeout = 0ns: must be more than zero",
        ),
        (
            Pipeline::from_iter(src()).buffer(0).run().await,
            "invalid configuration: stage `buffer`: capacity = 0: must be at least 1 item",
        ),
        (
            Pipeline::from_iter(src())
                .run()
                .deadline(Duration::ZERO)
                .await,
            "invalid configuration: stage `run`: deadline = 0ns: must be more than zero",
        ),
    ];
    for (result, message) in cases {
        assert_eq!(result.unwrap_err().to_string(), message);
    }
    assert_eq!(pulled.load(Ordering::Relaxed), 0, "nothing ran");
}

#[test]
fn outside_a_runtime_the_error_says_so() {
    // Polled once by hand, outside any runtime: the run must fail at once, not wait.
    let run = std::pin::pin!(Pipeline::from_iter(0..3).run().into_future());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let r = run.poll(&mut cx);
    assert!(matches!(r, std::task::Poll::Ready(Err(Error::NoRuntime))));
}

#[tokio::test(start_paused = true)]
async fn snapshot_shows_live_counters() {
    let handle = Pipeline::from_iter(0..1000u32)
        .map_async("slow", |x| async move {
            tokio::time::sleep(ms(10)).await;
            x
        })
        .workers(5)
        .spawn();
    tokio::time::sleep(ms(95)).await;
    let snap = handle.snapshot();
    assert_eq!(snap.outcome, RunOutcome::Running);
    let slow = snap.stage("slow").unwrap();
    // 9 full rounds of 5 calls have finished; the 10th round is in flight.
    assert_eq!(slow.passed, 45);
    assert_eq!(slow.unfinished, slow.received - 45);
    handle.cancel();
    let _ = handle.join().await;
}

#[tokio::test]
async fn source_kinds_all_deliver_everything() {
    use futures_util::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for i in 0..1000u32 {
            tx.send(i).await.unwrap();
        }
    });
    assert_eq!(
        Pipeline::from_channel(rx).collect().await.unwrap(),
        (0..1000).collect::<Vec<_>>()
    );
    let s = futures_util::stream::iter(0..1000u32).then(|x| async move {
        tokio::task::yield_now().await;
        x
    });
    assert_eq!(
        Pipeline::from_stream(s).collect().await.unwrap(),
        (0..1000).collect::<Vec<_>>()
    );
    let mut n = 0u32;
    let out = Pipeline::from_fn(move || {
        n += 1;
        let v = (n <= 1000).then_some(n - 1);
        async move {
            tokio::task::yield_now().await;
            v
        }
    })
    .collect()
    .await
    .unwrap();
    assert_eq!(out, (0..1000).collect::<Vec<_>>());
}
