//! A pipeline's metrics for Prometheus: flowline emits through the `metrics` facade (feature
//! `metrics`), the application installs `metrics-exporter-prometheus`.
//!
//! ```sh
//! # one job, then the text exposition on stdout:
//! cargo run -p flowline-example-prometheus -- --once
//! # jobs one after another, scraped at http://127.0.0.1:9000/metrics; Ctrl-C stops:
//! cargo run -p flowline-example-prometheus -- --listen 127.0.0.1:9000
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use flowline::prelude::*;
use metrics_exporter_prometheus::PrometheusBuilder;

/// One order job against a flaky service: one call in 30 fails once (and is retried), one
/// order in 200 is refused for good, one call in 500 hangs past the timeout; small orders are
/// filtered out. With `ctrl_c`, the first Ctrl-C stops the job.
async fn job(orders: u64, ctrl_c: bool) -> Result<Report, Error> {
    let run = Pipeline::from_iter(1..=orders)
        .try_map_async("price", |id| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            match id {
                _ if id % 500 == 0 => std::future::pending().await,
                _ if id % 200 == 0 => Err(format!("order {id}: refused")),
                _ if id % 30 == 0 && flowline::attempt() == 1 => Err(format!("order {id}: 503")),
                _ => Ok((id, id * 7 % 100)),
            }
        })
        .workers(32)
        .timeout(Duration::from_millis(200))
        .retry(Retry::exponential(Duration::from_millis(5)).max_attempts(3))
        .filter(|(_, amount)| *amount >= 10)
        .map_async("store", |(id, _)| async move { id })
        .adaptive(Adaptive::aimd(1..=16))
        .run()
        .name("orders");
    if ctrl_c {
        run.stop_on_signal(tokio::signal::ctrl_c).await
    } else {
        run.await
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--once") {
        let metrics = PrometheusBuilder::new()
            .install_recorder()
            .expect("install the Prometheus recorder");
        let report = job(5_000, false).await.expect("the job runs");
        eprintln!("{report}");
        print!("{}", metrics.render());
        return;
    }
    let listen: SocketAddr = match args.iter().position(|a| a == "--listen") {
        Some(i) => match args.get(i + 1).map(|a| a.parse()) {
            Some(Ok(addr)) => addr,
            _ => {
                eprintln!("--listen wants an address such as 127.0.0.1:9000");
                std::process::exit(2);
            }
        },
        None => SocketAddr::from(([127, 0, 0, 1], 9000)),
    };
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .install()
        .expect("serve the metrics");
    eprintln!("metrics at http://{listen}/metrics; Ctrl-C stops");
    loop {
        match job(50_000, true).await {
            Ok(report) if report.outcome == RunOutcome::Stopped => {
                eprintln!("{report}");
                return;
            }
            Ok(report) => eprintln!("{report}"),
            Err(e) => {
                eprintln!("{e}");
                return;
            }
        }
    }
}
