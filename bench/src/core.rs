//! `core`: the engine against hand-written tokio/futures code of the same shape.

use std::hint::black_box;
use std::process::Command;
use std::time::Duration;

use flowline::prelude::*;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::util::{alternate, emit, ns_per_item, peak_rss_mib, runtime, time};

const N: u64 = 1_000_000;
const REPS: usize = 5;

#[inline(always)]
fn step(x: u64, k: u64) -> u64 {
    (x ^ k).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(7)
}

pub fn run(only: Option<&str>) {
    let want = |c: &str| only.is_none_or(|o| o == c);
    if want("fused8") {
        fused8();
    }
    if want("hops8") {
        hops8();
    }
    if want("hops8_floor") {
        hops8_floor();
    }
    if want("workers16") {
        workers16();
    }
    if want("sleep100") {
        sleep100();
    }
    if want("tower_stage") {
        tower_stage();
    }
    if want("rss10m") {
        rss10m();
    }
}

fn fused8() {
    let rt = runtime();
    let (f, b) = alternate(
        REPS,
        || {
            time(&rt, || async {
                let mut p = Pipeline::from_iter(0..N).into_pipeline();
                for k in 0..8u64 {
                    p = p.map(move |x| step(x, k));
                }
                black_box(p.run().await.unwrap());
            })
        },
        || {
            time(&rt, || async {
                let s = futures::stream::iter(0..N)
                    .map(|x| step(x, 0))
                    .map(|x| step(x, 1))
                    .map(|x| step(x, 2))
                    .map(|x| step(x, 3))
                    .map(|x| step(x, 4))
                    .map(|x| step(x, 5))
                    .map(|x| step(x, 6))
                    .map(|x| step(x, 7));
                black_box(s.fold(0u64, |acc, x| async move { acc ^ x }).await);
            })
        },
    );
    emit(
        "core",
        "fused8",
        ns_per_item(f, N),
        ns_per_item(b, N),
        "ns/item",
        serde_json::json!({"n": N, "reps": REPS}),
    );
}

/// Eight stages, each behind an async boundary.
async fn flowline_hops(n: u64) {
    let mut p = Pipeline::from_iter(0..n).into_pipeline();
    for k in 0..8u64 {
        p = p.buffer(1024).map(move |x| step(x, k));
    }
    black_box(p.run().await.unwrap());
}

/// The hand-written pipeline: one tokio task per stage, joined by `mpsc::channel(64)`.
async fn baseline_hops(n: u64) {
    let (tx0, mut rx) = mpsc::channel::<u64>(64);
    tokio::spawn(async move {
        for x in 0..n {
            if tx0.send(x).await.is_err() {
                break;
            }
        }
    });
    for k in 0..8u64 {
        let (tx, next) = mpsc::channel::<u64>(64);
        let mut input = rx;
        tokio::spawn(async move {
            while let Some(x) = input.recv().await {
                if tx.send(step(x, k)).await.is_err() {
                    break;
                }
            }
        });
        rx = next;
    }
    let mut acc = 0u64;
    while let Some(x) = rx.recv().await {
        acc ^= x;
    }
    black_box(acc);
}

fn hops8() {
    let rt = runtime();
    let (f, b) = alternate(
        REPS,
        || time(&rt, || flowline_hops(N)),
        || time(&rt, || baseline_hops(N)),
    );
    emit(
        "core",
        "hops8",
        ns_per_item(f, N),
        ns_per_item(b, N),
        "ns/item",
        serde_json::json!({"n": N, "reps": REPS}),
    );
}

/// Items per chunk in the floor pipeline: flowline's chunk size.
const FLOOR_CHUNK: usize = 512;

/// The floor of a chunked design: the shape of [`flowline_hops`] written by hand, with
/// nothing but the work and the channels. The source task fills `Vec<u64>` chunks of
/// [`FLOOR_CHUNK`]; each of the next seven tasks applies one `step` in place and passes the
/// chunk on; the calling task applies the last `step` and folds. Eight spawned tasks and
/// eight bounded channels of `1024 / FLOOR_CHUNK` chunks, as `buffer(1024)` makes them.
async fn floor_hops(n: u64) {
    const CHANNEL_CHUNKS: usize = 1024 / FLOOR_CHUNK;
    let (tx0, mut rx) = mpsc::channel::<Vec<u64>>(CHANNEL_CHUNKS);
    tokio::spawn(async move {
        let mut next = 0u64;
        while next < n {
            let end = (next + FLOOR_CHUNK as u64).min(n);
            let chunk: Vec<u64> = (next..end).collect();
            next = end;
            if tx0.send(chunk).await.is_err() {
                break;
            }
        }
    });
    for k in 0..7u64 {
        let (tx, next) = mpsc::channel::<Vec<u64>>(CHANNEL_CHUNKS);
        let mut input = rx;
        tokio::spawn(async move {
            while let Some(mut chunk) = input.recv().await {
                for x in chunk.iter_mut() {
                    *x = step(*x, k);
                }
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
        });
        rx = next;
    }
    let mut acc = 0u64;
    while let Some(chunk) = rx.recv().await {
        for x in chunk {
            acc ^= step(x, 7);
        }
    }
    black_box(acc);
}

fn hops8_floor() {
    let rt = runtime();
    let (f, b) = alternate(
        REPS,
        || time(&rt, || flowline_hops(N)),
        || time(&rt, || floor_hops(N)),
    );
    emit(
        "core",
        "hops8_floor",
        ns_per_item(f, N),
        ns_per_item(b, N),
        "ns/item",
        serde_json::json!({
            "n": N, "reps": REPS, "chunk": FLOOR_CHUNK,
            "channel_chunks": 1024 / FLOOR_CHUNK, "goal_ratio": 2.0,
        }),
    );
}

fn workers16() {
    let rt = runtime();
    let (f, b) = alternate(
        REPS,
        || {
            time(&rt, || async {
                let r = Pipeline::from_iter(0..N)
                    .map_async("trivial", |x| async move { step(x, 1) })
                    .workers(16)
                    .unordered()
                    .run()
                    .await
                    .unwrap();
                black_box(r);
            })
        },
        || {
            time(&rt, || async {
                let s = futures::stream::iter(0..N)
                    .map(|x| async move { step(x, 1) })
                    .buffer_unordered(16);
                black_box(s.fold(0u64, |acc, x| async move { acc ^ x }).await);
            })
        },
    );
    emit(
        "core",
        "workers16",
        ns_per_item(f, N),
        ns_per_item(b, N),
        "ns/item",
        serde_json::json!({"n": N, "reps": REPS}),
    );
}

/// A trivial `tower::Service`: always ready, answers at once.
struct StepService;

impl tower::Service<u64> for StepService {
    type Response = u64;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<u64, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, x: u64) -> Self::Future {
        std::future::ready(Ok(step(x, 1)))
    }
}

/// A service as a stage (`call_service`) against the same call as a closure stage
/// (`map_async`): the cost of the readiness check and the service's call.
fn tower_stage() {
    let rt = runtime();
    let (f, b) = alternate(
        REPS,
        || {
            time(&rt, || async {
                let r = Pipeline::from_iter(0..N)
                    .call_service("trivial", StepService)
                    .workers(16)
                    .unordered()
                    .run()
                    .await
                    .unwrap();
                black_box(r);
            })
        },
        || {
            time(&rt, || async {
                let r = Pipeline::from_iter(0..N)
                    .map_async("trivial", |x| async move { step(x, 1) })
                    .workers(16)
                    .unordered()
                    .run()
                    .await
                    .unwrap();
                black_box(r);
            })
        },
    );
    emit(
        "core",
        "tower_stage",
        ns_per_item(f, N),
        ns_per_item(b, N),
        "ns/item",
        serde_json::json!({"n": N, "reps": REPS, "workers": 16, "goal_ratio": 1.2}),
    );
}

fn sleep100() {
    const ITEMS: u64 = 10_000;
    let rt = runtime();
    let (f, b) = alternate(
        REPS,
        || {
            time(&rt, || async {
                let r = Pipeline::from_iter(0..ITEMS)
                    .map_async("sleep", |x| async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        x
                    })
                    .workers(100)
                    .unordered()
                    .run()
                    .await
                    .unwrap();
                black_box(r);
            })
        },
        || {
            time(&rt, || async {
                let s = futures::stream::iter(0..ITEMS)
                    .map(|x| async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        x
                    })
                    .buffer_unordered(100);
                black_box(s.fold(0u64, |acc, x| async move { acc ^ x }).await);
            })
        },
    );
    emit(
        "core",
        "sleep100",
        f.as_secs_f64() * 1e3,
        b.as_secs_f64() * 1e3,
        "ms",
        serde_json::json!({"items": ITEMS, "workers": 100, "reps": REPS}),
    );
}

/// Peak RSS is per process, so each side runs in a fresh child process of this binary.
fn rss10m() {
    let child = |which: &str| -> f64 {
        let exe = std::env::current_exe().expect("own path");
        let out = Command::new(exe)
            .args(["--rss-child", which])
            .output()
            .expect("child ran");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(f64::NAN)
    };
    let f = child("flowline");
    let b = child("baseline");
    emit(
        "core",
        "rss10m",
        f,
        b,
        "MiB",
        serde_json::json!({"n": 10_000_000u64, "stages": 8, "goal_mib": 16}),
    );
}

/// Runs inside the child process: 10M items through 8 boundary stages, then prints VmHWM.
pub fn rss_child(which: &str) {
    let rt = runtime();
    match which {
        "flowline" => rt.block_on(flowline_hops(10_000_000)),
        _ => rt.block_on(baseline_hops(10_000_000)),
    }
    println!("{:.2}", peak_rss_mib());
}
