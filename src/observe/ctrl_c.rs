//! `stop_on_ctrl_c`: the first Ctrl-C (SIGINT) stops the run gracefully, a second cancels it.
//!
//! Tested with a real process sent SIGINT (`tests/ctrl_c.rs`): a signal cannot be
//! raised for one test without reaching every test of the process.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::runtime::RunCtx;

/// Watches for Ctrl-C while the run lasts (a run-level observer: it ends with the run).
pub(crate) async fn watch(run: Arc<RunCtx>) {
    let mut ctrl_c = match CtrlC::new() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(target: "flowline", error = %e, "cannot listen for Ctrl-C");
            return;
        }
    };
    for first in [true, false] {
        tokio::select! {
            biased;
            _ = run.ended.cancelled() => return,
            _ = ctrl_c.recv() => {}
        }
        if first {
            tracing::warn!(target: "flowline", "Ctrl-C: stopping, in-flight items finish (Ctrl-C again cancels)");
            run.stop_requested.store(true, Ordering::Relaxed);
            run.gate.stop();
        } else {
            tracing::warn!(target: "flowline", "Ctrl-C again: cancelling");
            run.cancel.cancel();
        }
    }
}

/// One listener for the whole run, so that a second Ctrl-C right after the first is not
/// missed between two listeners (unix); elsewhere tokio's `ctrl_c`.
struct CtrlC {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl CtrlC {
    fn new() -> std::io::Result<Self> {
        Ok(CtrlC {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            if self.signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
