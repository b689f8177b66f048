//! The seed's pipe, `generator | fork(10) | task1 | task2 | branch | error:retry success:print`,
//! as one flowline graph: a generator, ten workers, two tasks, a branch on the result where
//! the errors go through a retry and the successes are printed.
//!
//! Run with `cargo run --example seed_pipe`.

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
        .map_async("task2", |job| async move {
            task2(job, 1).await.map_err(|_| job)
        })
        .workers(10)
        .branch_result(); // branch

    // error:retry — call task2 again, up to 3 more attempts; what still fails is dead-lettered.
    let retried = failed
        .try_map_async("retry", |job| async move {
            let mut last = String::new();
            for attempt in 2..=4 {
                match task2(job, attempt).await {
                    Ok(v) => return Ok(v),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
        .workers(4);

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
    assert!(report.is_balanced());
    Ok(())
}
