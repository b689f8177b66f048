//! Rate limit, retry and circuit breaker against a simulated flaky service.
//!
//! The service answers in 2 ms, but fails one call in four ("503"), and goes down for
//! 300 ms after its 60th call. The stage calls it at most 200 times per second, retries
//! failures with exponential backoff, and a breaker pauses the source while it is down.
//! Runs in about a second.
//!
//! `cargo run --example resilience`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use flowline::prelude::*;
use tokio::time::Instant;

/// A service that fails every fourth call, and every call in its outage window.
#[derive(Clone)]
struct FlakyService {
    calls: Arc<AtomicU64>,
    started: Instant,
    outage: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl FlakyService {
    async fn get(&self, id: u32) -> Result<String, String> {
        let n = self.calls.fetch_add(1, SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
        let now = Instant::now();
        let down = {
            let mut outage = self.outage.lock().unwrap();
            if n == 60 {
                *outage = Some(now + Duration::from_millis(300));
            }
            outage.is_some_and(|until| now < until)
        };
        if down {
            Err(format!("503 service unavailable (call {n})"))
        } else if n % 4 == 0 {
            Err(format!("503 busy (call {n})"))
        } else {
            Ok(format!("user-{id} at {:?}", now - self.started))
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let service = FlakyService {
        calls: Arc::new(AtomicU64::new(0)),
        started: Instant::now(),
        outage: Arc::new(std::sync::Mutex::new(None)),
    };
    let breaker = Breaker::consecutive_failures(4)
        .cooldown(Duration::from_millis(200))
        .on_state_change(|from, to| println!("breaker: {from} -> {to}"));

    let svc = service.clone();
    let report = Pipeline::from_iter(1..=150u32)
        .try_map_async("fetch", move |id| {
            let svc = svc.clone();
            async move { svc.get(id).await }
        })
        .workers(8)
        .timeout(Duration::from_millis(100))
        .rate_limit(Rate::per_second(200))
        .retry(
            Retry::exponential(Duration::from_millis(10))
                .max_attempts(4)
                .jitter(),
        )
        .circuit_breaker(breaker.clone())
        .keep_input()
        .run()
        .await?;

    println!("{report}");
    println!(
        "service calls: {}, breaker: {:?}",
        service.calls.load(SeqCst),
        breaker.report()
    );
    for failure in report.failure_sample.iter().take(5) {
        println!("dead letter: {failure}");
    }
    assert!(report.is_balanced());
    assert_eq!(report.delivered() + report.failures, 150);
    Ok(())
}
