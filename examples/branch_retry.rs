//! The pipe `generator | fork(10) | task1 | task2 | branch | error:retry success:print` as
//! one flowline graph: a generator, ten workers, two tasks, a branch on the result where the
//! errors go through a retry and the successes are printed.
//!
//! Run with `cargo run --example branch_retry`.

use flowline::prelude::*;
use std::time::Duration;

/// The second task fails now and then (here: every 7th job on its first attempt).
async fn task2(job: u64, attempt: u32) -> Result<u64, String> {
    tokio::time::sleep(Duration::from_millis(2)).await;
    if job % 7 == 0 && attempt == 1 {
        Err(format!("job {job}: transient failure"))
    } else {
        Ok(job * 10)
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (ok, failed) = Pipeline::from_iter(1..=100u64) // generator
        .map_async("task1", |job| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            job + 1
        })
        .workers(10) // fork(10)
        .try_map_async("task2", |job| task2(job, flowline::attempt()))
        .workers(10)
        .results() // a failure is an item too: Err(Failed { input, error, stage, attempts })
        .branch_result(); // branch

    // error:retry — the library's retry: up to 3 more attempts with a backoff; the call
    // learns its attempt (counting the one made in task2). What still fails is a dead
    // letter, with its input, error and attempts.
    let retried = failed
        .inspect(|f| eprintln!("retrying: {f}"))
        .try_map_async("retry", |f: Failed<u64>| {
            task2(f.input, f.attempts + flowline::attempt())
        })
        .workers(4)
        .retry(Retry::exponential(Duration::from_millis(5)).max_attempts(3))
        .keep_input();

    // success:print — the successes of both paths.
    let report = Graph::new()
        .for_each(
            ok.merge_with(retried),
            |v| async move { println!("ok {v}") },
        )
        .run()
        .await?;
    eprintln!("{report}");
    assert_eq!(report.delivered(), 100);
    assert_eq!(report.failures, 0);
    assert!(report.is_balanced());
    Ok(())
}
