//! `call_service`: a [`tower::Service`](tower_service::Service) as an async stage.
//!
//! The stage keeps one instance of the service. Before each call the driver polls that
//! instance's `poll_ready` (before the stage's gates: a rate permit is taken when the call
//! can start), then calls the same instance: readiness is never moved to a clone, so the
//! service need not be `Clone` (as with `tower::ServiceExt::call_all`). `Pending` holds the
//! next call back: no call starts, the stage pulls nothing more, and the calls in flight
//! go on. An error from `poll_ready` means the service will never take a call again (tower's
//! contract): see [`Flow::call_service`](crate::Flow::call_service).

use std::task::{Context, Poll};

use futures_util::TryFutureExt as _;
use tower_service::Service;

use crate::Pipeline;
use crate::failure::BoxError;

use super::builder::AsyncStage;
use super::call::{StageFn, sealed};

/// A [`tower::Service`](tower_service::Service) as the call of an async stage
/// ([`Flow::call_service`](crate::Flow::call_service)). Named in
/// [`AsyncStage`](crate::AsyncStage)'s type only.
#[doc(hidden)]
pub struct ServiceCall<Svc> {
    service: Svc,
    /// `poll_ready` said yes and no call has used it yet.
    ready: bool,
}

impl<Svc> sealed::Sealed for ServiceCall<Svc> {}

impl<T, Svc> StageFn<T, Svc::Response> for ServiceCall<Svc>
where
    Svc: Service<T> + Send + 'static,
    Svc::Response: Send + 'static,
    Svc::Error: Into<BoxError> + 'static,
    Svc::Future: Send + 'static,
{
    type Future = futures_util::future::MapErr<Svc::Future, fn(Svc::Error) -> BoxError>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if !self.ready {
            match self.service.poll_ready(cx) {
                Poll::Ready(Ok(())) => self.ready = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, item: T) -> Self::Future {
        // The driver calls only after `poll_ready` said yes; a readiness not seen is a bug
        // of flowline, which a service may answer with a panic (tower's contract).
        debug_assert!(self.ready, "a service called without being ready");
        self.ready = false;
        self.service
            .call(item)
            .map_err(Into::into as fn(Svc::Error) -> BoxError)
    }
}

pub(crate) fn call_service<T, Svc>(
    p: Pipeline<T>,
    name: &str,
    service: Svc,
) -> AsyncStage<T, Svc::Response, ServiceCall<Svc>>
where
    T: Send + 'static,
    Svc: Service<T> + Send + 'static,
    Svc::Response: Send + 'static,
    Svc::Error: Into<BoxError> + 'static,
    Svc::Future: Send + 'static,
{
    AsyncStage::new(
        p,
        name,
        ServiceCall {
            service,
            ready: false,
        },
    )
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::error::Error as _;
    use std::future::Future as _;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;
    use tokio::time::{Instant, Sleep};
    use tower_service::Service;

    /// Needs 10 ms to be ready again after each call; a call takes 100 ms. Logs when each
    /// call starts, and counts the calls made while it was not ready.
    struct Slow {
        t0: Instant,
        ready: bool,
        wait: Option<Pin<Box<Sleep>>>,
        log: Arc<Mutex<Vec<u64>>>,
        unready_calls: Arc<AtomicU32>,
    }

    impl Service<u32> for Slow {
        type Response = u32;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<u32, Self::Error>> + Send>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if !self.ready {
                let wait = self
                    .wait
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(10))));
                std::task::ready!(wait.as_mut().poll(cx));
                self.wait = None;
                self.ready = true;
            }
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, x: u32) -> Self::Future {
            if !self.ready {
                self.unready_calls.fetch_add(1, SeqCst);
            }
            self.ready = false;
            self.log
                .lock()
                .unwrap()
                .push(self.t0.elapsed().as_millis() as u64);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(x)
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_call_starts_while_the_service_is_not_ready() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let unready_calls = Arc::new(AtomicU32::new(0));
        let svc = Slow {
            t0: Instant::now(),
            ready: false,
            wait: None,
            log: log.clone(),
            unready_calls: unready_calls.clone(),
        };
        let out = Pipeline::from_iter(0..5u32)
            .call_service("api", svc)
            .workers(4)
            .collect()
            .await
            .unwrap();
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
        assert_eq!(unready_calls.load(SeqCst), 0);
        // Ready 10 ms after each call; the fifth waits for a worker (the first call ends
        // at 110 ms), then for the service.
        assert_eq!(*log.lock().unwrap(), vec![10, 20, 30, 40, 120]);
    }

    #[derive(Debug)]
    struct PoolClosed;
    impl std::fmt::Display for PoolClosed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connection pool closed")
        }
    }
    impl std::error::Error for PoolClosed {}

    /// Ready for `left` calls, then fails in `poll_ready`; odd items fail in the call.
    struct Dying {
        left: u32,
        calls: Arc<AtomicU32>,
    }

    impl Service<u32> for Dying {
        type Response = u32;
        type Error = PoolClosed;
        type Future = std::future::Ready<Result<u32, PoolClosed>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), PoolClosed>> {
            Poll::Ready(if self.left == 0 {
                Err(PoolClosed)
            } else {
                Ok(())
            })
        }
        fn call(&mut self, x: u32) -> Self::Future {
            self.left -= 1;
            self.calls.fetch_add(1, SeqCst);
            std::future::ready(if x % 2 == 1 { Err(PoolClosed) } else { Ok(x) })
        }
    }

    #[tokio::test]
    async fn a_poll_ready_error_fails_what_is_left_and_ends_the_run() {
        let calls = Arc::new(AtomicU32::new(0));
        let svc = Dying {
            left: 4,
            calls: calls.clone(),
        };
        let err = Pipeline::from_iter(0..100_000u32)
            .call_service("api", svc)
            .workers(2)
            .keep_input()
            .run()
            .await
            .unwrap_err();
        assert_eq!(calls.load(SeqCst), 4);
        assert_eq!(
            err.to_string(),
            "stage `api` failed: its service cannot take calls: connection pool closed"
        );
        let Error::Stage {
            stage,
            error,
            report,
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(stage, "api");
        assert!(
            error
                .source()
                .unwrap()
                .downcast_ref::<PoolClosed>()
                .is_some()
        );
        assert_eq!(report.outcome, RunOutcome::StageFailed);
        assert!(report.is_balanced(), "{report}");
        // Items 0 and 2 passed, 1 and 3 failed in their calls, every other item pulled
        // failed without a call; the source stopped well before its end.
        let api = report.stage("api").unwrap();
        assert_eq!(report.delivered(), 2);
        assert_eq!(api.failed, api.received - 2);
        assert!(api.received < 100_000, "{report}");
        let first = &report.failure_sample[0];
        assert_eq!(first.input.as_ref().unwrap().debug(), "1");
        let left = &report.failure_sample[2];
        assert_eq!(left.input.as_ref().unwrap().debug(), "4");
        assert_eq!(left.error.to_string(), "connection pool closed");
    }

    #[tokio::test]
    async fn the_services_error_type_reaches_the_dead_letters() {
        let svc = Dying {
            left: u32::MAX,
            calls: Arc::new(AtomicU32::new(0)),
        };
        let report = Pipeline::from_iter(0..4u32)
            .call_service("api", svc)
            .run()
            .await
            .unwrap();
        assert_eq!((report.delivered(), report.failures), (2, 2));
        let error = &report.failure_sample[0].error;
        assert!(matches!(error, ItemError::User(_)));
        assert!(
            error
                .source()
                .unwrap()
                .downcast_ref::<PoolClosed>()
                .is_some()
        );
    }

    /// Fails each item's first call; the calls of item 3 take 1 s.
    struct Flaky {
        seen: std::collections::HashSet<u32>,
    }

    impl Service<u32> for Flaky {
        type Response = u32;
        type Error = &'static str;
        type Future = Pin<Box<dyn Future<Output = Result<u32, &'static str>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, x: u32) -> Self::Future {
            let first = self.seen.insert(x);
            Box::pin(async move {
                if x == 3 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if first { Err("503") } else { Ok(x) }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_async_stage_options_apply_to_a_service() {
        let t0 = Instant::now();
        let report = Pipeline::from_iter(0..4u32)
            .call_service(
                "api",
                Flaky {
                    seen: Default::default(),
                },
            )
            .workers(4)
            .retry(Retry::constant(Duration::from_millis(100)).max_attempts(3))
            .timeout(Duration::from_millis(500))
            .rate_limit(Rate::per_second(20))
            .run()
            .await
            .unwrap();
        let api = report.stage("api").unwrap();
        // 0..=2: fail, then pass on the retry; 3 times out on each of its 3 attempts.
        assert_eq!((report.delivered(), report.failures), (3, 1));
        assert_eq!(api.retried, 3 + 2);
        let failed = &report.failure_sample[0];
        assert_eq!(failed.attempts, 3);
        assert!(matches!(failed.error, ItemError::Timeout(_)));
        // The rate lets a call start every 50 ms, retries due first: 0 at 0 ms, 1 at 50,
        // 0 again at 100, 1 again at 150, 2 at 200, then 3 at 250 ms; it times out three
        // times (500 ms) with two backoffs (100 ms) between.
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(250 + 500 + 100 + 500 + 100 + 500)
        );
    }
}
