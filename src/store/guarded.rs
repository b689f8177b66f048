//! `Guarded`: the calls a run's own parts make to a store (the idempotent stage's reserve,
//! commit, renew and release; a cursor source's checkpoint commits), under the run's
//! [`Outage`](crate::Outage) policy.
//!
//! A failed call is tried again after the policy's wait; while a call of the part fails, the
//! part holds the run's source gate, so the job pauses (the sources pull nothing) and resumes
//! by itself once a call succeeds. An outage longer than the policy ends the run
//! ([`RunCtx::outage_ended`]): its items are left unfinished, never failed, and after that
//! every call of the part is tried once.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::OutageWatch;
use crate::failure::BoxError;
use crate::runtime::RunCtx;
use crate::runtime::gate::GateHold;

pub(crate) struct Guarded {
    run: Arc<RunCtx>,
    state: Mutex<State>,
}

struct State {
    /// One watch for every call of the part: an outage is measured from the first failure
    /// of any of them, and ends with the first success of any.
    watch: OutageWatch,
    /// Held while the store is taken to be down.
    hold: Option<GateHold>,
    /// The outage outlasted the policy and ended the run.
    gave_up: bool,
}

impl Guarded {
    /// The calls of one part to the store named `server` (in logs and in the error that ends
    /// the run).
    pub(crate) fn new(run: Arc<RunCtx>, server: impl Into<Arc<str>>) -> Self {
        let watch = run.outage_policy.watch(server);
        Guarded {
            run,
            state: Mutex::new(State {
                watch,
                hold: None,
                gave_up: false,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` until it succeeds. `None`: the outage outlasted the policy (the run is
    /// ended by it), or `cancel` fired first (a call abandoned on a cancel is not retried:
    /// what it was for is left unfinished).
    pub(crate) async fn call<T, F, Fut>(
        &self,
        cancel: Option<&CancellationToken>,
        mut op: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BoxError>>,
    {
        loop {
            let result = match cancel {
                Some(c) => tokio::select! {
                    biased;
                    _ = c.cancelled() => return None,
                    r = op() => r,
                },
                None => op().await,
            };
            let error = match result {
                Ok(v) => {
                    let mut s = self.state();
                    if s.watch.is_down() {
                        s.watch.succeeded();
                    }
                    s.hold = None;
                    return Some(v);
                }
                Err(e) => e,
            };
            let wait = {
                let mut s = self.state();
                if s.gave_up {
                    tracing::warn!(server = %s.watch.server(), error = %crate::fault::error_chain(&*error), "store call failed after the outage ended the run");
                    return None;
                }
                match s.watch.failed(error) {
                    Ok(wait) => {
                        if s.hold.is_none() {
                            s.hold = Some(self.run.gate.hold());
                        }
                        wait
                    }
                    Err(outage) => {
                        s.gave_up = true;
                        s.hold = None;
                        drop(s);
                        self.run.outage_ended(outage);
                        return None;
                    }
                }
            };
            match cancel {
                Some(c) => tokio::select! {
                    biased;
                    _ = c.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                },
                None => tokio::time::sleep(wait).await,
            }
        }
    }
}
