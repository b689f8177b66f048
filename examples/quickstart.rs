//! The main job: enrich 20,000 orders through a flaky, slow customer service — 64 calls in
//! flight under the service's rate limit, a timeout per call, retries with backoff for what
//! is worth retrying, a live bar on a terminal, failures kept in a dead-letter file, and a
//! report of every stage at the end, and the metrics a Prometheus server would scrape.
//!
//! ```sh
//! cargo run --release --example quickstart --features progress,metrics  # bar and metrics
//! cargo run --release --example quickstart -- --json                     # the report as JSON
//! ```
//!
//! The "database" is a generated table paged 500 rows at a time (the source is pulled: a
//! page is read only when the pipeline has room). The "service" takes 10,000 calls a second,
//! answers in 1–8 ms, fails 3% of calls with a 503 and hangs on 0.5% of them (the 50 ms
//! timeout turns those into failures): both pass on a retry. It answers 404 for the
//! customers it does not know, which no retry fixes, so those are not retried: the failures
//! left at the end, in the dead-letter file, are the orders that stay failed.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flowline::ProgressOptions;
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

/// What the service answers instead of a tier.
#[derive(Debug)]
enum ServiceError {
    /// 503: busy; the next call may well pass.
    Unavailable,
    /// 404: this customer does not exist; asking again changes nothing.
    UnknownCustomer(u64),
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceError::Unavailable => f.write_str("503 service unavailable"),
            ServiceError::UnknownCustomer(c) => write!(f, "404 no customer {c}"),
        }
    }
}

impl std::error::Error for ServiceError {}

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
    /// `attempt` varies the outcome of a transient fault, as a real retry would.
    async fn tier(
        &self,
        customer: u64,
        order: u64,
        attempt: u32,
    ) -> Result<&'static str, ServiceError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if customer % 500 == 7 {
            return Err(ServiceError::UnknownCustomer(customer));
        }
        let r = mix(order ^ (u64::from(attempt) << 40));
        if r % 200 == 0 {
            tokio::time::sleep(Duration::from_secs(30)).await; // hangs
        }
        tokio::time::sleep(Duration::from_millis(1 + r % 8)).await;
        if r % 100 < 3 {
            return Err(ServiceError::Unavailable);
        }
        Ok(match customer % 10 {
            0 => "gold",
            1..=3 => "silver",
            _ => "bronze",
        })
    }
}

/// A failure worth another call: anything but an unknown customer.
fn worth_retrying(e: &ItemError) -> bool {
    let unknown = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<ServiceError>())
        .is_some_and(|s| matches!(s, ServiceError::UnknownCustomer(_)));
    !unknown && matches!(e, ItemError::User(_) | ItemError::Timeout(_))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // flowline emits metrics through the `metrics` facade; the application picks the
    // exporter. A service serves them to Prometheus (see examples/prometheus); this job
    // keeps them and prints them at the end.
    #[cfg(feature = "metrics")]
    let metrics_text = metrics_text::Recorder::install();
    const TOTAL: u64 = 20_000;
    const PAGE: u64 = 500;
    let json = std::env::args().any(|a| a == "--json");
    let service = Arc::new(CustomerService {
        calls: AtomicU64::new(0),
    });
    let dead_letters = std::env::temp_dir().join("flowline-quickstart-failed.jsonl");
    let _ = std::fs::remove_file(&dead_letters);

    // Metrics: an application that exports them installs its recorder (a Prometheus
    // exporter, say) here, before the run; the stages report to whatever is installed.

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
    let mut plan = pages
        .flat_map(|page| page)
        .filter(|order| order.cents > 0)
        .try_map_async("customer-tier", move |order: Order| {
            let svc = svc.clone();
            let attempt = flowline::attempt();
            async move {
                let tier = svc.tier(order.customer, order.id, attempt).await?;
                Ok::<_, ServiceError>(Enriched { order, tier })
            }
        })
        .workers(64)
        .rate_limit(Rate::per_second(10_000).burst(64)) // what the service allows
        .timeout(Duration::from_millis(50))
        .retry(
            Retry::exponential(Duration::from_millis(10))
                .max_attempts(5)
                .jitter()
                .retry_if(worth_retrying),
        )
        .keep_input()
        .unordered()
        .map(|e| {
            if e.tier == "gold" {
                e.order.cents
            } else {
                e.order.cents / 2
            }
        });
    // A live bar when someone watches (stderr is a terminal and the `progress` feature is
    // on); no bar, no progress lines in a log or in CI.
    if cfg!(feature = "progress") && std::io::stderr().is_terminal() {
        plan = plan.progress_with(
            ProgressOptions::new()
                .total(TOTAL)
                .every(Duration::from_millis(100)),
        );
    }
    let report = plan
        .for_each(move |cents| {
            let revenue = revenue.clone();
            async move {
                revenue.fetch_add(cents, Ordering::Relaxed);
            }
        })
        .dead_letter(DeadLetter::jsonl(&dead_letters))
        .name("quickstart")
        .await?;

    if json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
        println!(
            "service calls: {}, weighted revenue: {:.2}, dead letters: {} (in {})",
            service.calls.load(Ordering::Relaxed),
            total_revenue.load(Ordering::Relaxed) as f64 / 100.0,
            report.failures,
            dead_letters.display()
        );
        #[cfg(feature = "metrics")]
        metrics_text.print();
    }
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
    // Retries took care of the 503s and the hangs: what is left failed for good.
    assert!(
        report
            .failure_sample
            .iter()
            .all(|f| f.error.to_string().starts_with("404")),
        "only unknown customers stay failed"
    );
    Ok(())
}

/// A small `metrics` recorder that keeps the latest value of every series and prints them
/// in Prometheus' text format (what `metrics-exporter-prometheus` would serve).
#[cfg(feature = "metrics")]
mod metrics_text {
    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Value {
        total: AtomicU64,
        gauge: Mutex<f64>,
        /// A histogram's count and sum.
        seen: Mutex<(u64, f64)>,
    }

    impl metrics::CounterFn for Value {
        fn increment(&self, n: u64) {
            self.total.fetch_add(n, Relaxed);
        }
        fn absolute(&self, n: u64) {
            self.total.fetch_max(n, Relaxed);
        }
    }

    impl metrics::GaugeFn for Value {
        fn increment(&self, v: f64) {
            *self.gauge.lock().unwrap() += v;
        }
        fn decrement(&self, v: f64) {
            *self.gauge.lock().unwrap() -= v;
        }
        fn set(&self, v: f64) {
            *self.gauge.lock().unwrap() = v;
        }
    }

    impl metrics::HistogramFn for Value {
        fn record(&self, v: f64) {
            let mut seen = self.seen.lock().unwrap();
            seen.0 += 1;
            seen.1 += v;
        }
    }

    /// Series by their text (`name{label="value",...}`) and kind.
    type Series = BTreeMap<(String, Kind), Arc<Value>>;

    #[derive(Clone, Default)]
    pub struct Recorder(Arc<Mutex<Series>>);

    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Kind {
        Counter,
        Gauge,
        Histogram,
    }

    impl Recorder {
        /// Installs a recorder for the whole process and returns a handle to print it.
        pub fn install() -> Recorder {
            let recorder = Recorder::default();
            metrics::set_global_recorder(recorder.clone()).expect("no recorder yet");
            recorder
        }

        fn series(&self, key: &Key, kind: Kind) -> Arc<Value> {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
                .collect();
            let text = format!("{}{{{}}}", key.name(), labels.join(","));
            let mut all = self.0.lock().unwrap();
            all.entry((text, kind)).or_default().clone()
        }

        /// Prints every series, as a scrape would read it.
        pub fn print(&self) {
            println!("\nmetrics (what a Prometheus scrape would read):");
            for ((text, kind), v) in self.0.lock().unwrap().iter() {
                match kind {
                    Kind::Counter => println!("{text} {}", v.total.load(Relaxed)),
                    Kind::Gauge => println!("{text} {}", v.gauge.lock().unwrap()),
                    Kind::Histogram => {
                        let (count, sum) = *v.seen.lock().unwrap();
                        let (name, labels) = text.split_once('{').unwrap_or((text, "}"));
                        println!("{name}_count{{{labels} {count}");
                        println!("{name}_sum{{{labels} {sum:.6}");
                    }
                }
            }
        }
    }

    impl metrics::Recorder for Recorder {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.series(key, Kind::Counter))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.series(key, Kind::Gauge))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(self.series(key, Kind::Histogram))
        }
    }
}
