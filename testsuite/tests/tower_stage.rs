//! tower interop: a `ServiceBuilder` stack as a stage, and a `Rate` that one stage and a
//! plain service call share, all on tokio's paused clock.

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt as _};

/// Counts calls in flight (and the most at once); dropped when a call ends or is dropped.
struct InFlight(Arc<(AtomicUsize, AtomicUsize)>);

impl InFlight {
    fn enter(c: &Arc<(AtomicUsize, AtomicUsize)>) -> Self {
        let now = c.0.fetch_add(1, SeqCst) + 1;
        c.1.fetch_max(now, SeqCst);
        InFlight(c.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_service_builder_stack_is_a_stage() {
    let counts = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let c = counts.clone();
    let svc = ServiceBuilder::new()
        .concurrency_limit(2)
        .timeout(Duration::from_millis(50))
        .service_fn(move |ms: u64| {
            let guard = InFlight::enter(&c);
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                drop(guard);
                Ok::<_, BoxError>(ms)
            }
        });
    let t0 = Instant::now();
    let report = Pipeline::from_iter([10u64, 10, 100, 10, 10, 10])
        .call_service("api", svc)
        .workers(8)
        .keep_input()
        .run()
        .await
        .unwrap();
    // The concurrency layer holds 8 workers to 2 calls: 10 | 10 ms, then the 100 ms call
    // beside three 10 ms ones, until the timeout layer ends it at 60 ms.
    assert_eq!(counts.1.load(SeqCst), 2);
    assert_eq!(counts.0.load(SeqCst), 0);
    assert_eq!(t0.elapsed(), Duration::from_millis(60));
    assert_eq!((report.delivered(), report.failures), (5, 1));
    let failed = &report.failure_sample[0];
    assert_eq!(
        failed.input.as_ref().unwrap().downcast_ref::<u64>(),
        Some(&100)
    );
    // tower's own error type, kept through the stage.
    let source = failed.error.source().unwrap();
    assert!(source.is::<tower::timeout::error::Elapsed>(), "{source:?}");
}

#[tokio::test(start_paused = true)]
async fn a_stage_and_a_plain_service_call_share_one_rate() {
    let t0 = Instant::now();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let rate = Rate::per_second(10);

    let s = starts.clone();
    let stage = Pipeline::from_iter(0..3u32)
        .map_async("api", move |x| {
            s.lock().unwrap().push(t0.elapsed().as_millis() as u64);
            async move { x }
        })
        .workers(4)
        .rate_limit(rate.clone())
        .run();

    let s = starts.clone();
    let mut client = ServiceBuilder::new()
        .layer(rate.clone())
        .service_fn(move |x: u32| {
            s.lock().unwrap().push(t0.elapsed().as_millis() as u64);
            async move { Ok::<_, BoxError>(x) }
        });
    let calls = async {
        for x in 0..3 {
            client.ready().await.unwrap().call(x).await.unwrap();
        }
    };
    let (report, ()) = tokio::join!(stage, calls);
    assert_eq!(report.unwrap().delivered(), 3);
    let mut starts = starts.lock().unwrap().clone();
    starts.sort_unstable();
    assert_eq!(starts, vec![0, 100, 200, 300, 400, 500]);
}
