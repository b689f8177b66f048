//! Suite `flow`: rate-limit accuracy against governor, and the adaptive limit against static
//! worker counts on a simulated backend. Real clock.
//!
//! `cargo run --release -p flowline-bench -- flow [seconds-per-rate-case] [case-prefix]`
//! (e.g. `flow adaptive` runs the `adaptive*` cases only).
//!
//! Rate cases (`rate_1k`, `rate_10k`, `rate_100k` through `pace`; `rate_333_loaded` through
//! an async stage's `rate_limit`, beside 4 threads that keep every core busy): `error_pct` is
//! the achieved rate's error, `window_ratio` the largest 10 ms window over its ideal count, and
//! `max_in_period` the most starts within any sliding second `[t, t + 1 s)` (`t` at a start),
//! from the instants recorded as each item passed or each call started (goal: ≤ the rate).
//! The `baseline_*` fields are governor's (burst 1), run the same way.
//!
//! The simulated backend has capacity 32: a server with 32 slots (a FIFO semaphore) where a
//! call holds a slot for its service time; calls beyond 32 wait in the queue, so latency grows
//! above capacity as queueing delay while throughput stays at the server's maximum.
//! - `adaptive`: service is 5 ms whatever the load (queue only: excess concurrency costs
//!   latency, not throughput).
//! - `adaptive_overload`: the same server with contention: each call's service time grows
//!   by 20% per 32 calls waiting in the queue when it gets its slot
//!   (`5 ms × (1 + 0.2 × queued / 32)`), as real services slow down under overload (memory,
//!   locks, context switches); here excess concurrency costs throughput too.
//! - `adaptive_instant`: the queue-only server, but 1 call in 100 is answered at once (a
//!   cache hit: no slot, no wait), which a minimum-latency baseline would take for the
//!   backend's latency.
//! - `adaptive_slowdown`: the queue-only server whose service time doubles (10 ms) for the
//!   second half of the items.
//!
//! - `hedge`: hedged requests. A backend where each call, at random, takes 100 ms with
//!   probability 2 % and 1 ms otherwise; 10,000 items through an unordered stage at 16 in
//!   flight, with `Hedge::percentile(0.95)` (its default budget: at most 10 % extra calls)
//!   and without. An item's latency runs from its first call's start to its result. `flowline`
//!   is the hedged p99 and `baseline` the unhedged p99 (ms); `ratio` = hedged / unhedged p99
//!   (goal ≤ 0.3); `extra_pct` the extra calls in % of the calls (goal ≤ 6).
//!
//! - `live_workers`: workers changed while running (`Control::set_workers`), 4 → 64 → 8,
//!   each held for `LIVE_PHASE`, over calls of `LIVE_CALL` (real clock, a multi-thread
//!   runtime). Every call notes how many calls run as it starts; `max_deviation` is the most
//!   calls running at a start minus the limit, over the starts from one call (plus 1 ms of
//!   timer grain) after each change to the next change (goal ≤ 1); `max_shortfall` the
//!   limit minus the most calls running in the same spans (how far a raise was from being
//!   used). `flowline` and `baseline` are items/s over the run; the baseline is a loop of
//!   spawned calls behind a tokio semaphore whose permits are added (raise) or acquired and
//!   forgotten (lowering), the usual hand-made adjustable limit.
//!
//! Each adaptive case compares `Adaptive::vegas(1..=512).initial(4)` against a sweep of static worker
//! counts; every configuration runs `REPS` times in a rotating order and the median items/s
//! is kept. `ratio` is adaptive / the best static median; `adaptive_final_limits` is the
//! limit each adaptive run ended with. `FLOWLINE_BENCH_TRACE=1` prints the adaptive limit
//! every 20 ms to stderr.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use flowline::prelude::*;
use serde_json::json;

use crate::util::{quantile, round3};

/// Achieved rate error (%) and the largest 10 ms window over its ideal count.
fn accuracy(times: &[Instant], target: f64) -> (f64, f64, f64) {
    let start = times[0];
    let span = times[times.len() - 1].duration_since(start).as_secs_f64();
    let achieved = (times.len() - 1) as f64 / span;
    let error_pct = (achieved - target).abs() / target * 100.0;
    let mut windows = std::collections::HashMap::<u64, u64>::new();
    for t in times {
        *windows
            .entry(t.duration_since(start).as_millis() as u64 / 10)
            .or_default() += 1;
    }
    let ideal = (target * 0.010).max(1.0);
    let max = windows.values().copied().max().unwrap_or(0) as f64;
    (achieved, error_pct, max / ideal)
}

/// The most instants within any half-open second `[t, t + 1 s)`, `t` at one of them.
fn max_in_period(times: &[Instant]) -> usize {
    crate::util::most_within(&mut times.to_vec(), Duration::from_secs(1))
}

async fn flowline_rate(rate: u64, secs: f64) -> Vec<Instant> {
    let n = (rate as f64 * secs) as u64 + 1;
    Pipeline::from_iter(0..n)
        .pace(Rate::per_second(rate))
        .map(|_| Instant::now())
        .collect()
        .await
        .expect("rate run")
}

async fn governor_rate(rate: u64, secs: f64) -> Vec<Instant> {
    use governor::{Quota, RateLimiter};
    let n = (rate as f64 * secs) as u64 + 1;
    let quota = Quota::per_second(NonZeroU32::new(rate as u32).expect("rate > 0"))
        .allow_burst(NonZeroU32::new(1).expect("1 > 0"));
    let limiter = RateLimiter::direct(quota);
    let mut times = Vec::with_capacity(n as usize);
    for _ in 0..n {
        limiter.until_ready().await;
        times.push(Instant::now());
    }
    times
}

/// Call start instants of an async stage limited to `rate` with 16 workers.
async fn flowline_stage_rate(rate: u64, secs: f64) -> Vec<Instant> {
    let n = (rate as f64 * secs) as u64 + 1;
    let starts = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n as usize)));
    let s = starts.clone();
    Pipeline::from_iter(0..n)
        .map_async("call", move |x| {
            s.lock().expect("not poisoned").push(Instant::now());
            async move { x }
        })
        .workers(16)
        .rate_limit(Rate::per_second(rate))
        .run()
        .await
        .expect("rate run");
    starts.lock().expect("not poisoned").clone()
}

/// `n` threads that spin until the guard is dropped: every core stays busy.
struct Busy {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Busy {
    fn start(n: usize) -> Busy {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Busy { stop, threads }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn rate_line(case: &str, rate: u64, secs: f64, f: &[Instant], g: &[Instant]) {
    let (fa, fe, fw) = accuracy(f, rate as f64);
    let (ga, ge, gw) = accuracy(g, rate as f64);
    println!(
        "{}",
        json!({"suite": "flow", "case": case, "flowline": fa.round(), "baseline": ga.round(),
               "unit": "items/s", "ratio": fa / ga, "target": rate, "seconds": secs,
               "error_pct": fe, "window_ratio": fw, "max_in_period": max_in_period(f),
               "baseline_error_pct": ge, "baseline_window_ratio": gw,
               "baseline_max_in_period": max_in_period(g)})
    );
}

/// What the simulated server does besides queueing.
#[derive(Clone, Copy)]
struct Scenario {
    /// Service-time growth per `CAPACITY` queued calls (0 for the queue-only model).
    contention: f64,
    /// Every `instant`-th call is answered at once (0: none).
    instant: u64,
    /// The second half of the items takes twice the service time.
    slows_half_way: bool,
}

impl Scenario {
    const fn queue(contention: f64) -> Self {
        Scenario {
            contention,
            instant: 0,
            slows_half_way: false,
        }
    }
}

/// The simulated server: `CAPACITY` slots, `SERVICE` per call, a FIFO queue in front.
struct Backend {
    slots: Semaphore,
    /// Calls waiting for a slot.
    queued: AtomicUsize,
    /// Service-time growth per `CAPACITY` queued calls (0 for the queue-only model).
    contention: f64,
    instant: u64,
    slow_from: u64,
}

const CAPACITY: usize = 32;
const SERVICE: Duration = Duration::from_millis(5);

impl Backend {
    fn new(s: Scenario, items: u64) -> Arc<Self> {
        Arc::new(Backend {
            slots: Semaphore::new(CAPACITY),
            queued: AtomicUsize::new(0),
            contention: s.contention,
            instant: s.instant,
            // Half way through this run's items (static sweeps run fewer items).
            slow_from: if s.slows_half_way {
                items / 2
            } else {
                u64::MAX
            },
        })
    }

    async fn call(&self, x: u64) -> u64 {
        if self.instant > 0 && x % self.instant == self.instant / 2 {
            return x;
        }
        self.queued.fetch_add(1, SeqCst);
        let slot = self.slots.acquire().await.expect("never closed");
        let queued = self.queued.fetch_sub(1, SeqCst) - 1;
        let base = if x >= self.slow_from {
            SERVICE * 2
        } else {
            SERVICE
        };
        let service = base.mul_f64(1.0 + self.contention * queued as f64 / CAPACITY as f64);
        tokio::time::sleep(service).await;
        drop(slot);
        x
    }
}

/// Items/s through the backend with `workers` calls at most in flight, or an adaptive limit,
/// and the adaptive limit at the end.
async fn throughput(items: u64, scenario: Scenario, workers: Option<usize>) -> (f64, usize) {
    let backend = Backend::new(scenario, items);
    let limit = Adaptive::vegas(1..=512).initial(4);
    let trace = std::env::var_os("FLOWLINE_BENCH_TRACE").is_some() && workers.is_none();
    let tracer = trace.then(|| {
        let l = limit.clone();
        tokio::spawn(async move {
            let mut v = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                v.push(l.limit());
                if v.len() % 25 == 0 {
                    eprintln!("limits: {v:?}");
                    v.clear();
                }
            }
        })
    });
    let stage = Pipeline::from_iter(0..items)
        .map_async("backend", move |x| {
            let b = backend.clone();
            async move { b.call(x).await }
        })
        .unordered();
    let t = Instant::now();
    let report = match workers {
        Some(n) => stage.workers(n).run().await,
        None => stage.adaptive(limit.clone()).run().await,
    }
    .expect("adaptive run");
    if let Some(t) = tracer {
        t.abort();
    }
    (
        report.delivered() as f64 / t.elapsed().as_secs_f64(),
        limit.limit(),
    )
}

/// Fewer items for small worker counts (the rate, not the count, is measured), so that every
/// run takes about 2 s.
fn items_for(workers: Option<usize>) -> u64 {
    workers.map_or(ITEMS, |w| ITEMS.min(300 * w as u64))
}

const ITEMS: u64 = 10_000;

fn median(mut v: Vec<f64>) -> f64 {
    crate::util::quantile(&mut v, 0.5)
}

/// Repetitions per configuration (medians are reported).
const REPS: usize = 3;
const SWEEP: [usize; 9] = [4, 16, 24, 32, 40, 48, 64, 128, 256];

async fn adaptive_case(case: &str, scenario: Scenario) {
    // None = adaptive; each repetition starts one configuration later (warm-up and drift
    // fall on every configuration alike).
    let configs: Vec<Option<usize>> = std::iter::once(None)
        .chain(SWEEP.iter().copied().map(Some))
        .collect();
    let mut runs = vec![Vec::new(); configs.len()];
    let mut limits = Vec::new();
    for rep in 0..REPS {
        for k in 0..configs.len() {
            let i = (k + rep * 3) % configs.len();
            let (r, limit) = throughput(items_for(configs[i]), scenario, configs[i]).await;
            runs[i].push(r);
            if i == 0 {
                limits.push(limit);
            }
        }
    }
    let runs: Vec<f64> = runs.into_iter().map(median).collect();
    let adaptive = runs[0];
    let mut best = (0usize, 0.0f64);
    let mut sweep = serde_json::Map::new();
    for (w, r) in SWEEP.iter().zip(&runs[1..]) {
        sweep.insert(w.to_string(), json!(r.round()));
        if *r > best.1 {
            best = (*w, *r);
        }
    }
    let of = |w: usize| runs[1 + SWEEP.iter().position(|&x| x == w).unwrap_or(0)];
    println!(
        "{}",
        json!({"suite": "flow", "case": case, "flowline": adaptive.round(), "baseline": best.1.round(),
               "unit": "items/s", "ratio": adaptive / best.1, "best_static_workers": best.0,
               "vs_static_4": adaptive / of(4), "vs_static_256": adaptive / of(256),
               "sweep": sweep, "items": ITEMS, "reps": REPS, "contention": scenario.contention,
               "instant_every": scenario.instant, "service_doubles_half_way": scenario.slows_half_way,
               "adaptive_final_limits": limits})
    );
}

/// A call of the `hedge` case's backend: 100 ms with probability 2 %, else 1 ms, drawn from
/// a shared splitmix64 sequence (every call, hedges included, draws its own).
async fn tail_call(draws: &AtomicU64, x: u64) -> u64 {
    let mut z = draws
        .fetch_add(0x9E37_79B9_7F4A_7C15, SeqCst)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let slow = z % 100 < 2;
    tokio::time::sleep(Duration::from_millis(if slow { 100 } else { 1 })).await;
    x
}

const HEDGE_ITEMS: u64 = 10_000;

/// Item latencies (ms) of one run of the `hedge` case's stage, hedged or not.
async fn tail_run(hedge: Option<&Hedge>, seed: u64) -> Vec<f64> {
    let started: Arc<Vec<OnceLock<Instant>>> =
        Arc::new((0..HEDGE_ITEMS).map(|_| OnceLock::new()).collect());
    let draws = Arc::new(AtomicU64::new(seed));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(
        HEDGE_ITEMS as usize,
    )));
    let (s, l) = (started.clone(), latencies.clone());
    let stage = Pipeline::from_iter(0..HEDGE_ITEMS)
        .map_async("backend", move |x| {
            let (draws, s) = (draws.clone(), s.clone());
            async move {
                s[x as usize].get_or_init(Instant::now);
                tail_call(&draws, x).await
            }
        })
        .workers(16)
        .unordered();
    let stage = match hedge {
        Some(h) => stage.hedge(h.clone()),
        None => stage,
    };
    stage
        .inspect(move |x| {
            let at = started[*x as usize]
                .get()
                .copied()
                .unwrap_or_else(Instant::now);
            l.lock().unwrap().push(at.elapsed().as_secs_f64() * 1e3);
        })
        .run()
        .await
        .expect("hedge run");
    std::mem::take(&mut *latencies.lock().unwrap())
}

async fn hedge_case() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut plain = tail_run(None, seed).await;
    let hedge = Hedge::percentile(0.95);
    let mut hedged = tail_run(Some(&hedge), seed ^ 0x5DEE_CE66).await;
    let (p99, p99_plain) = (quantile(&mut hedged, 0.99), quantile(&mut plain, 0.99));
    let extra_pct = 100.0 * hedge.extra_calls() as f64 / hedge.calls().max(1) as f64;
    println!(
        "{}",
        json!({"suite": "flow", "case": "hedge", "flowline": round3(p99), "baseline": round3(p99_plain),
               "unit": "ms p99", "ratio": round3(p99 / p99_plain), "extra_pct": round3(extra_pct),
               "p50": round3(quantile(&mut hedged, 0.5)), "p50_baseline": round3(quantile(&mut plain, 0.5)),
               "calls": hedge.calls(), "extra_calls": hedge.extra_calls(), "items": HEDGE_ITEMS,
               "in_flight": 16, "hedge": "percentile(0.95)", "max_extra": 0.1})
    );
}

const LIVE_CALL: Duration = Duration::from_millis(3);
const LIVE_PHASE: Duration = Duration::from_millis(400);
const LIVE_STEPS: [usize; 3] = [4, 64, 8];

/// Each start as (time since the run began, calls running with it).
type LiveStarts = Arc<std::sync::Mutex<Vec<(Duration, usize)>>>;

fn live_call(
    t0: Instant,
    now: &Arc<AtomicUsize>,
    starts: &LiveStarts,
) -> impl Future<Output = ()> + Send + use<> {
    let n = now.fetch_add(1, SeqCst) + 1;
    starts.lock().unwrap().push((t0.elapsed(), n));
    let now = now.clone();
    async move {
        tokio::time::sleep(LIVE_CALL).await;
        now.fetch_sub(1, SeqCst);
    }
}

/// (max_deviation, max_shortfall) over the spans after each change.
fn live_deviation(starts: &[(Duration, usize)]) -> (i64, i64) {
    let (mut over, mut short) = (i64::MIN, i64::MIN);
    for (i, &limit) in LIVE_STEPS.iter().enumerate() {
        let from = LIVE_PHASE * i as u32 + LIVE_CALL + Duration::from_millis(1);
        let to = LIVE_PHASE * (i as u32 + 1);
        let most = starts
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, n)| *n as i64)
            .max()
            .unwrap_or(0);
        over = over.max(most - limit as i64);
        short = short.max(limit as i64 - most);
    }
    (over, short)
}

async fn live_flowline() -> (f64, i64, i64) {
    let (t0, now, starts) = (
        Instant::now(),
        Arc::new(AtomicUsize::new(0)),
        LiveStarts::default(),
    );
    let (n, s) = (now.clone(), starts.clone());
    let handle = Pipeline::from_iter(0..u64::MAX)
        .map_async("call", move |_| live_call(t0, &n, &s))
        .workers(LIVE_STEPS[0])
        .unordered()
        .spawn();
    for (i, &w) in LIVE_STEPS.iter().enumerate().skip(1) {
        tokio::time::sleep_until((t0 + LIVE_PHASE * i as u32).into()).await;
        handle.set_workers("call", w).expect("set_workers");
    }
    tokio::time::sleep_until((t0 + LIVE_PHASE * LIVE_STEPS.len() as u32).into()).await;
    handle.stop();
    let report = handle.join().await.expect("live run");
    let rate = report.delivered() as f64 / t0.elapsed().as_secs_f64();
    let (over, short) = live_deviation(&starts.lock().unwrap());
    (rate, over, short)
}

async fn live_baseline() -> (f64, i64, i64) {
    let (t0, now, starts) = (
        Instant::now(),
        Arc::new(AtomicUsize::new(0)),
        LiveStarts::default(),
    );
    let sem = Arc::new(Semaphore::new(LIVE_STEPS[0]));
    let end = t0 + LIVE_PHASE * LIVE_STEPS.len() as u32;
    let changes = {
        let sem = sem.clone();
        tokio::spawn(async move {
            let mut limit = LIVE_STEPS[0];
            for (i, &w) in LIVE_STEPS.iter().enumerate().skip(1) {
                tokio::time::sleep_until((t0 + LIVE_PHASE * i as u32).into()).await;
                if w > limit {
                    sem.add_permits(w - limit);
                } else {
                    let sem = sem.clone();
                    let down = (limit - w) as u32;
                    tokio::spawn(
                        async move { sem.acquire_many_owned(down).await.map(|p| p.forget()) },
                    );
                }
                limit = w;
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut done = 0u64;
    while Instant::now() < end {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let call = live_call(t0, &now, &starts);
        tasks.spawn(async move {
            call.await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {
            done += 1;
        }
    }
    while tasks.join_next().await.is_some() {
        done += 1;
    }
    changes.await.expect("changes");
    let rate = done as f64 / t0.elapsed().as_secs_f64();
    let (over, short) = live_deviation(&starts.lock().unwrap());
    (rate, over, short)
}

async fn live_workers_case() {
    let (f, over, short) = live_flowline().await;
    let (b, b_over, b_short) = live_baseline().await;
    println!(
        "{}",
        json!({"suite": "flow", "case": "live_workers", "flowline": f.round(), "baseline": b.round(),
               "unit": "items/s", "ratio": round3(f / b), "max_deviation": over,
               "max_shortfall": short, "baseline_max_deviation": b_over,
               "baseline_max_shortfall": b_short, "workers": LIVE_STEPS,
               "call_ms": LIVE_CALL.as_millis(), "phase_ms": LIVE_PHASE.as_millis()})
    );
}

pub fn run(args: &[String]) {
    let secs: f64 = args.iter().find_map(|s| s.parse().ok()).unwrap_or(3.0);
    let only = args.iter().find(|s| s.parse::<f64>().is_err());
    let wanted = |case: &str| only.is_none_or(|p| case.starts_with(p.as_str()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for (case, rate) in [
            ("rate_1k", 1_000u64),
            ("rate_10k", 10_000),
            ("rate_100k", 100_000),
        ] {
            if !wanted(case) {
                continue;
            }
            let f = flowline_rate(rate, secs).await;
            let g = governor_rate(rate, secs).await;
            rate_line(case, rate, secs, &f, &g);
        }
        if wanted("rate_333_loaded") {
            let busy = Busy::start(4);
            let f = flowline_stage_rate(333, secs).await;
            let g = governor_rate(333, secs).await;
            drop(busy);
            rate_line("rate_333_loaded", 333, secs, &f, &g);
        }
        let cases = [
            ("adaptive", Scenario::queue(0.0)),
            ("adaptive_overload", Scenario::queue(0.2)),
            (
                "adaptive_instant",
                Scenario {
                    instant: 100,
                    ..Scenario::queue(0.0)
                },
            ),
            (
                "adaptive_slowdown",
                Scenario {
                    slows_half_way: true,
                    ..Scenario::queue(0.0)
                },
            ),
        ];
        for (case, scenario) in cases {
            if wanted(case) {
                adaptive_case(case, scenario).await;
            }
        }
        if wanted("hedge") {
            hedge_case().await;
        }
        if wanted("live_workers") {
            live_workers_case().await;
        }
    });
}
