//! A run on tokio's paused clock, interrupted (or not) at a chosen time.

use std::time::Duration;

use flowline::{Error, Handle, Report};

/// When and how a case's run is interrupted.
#[derive(Debug, Clone, Copy)]
pub enum Interrupt {
    None,
    /// `Handle::cancel` at this many milliseconds.
    Cancel(u64),
    /// `Handle::stop` at this many milliseconds.
    Stop(u64),
}

/// Interrupts the run as `how` says and waits for its report (a cancelled run's too).
pub async fn join(handle: Handle, how: Interrupt) -> Result<Report, String> {
    if let Interrupt::Cancel(ms) | Interrupt::Stop(ms) = how {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        match how {
            Interrupt::Cancel(_) => handle.cancel(),
            _ => handle.stop(),
        }
    }
    handle.join().await.or_else(|e| match e {
        Error::Cancelled { report } => Ok(*report),
        e => Err(format!("unexpected error: {e}")),
    })
}

/// A current-thread runtime on tokio's paused clock.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}
