//! The main job: enrich 20,000 orders through a flaky, slow service — 32 calls in flight,
//! a timeout per call, failures kept in a dead-letter file, and a report of every stage.
//!
//! ```sh
//! cargo run --release --example quickstart
//! ```
//!
//! The "database" is a generated table paged 500 rows at a time (the source is pulled: a
//! page is read only when the pipeline has room); the "service" answers in 1–8 ms, fails 3%
//! of calls and hangs on 0.5% of them, which the 50 ms timeout turns into failures.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flowline::prelude::*;

#[derive(Debug, Clone)]
struct Order {
    id: u64,
    customer: u64,
    cents: u64,
}

#[derive(Debug)]
struct Enriched {
    order: Order,
    tier: &'static str,
}

/// A deterministic pseudo-random number for `x` (splitmix64), so every run sees the same data.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Reads one page of the generated `orders` table: `where id > after order by id limit n`.
async fn fetch_page(after: u64, n: u64, total: u64) -> Vec<Order> {
    tokio::time::sleep(Duration::from_millis(2)).await; // a round trip to the database
    (after + 1..=(after + n).min(total))
        .map(|id| Order {
            id,
            customer: mix(id) % 5_000,
            cents: mix(id ^ 0xABCD) % 100_000,
        })
        .collect()
}

/// The flaky customer service.
struct CustomerService {
    calls: AtomicU64,
}

impl CustomerService {
    async fn tier(&self, customer: u64, attempt_salt: u64) -> Result<&'static str, String> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let r = mix(customer ^ attempt_salt);
        if r % 200 == 0 {
            tokio::time::sleep(Duration::from_secs(30)).await; // hangs
        }
        tokio::time::sleep(Duration::from_millis(1 + r % 8)).await;
        if r % 100 < 3 {
            return Err(format!("503 from customer service for customer {customer}"));
        }
        Ok(match customer % 10 {
            0 => "gold",
            1..=3 => "silver",
            _ => "bronze",
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    const TOTAL: u64 = 20_000;
    const PAGE: u64 = 500;
    let service = Arc::new(CustomerService {
        calls: AtomicU64::new(0),
    });
    let dead_letters = std::env::temp_dir().join("flowline-quickstart-failed.jsonl");
    let _ = std::fs::remove_file(&dead_letters);

    // The source pages through the table with keyset pagination.
    let mut after = 0u64;
    let pages = Pipeline::from_fn(move || {
        let from = after;
        after += PAGE;
        async move {
            let page = fetch_page(from, PAGE, TOTAL).await;
            (!page.is_empty()).then_some(page)
        }
    });

    let svc = service.clone();
    let revenue = Arc::new(AtomicU64::new(0));
    let total_revenue = revenue.clone();
    let report = pages
        .flat_map(|page| page)
        .filter(|order| order.cents > 0)
        .try_map_async("customer-tier", move |order: Order| {
            let svc = svc.clone();
            async move {
                let tier = svc.tier(order.customer, order.id).await?;
                Ok::<_, String>(Enriched { order, tier })
            }
        })
        .workers(32)
        .timeout(Duration::from_millis(50))
        .keep_input()
        .unordered()
        .map(|e| {
            if e.tier == "gold" {
                e.order.cents
            } else {
                e.order.cents / 2
            }
        })
        .for_each(move |cents| {
            let revenue = revenue.clone();
            async move {
                revenue.fetch_add(cents, Ordering::Relaxed);
            }
        })
        .dead_letter(DeadLetter::jsonl(&dead_letters))
        .await?;

    println!("{report}");
    println!(
        "service calls: {}, weighted revenue: {:.2}, dead letters: {} (in {})",
        service.calls.load(Ordering::Relaxed),
        total_revenue.load(Ordering::Relaxed) as f64 / 100.0,
        report.failures,
        dead_letters.display()
    );
    let stage = report
        .stage("customer-tier")
        .expect("the stage is in the report");
    assert_eq!(
        stage.received,
        stage.passed + stage.failed,
        "every order is accounted for"
    );
    assert_eq!(
        report.delivered() + report.failures,
        TOTAL,
        "nothing was lost"
    );
    Ok(())
}
