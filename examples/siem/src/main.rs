//! `flowline-siem`: the service. Ctrl-C or SIGTERM drains it (every accepted event stored)
//! and exits.

use clap::Parser;
use flowline_siem::{Config, Service};

#[tokio::main]
async fn main() {
    let cfg = Config::parse();
    let db = cfg.db.clone();
    let service = match Service::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flowline-siem: {e}");
            std::process::exit(2);
        }
    };
    // The first line of stdout, for scripts and tests started on port 0.
    println!("listening on http://{}", service.addr());
    eprintln!(
        "db {}, notifier {}; Ctrl-C or SIGTERM drains and stops",
        db.display(),
        service.notifier_url()
    );
    wait_for_signal().await;
    eprintln!("shutting down: refusing new events, storing the accepted ones");
    match service.shutdown().await {
        Ok(summary) => {
            if let Some(r) = summary.events {
                eprintln!("{r}");
            }
            if let Ok(c) = flowline_siem::counts(&db) {
                eprintln!(
                    "stored {} events; alerts: {} sent, {} failed, {} pending",
                    c["events"], c["sent"], c["failed"], c["pending"]
                );
            }
        }
        Err(e) => {
            eprintln!("flowline-siem: shutdown: {e}");
            std::process::exit(1);
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
