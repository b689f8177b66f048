//! `UnixSignals`: a listener for a set of unix signals, kept for the life of a program, to
//! give to `stop_on_signal` or to wait on directly.

use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Listens for a set of unix signals from the moment it is made until it is dropped: a
/// signal that comes between two waits is not missed. Clones share the listener; each
/// signal ends one wait. For [`stop_on_signal`](crate::RunOptions::stop_on_signal) (a
/// signal stops, another cancels), and for code that waits for a stop itself.
///
/// The signals it listens for no longer end the process (their default action), for the
/// rest of the process: tokio keeps their handler installed.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::UnixSignals;
/// use tokio::signal::unix::SignalKind;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// let signals = UnixSignals::new([SignalKind::user_defined2()])?;
/// // The signal, from outside.
/// std::process::Command::new("kill")
///     .args(["-USR2", &std::process::id().to_string()])
///     .status()?;
/// let report = Pipeline::from_iter(0..u64::MAX)
///     .run()
///     .stop_on_signal(signals.waiter())
///     .await
///     .unwrap();
/// assert_eq!(report.outcome, RunOutcome::Stopped);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct UnixSignals {
    streams: Arc<tokio::sync::Mutex<Vec<Signal>>>,
}

impl std::fmt::Debug for UnixSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnixSignals")
    }
}

impl UnixSignals {
    /// Listens for `kinds` from now on; an error if one of them cannot be listened for
    /// (SIGKILL, SIGSTOP, or outside a tokio runtime).
    ///
    /// ```
    /// use flowline::UnixSignals;
    /// use tokio::signal::unix::SignalKind;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let signals = UnixSignals::new([SignalKind::interrupt(), SignalKind::terminate()]);
    /// assert!(signals.is_ok());
    /// # }
    /// ```
    pub fn new(kinds: impl IntoIterator<Item = SignalKind>) -> std::io::Result<Self> {
        let streams = kinds
            .into_iter()
            .map(signal)
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(UnixSignals {
            streams: Arc::new(tokio::sync::Mutex::new(streams)),
        })
    }

    /// The signals that ask a program to stop: SIGINT (Ctrl-C), SIGTERM and SIGHUP (its
    /// terminal went away).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let signals = flowline::UnixSignals::stop()?;
    /// # let _ = signals;
    /// # Ok(()) }
    /// ```
    pub fn stop() -> std::io::Result<Self> {
        Self::new([
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::hangup(),
        ])
    }

    /// Waits for the next of the signals (for ever, listening for none).
    ///
    /// ```
    /// use flowline::UnixSignals;
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let signals = UnixSignals::stop()?;
    /// tokio::select! {
    ///     () = signals.recv() => println!("stopping"),
    ///     () = tokio::time::sleep(Duration::from_millis(10)) => println!("done"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn recv(&self) {
        let mut streams = self.streams.lock().await;
        if streams.is_empty() {
            return std::future::pending().await;
        }
        let waits = streams.iter_mut().map(|s| Box::pin(s.recv()));
        futures_util::future::select_all(waits).await;
    }

    /// What [`stop_on_signal`](crate::RunOptions::stop_on_signal) takes: each call waits
    /// for the next of the signals.
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let options = RunOptions::new().stop_on_signal(flowline::UnixSignals::stop()?.waiter());
    /// # let _ = options;
    /// # Ok(()) }
    /// ```
    pub fn waiter(
        &self,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>
    + Send
    + Sync
    + 'static {
        let signals = self.clone();
        move || {
            let signals = signals.clone();
            Box::pin(async move {
                signals.recv().await;
                Ok(())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn raise(name: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &std::process::id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    #[tokio::test]
    async fn a_signal_that_came_before_the_wait_is_not_missed() {
        let signals = UnixSignals::new([SignalKind::user_defined2()]).unwrap();
        raise("USR2");
        // Raised before anyone waited: the listener held it.
        tokio::time::timeout(Duration::from_secs(10), signals.recv())
            .await
            .expect("the signal was kept");
        // Nothing more came.
        let again = tokio::time::timeout(Duration::from_millis(100), signals.recv()).await;
        assert!(again.is_err());
    }

    #[tokio::test]
    async fn any_of_the_signals_ends_a_wait() {
        let signals =
            UnixSignals::new([SignalKind::user_defined2(), SignalKind::window_change()]).unwrap();
        let other = signals.clone();
        raise("WINCH");
        tokio::time::timeout(Duration::from_secs(10), other.recv())
            .await
            .expect("the second kind ends a wait too");
    }

    #[tokio::test]
    async fn none_waits_for_ever_and_sigkill_cannot_be_listened_for() {
        let none = UnixSignals::new([]).unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), none.recv()).await;
        assert!(waited.is_err());
        let err = UnixSignals::new([SignalKind::from_raw(9)]).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
}
