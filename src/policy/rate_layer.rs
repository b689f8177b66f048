//! `Rate` as a [`tower::Layer`](tower_layer::Layer): a service that takes a permit of a
//! shared [`Rate`] before each call, so that one budget holds across pipeline stages
//! ([`AsyncStage::rate_limit`](crate::AsyncStage::rate_limit)) and plain service calls.

use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::rate::{Rate, RateWait};

/// Wraps a service so that its calls start at most at the rate (see [`RateLimited`]).
/// Clones of one `Rate` share one budget, whether they limit a stage or a service.
///
/// ```
/// use flowline::prelude::*;
/// use std::time::Duration;
/// use tower_layer::Layer as _;
/// use tower_service::Service as _;
/// # use std::task::{Context, Poll};
/// # #[derive(Clone)] struct Echo;
/// # impl tower_service::Service<u32> for Echo {
/// #     type Response = u32;
/// #     type Error = std::convert::Infallible;
/// #     type Future = std::future::Ready<Result<u32, Self::Error>>;
/// #     fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> { Poll::Ready(Ok(())) }
/// #     fn call(&mut self, x: u32) -> Self::Future { std::future::ready(Ok(x)) }
/// # }
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let rate = Rate::per_second(10);
/// let mut api = rate.layer(Echo);                  // usually in a `ServiceBuilder`
/// let t = tokio::time::Instant::now();
///
/// // Five items through a stage, then one plain call: six starts, 100 ms apart.
/// Pipeline::from_iter(0..5u32)
///     .map_async("api", |x| async move { x })
///     .rate_limit(rate.clone())
///     .run().await.unwrap();
/// std::future::poll_fn(|cx| api.poll_ready(cx)).await.unwrap();
/// assert_eq!(api.call(7).await.unwrap(), 7);
/// assert_eq!(t.elapsed(), Duration::from_millis(500));
/// # }
/// ```
impl<S> Layer<S> for Rate {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> RateLimited<S> {
        RateLimited {
            inner,
            rate: self.clone(),
            wait: RateWait::default(),
            permit: None,
        }
    }
}

/// A service whose calls start at most at a shared [`Rate`] (made by the rate's
/// [`Layer`](tower_layer::Layer) implementation). `poll_ready` is ready when the inner
/// service is ready *and* a permit is there: the inner service is asked first, so no permit
/// of the shared budget is taken while the call could not start anyway. A permit counts
/// from the call, as on a stage: the rate's bound holds for the calls themselves. A clone
/// shares the budget and starts with no permit of its own.
///
/// ```
/// use flowline::{Rate, RateLimited};
/// use tower_layer::Layer as _;
/// # #[derive(Clone)] struct Client;
/// let limited: RateLimited<Client> = Rate::per_second(100).layer(Client);
/// # let _ = limited;
/// ```
pub struct RateLimited<S> {
    inner: S,
    rate: Rate,
    wait: RateWait,
    /// The log record of a permit taken for the next call.
    permit: Option<u64>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for RateLimited<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimited")
            .field("inner", &self.inner)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl<S: Clone> Clone for RateLimited<S> {
    fn clone(&self) -> Self {
        self.rate.layer(self.inner.clone())
    }
}

impl<S, Request> Service<Request> for RateLimited<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        if self.permit.is_none() {
            match self.rate.poll_permit(cx, &mut self.wait) {
                Poll::Ready(record) => self.permit = Some(record),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> S::Future {
        if let Some(record) = self.permit.take() {
            self.rate.restamp(record);
            // Between calls the caller is owed nothing: its next wait starts when it asks.
            self.wait.idle();
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::future::Future as _;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;
    use tokio::time::Instant;
    use tower_layer::Layer as _;
    use tower_service::Service;

    /// Logs the instant (ms since `t0`) of each call.
    #[derive(Clone)]
    struct Stamp {
        t0: Instant,
        log: Arc<Mutex<Vec<u64>>>,
    }

    impl Service<u32> for Stamp {
        type Response = u32;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<u32, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, x: u32) -> Self::Future {
            let ms = self.t0.elapsed().as_millis() as u64;
            self.log.lock().unwrap().push(ms);
            std::future::ready(Ok(x))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stage_and_a_plain_service_share_one_budget() {
        let t0 = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let rate = Rate::per_second(10);
        let l = log.clone();
        let stage = Pipeline::from_iter(0..6u32)
            .map_async("api", move |x| {
                l.lock().unwrap().push(t0.elapsed().as_millis() as u64);
                async move { x }
            })
            .workers(4)
            .rate_limit(rate.clone())
            .run();
        let mut plain = rate.layer(Stamp {
            t0,
            log: log.clone(),
        });
        let calls = async move {
            for i in 0..6 {
                std::future::poll_fn(|cx| plain.poll_ready(cx))
                    .await
                    .unwrap();
                plain.call(i).await.unwrap();
            }
        };
        let (report, ()) = tokio::join!(stage, calls);
        assert_eq!(report.unwrap().delivered(), 6);
        let mut starts = log.lock().unwrap().clone();
        starts.sort_unstable();
        // Twelve starts, one budget: exactly 100 ms apart (each alone would take 500 ms).
        assert_eq!(starts, (0..12).map(|i| i * 100).collect::<Vec<_>>());
        assert_eq!(t0.elapsed(), Duration::from_millis(1100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_stage_behind_the_layer_keeps_the_rate() {
        let t0 = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let rate = Rate::per_second(4).burst(2);
        let svc = rate.layer(Stamp {
            t0,
            log: log.clone(),
        });
        let report = Pipeline::from_iter(0..6u32)
            .call_service("api", svc)
            .workers(8)
            .run()
            .await
            .unwrap();
        assert_eq!(report.delivered(), 6);
        // A burst of 2, then every 250 ms.
        assert_eq!(*log.lock().unwrap(), vec![0, 0, 250, 500, 750, 1000]);
    }

    /// Ready once `open` has fired.
    struct Gated {
        open: Option<tokio::sync::oneshot::Receiver<()>>,
        inner: Stamp,
    }

    impl Service<u32> for Gated {
        type Response = u32;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<u32, Self::Error>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if let Some(open) = self.open.as_mut() {
                let _ = std::task::ready!(std::pin::Pin::new(open).poll(cx));
                self.open = None;
            }
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, x: u32) -> Self::Future {
            self.inner.call(x)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_permit_is_taken_while_the_inner_service_is_not_ready() {
        let t0 = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let rate = Rate::per_second(10);
        let (open, opened) = tokio::sync::oneshot::channel();
        let mut gated = rate.layer(Gated {
            open: Some(opened),
            inner: Stamp {
                t0,
                log: log.clone(),
            },
        });
        let waiting = tokio::spawn(async move {
            std::future::poll_fn(|cx| gated.poll_ready(cx))
                .await
                .unwrap();
            gated.call(0).await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The gated service waits: the other caller of the budget is not held back.
        rate.acquire().await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(50));
        open.send(()).unwrap();
        waiting.await.unwrap();
        assert_eq!(*log.lock().unwrap(), vec![150]);
    }
}
