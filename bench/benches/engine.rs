//! Criterion benches of the engine's hot paths: fused operators, hops, the async stage.
//! `cargo bench -p flowline-bench --bench engine`. Side-by-side comparisons against a
//! hand-written baseline are the suites of this package's binary (`src/main.rs`).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowline::prelude::*;

const N: u64 = 100_000;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn fused(c: &mut Criterion) {
    let rt = rt();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(N));
    g.bench_function("fused8_map", |b| {
        b.to_async(&rt).iter(|| async {
            let mut p = Pipeline::from_iter(0..N).into_pipeline();
            for k in 0..8u64 {
                p = p.map(move |x| x.wrapping_mul(31) ^ k);
            }
            p.run().await.unwrap()
        })
    });
    g.bench_function("filter_half", |b| {
        b.to_async(&rt).iter(|| async {
            Pipeline::from_iter(0..N)
                .filter(|x| x % 2 == 0)
                .run()
                .await
                .unwrap()
        })
    });
    g.bench_function("hops8", |b| {
        b.to_async(&rt).iter(|| async {
            let mut p = Pipeline::from_iter(0..N).into_pipeline();
            for _ in 0..8 {
                p = p.buffer(1024);
            }
            p.run().await.unwrap()
        })
    });
    g.bench_function("map_async_16_workers", |b| {
        b.to_async(&rt).iter(|| async {
            Pipeline::from_iter(0..N)
                .map_async("trivial", |x| async move { x + 1 })
                .workers(16)
                .unordered()
                .run()
                .await
                .unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = fused
}
criterion_main!(benches);
