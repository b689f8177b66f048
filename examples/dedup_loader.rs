//! User ids arrive from a stream (with many repeats), are deduplicated, and
//! looked up through a `Loader`, so that each batch of ids costs one call to the database.
//!
//! Run with `cargo run --example dedup_loader`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flowline::prelude::*;

#[derive(Debug, Clone)]
#[allow(dead_code)]
struct User {
    id: u32,
    name: String,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // The "database": one query per batch of ids (SELECT ... WHERE id IN (...)).
    let queries = Arc::new(AtomicU64::new(0));
    let q = queries.clone();
    let users = Loader::new(100, Duration::from_millis(5), move |ids: Vec<u32>| {
        q.fetch_add(1, Ordering::Relaxed);
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await; // the round trip
            let found: HashMap<u32, User> = ids
                .into_iter()
                .filter(|id| id % 50 != 0) // some ids do not exist
                .map(|id| {
                    (
                        id,
                        User {
                            id,
                            name: format!("user-{id}"),
                        },
                    )
                })
                .collect();
            Ok::<_, std::io::Error>(found)
        }
    })?;

    // 10,000 events naming 1,000 distinct users, in a scattered order.
    let events = (0..10_000u32).map(|i| (i.wrapping_mul(7919)) % 1_000);

    let (found, report) = Pipeline::from_iter(events)
        .dedup_by(|id| *id, Window::ttl(Duration::from_secs(60)))
        .map_async("lookup", move |id| {
            let users = users.clone();
            async move { users.load(id).await }
        })
        .workers(64) // concurrent loads coalesce into batches of up to 100 ids
        .unordered()
        .filter_map(|r| r.ok().flatten())
        .collect_with_report()
        .await?;

    println!("{report}");
    println!(
        "{} users found from 10,000 events with {} queries",
        found.len(),
        queries.load(Ordering::Relaxed)
    );
    assert_eq!(found.len(), 980);
    assert!(queries.load(Ordering::Relaxed) <= 40);
    Ok(())
}
