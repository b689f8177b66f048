//! `flowline-siem`: the service. Ctrl-C or SIGTERM drains it (every accepted event stored)
//! and exits.

use clap::Parser;
use flowline_siem::{Config, Service};

#[tokio::main]
async fn main() {
    let cfg = Config::parse();
    let db = cfg.db.clone();
    // The signal handlers go in before the service starts, so that a signal that comes as
    // soon as it says it is listening finds them there (without them, SIGTERM would kill the
    // process on the spot, with no drain).
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flowline-siem: cannot install the signal handlers: {e}");
            std::process::exit(2);
        }
    };
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
        "db {}, notifier {}; the page: http://{}/?token={} ; Ctrl-C or SIGTERM drains and stops",
        db.display(),
        service.notifier_url(),
        service.addr(),
        service.viewer_token()
    );
    signals.wait().await;
    eprintln!("shutting down: new events answered 503, storing the accepted ones");
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

/// SIGTERM and Ctrl-C, listened for from the moment they are installed.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = &mut self;
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
