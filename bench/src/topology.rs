//! `topology` suite: partition (8 lanes + merge) and broadcast (3 branches).

use std::time::Instant;

use flowline::prelude::*;

const N: u64 = 1_000_000;
/// Each case runs this many times, flowline and baseline alternately, and reports the
/// median of each: one run of 1,000,000 items takes 20–60 ms, shorter than this VM's
/// timing noise allows for a single shot.
const REPS: usize = 7;

fn line(case: &str, flowline: f64, baseline: f64, baseline_kind: &str) {
    println!(
        "{}",
        serde_json::json!({
            "suite": "topology",
            "case": case,
            "flowline": flowline,
            "baseline": baseline,
            "unit": "ns/item",
            "ratio": flowline / baseline,
            "items": N,
            "reps": REPS,
            "baseline_kind": baseline_kind,
        })
    );
}

fn per_item(start: Instant) -> f64 {
    start.elapsed().as_nanos() as f64 / N as f64
}

async fn partition8() -> (f64, f64) {
    let start = Instant::now();
    let report = Pipeline::from_iter(0..N)
        .partition(
            8,
            |x| *x,
            |lane| lane.map_async("work", |x| async move { x.wrapping_mul(3) }),
        )
        .run()
        .await
        .unwrap();
    assert_eq!(report.delivered(), N);
    let flowline = per_item(start);

    let start = Instant::now();
    let report = Pipeline::from_iter(0..N)
        .map_async("work", |x| async move { x.wrapping_mul(3) })
        .workers(8)
        .unordered()
        .run()
        .await
        .unwrap();
    assert_eq!(report.delivered(), N);
    (flowline, per_item(start))
}

async fn broadcast3() -> (f64, f64) {
    let start = Instant::now();
    let graph = Pipeline::from_iter(0..N)
        .broadcast(3)
        .into_iter()
        .fold(Graph::new(), Graph::discard);
    let report = graph.run().await.unwrap();
    assert_eq!(report.delivered(), 3 * N);
    let flowline = per_item(start);

    // Hand-written: a producer task sends each item (a clone per branch) into three bounded
    // channels, three consumer tasks count. Lossless and back-pressured, like `broadcast(3)`
    // (tokio's `sync::broadcast` drops items for a lagging receiver, so it is not the same job).
    let start = Instant::now();
    let mut txs = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u64>(1024);
        txs.push(tx);
        consumers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while rx.recv().await.is_some() {
                n += 1;
            }
            n
        }));
    }
    let producer = tokio::spawn(async move {
        for x in 0..N {
            for tx in &txs {
                tx.send(x).await.unwrap();
            }
        }
    });
    producer.await.unwrap();
    for c in consumers {
        assert_eq!(c.await.unwrap(), N);
    }
    (flowline, per_item(start))
}

/// The median of each side over `REPS` alternating runs of `case`.
fn medians<F: std::future::Future<Output = (f64, f64)>>(
    rt: &tokio::runtime::Runtime,
    case: impl Fn() -> F,
) -> (f64, f64) {
    let (mut fs, mut bs) = (Vec::new(), Vec::new());
    for _ in 0..REPS {
        let (f, b) = rt.block_on(case());
        fs.push(f);
        bs.push(b);
    }
    (
        crate::util::quantile(&mut fs, 0.5),
        crate::util::quantile(&mut bs, 0.5),
    )
}

/// Runs the suite (or its case `only`) and prints one JSON line per case.
pub fn run(only: Option<&str>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let wanted = |case: &str| only.is_none_or(|o| o == case);
    if wanted("partition8") {
        let (f, b) = medians(&rt, partition8);
        line("partition8", f, b, "map_async(8).unordered()");
    }
    if !wanted("broadcast3") {
        return;
    }
    let (f, b) = medians(&rt, broadcast3);
    line(
        "broadcast3",
        f,
        b,
        "3 bounded tokio mpsc channels, one send per item per branch",
    );
}
