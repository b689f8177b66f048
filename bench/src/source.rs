//! Suite `source`: the cursor source and the progress observer.
//!
//! - `cursor_sqlite`: rows through `Pipeline::from_cursor` over a SQLite table (keyset pages
//!   of 1,000, checkpoints in the same file, a trivial stage) against a hand-written keyset
//!   loop doing the same reads, alternating, median of each. Rows: `FLOWLINE_BENCH_ROWS`
//!   (default 1,000,000). Peak RSS is the highest VmHWM of either side's runs, the peak
//!   being reset before each run.
//! - `progress_overhead`: a 1,000,000-item pipeline with `.progress()` (plain lines, to a
//!   sink writer) against the same pipeline without, alternating, median of each.
//! - `metrics_overhead`: a 4,000,000-item pipeline (an async stage, a filter) run with a
//!   Prometheus recorder installed (flowline's `metrics` feature exporting to it) against
//!   the same run with no recorder, 61 alternating pairs. `ratio` is the median of the
//!   pairs' ratios (`ratio_p10`/`ratio_p90` their spread, `ratio_of_medians` the usual
//!   figure); `flowline`/`baseline` are each side's median. Goal: ratio ≤ 1.05.

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowline::prelude::*;
use flowline::{Page, ProgressOptions};
use flowline_sqlite::SqliteCheckpoints;
use rusqlite::{Connection, params};

use crate::util::{
    alternate, alternate_paired, emit, ns_per_item, peak_rss_mib, reset_peak_rss, round3, runtime,
    time,
};

const PAGE: i64 = 1000;
const CURSOR_REPS: usize = 7;
const PROGRESS_REPS: usize = 21;
const METRICS_REPS: usize = 61;

fn page(conn: &Connection, after: i64) -> rusqlite::Result<Vec<(i64, String)>> {
    let mut q =
        conn.prepare_cached("select id, payload from items where id > ?1 order by id limit ?2")?;
    q.query_map(params![after, PAGE], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

fn fill(db: &std::path::Path, rows: i64) {
    let mut c = Connection::open(db).expect("open");
    c.execute_batch(
        "pragma journal_mode = wal;
         create table items (id integer primary key, payload text not null);",
    )
    .expect("create");
    let tx = c.transaction().expect("tx");
    {
        let mut ins = tx
            .prepare("insert into items values (?1, ?2)")
            .expect("prepare");
        for id in 1..=rows {
            ins.execute(params![id, format!("payload-{id}")])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

/// The hand-written keyset loop: same reads, same trivial work.
fn baseline_keyset(db: &std::path::Path, rows: i64) {
    let conn = Connection::open(db).expect("open");
    let (mut after, mut sum, mut n) = (0i64, 0u64, 0i64);
    loop {
        let p = page(&conn, after).expect("page");
        let Some(last) = p.last().map(|r| r.0) else {
            break;
        };
        for (id, payload) in p {
            sum = sum.wrapping_add(id as u64 + payload.len() as u64);
            n += 1;
        }
        after = last;
    }
    assert_eq!(n, rows);
    black_box(sum);
}

/// `from_cursor` over the same reads, checkpoints committed in the same file under `name`.
async fn flowline_cursor(db: &std::path::Path, name: &str, rows: i64) {
    let store = SqliteCheckpoints::open(db).expect("store");
    let conn = Arc::new(Mutex::new(Connection::open(db).expect("open")));
    let fetch = move |c: Option<i64>| {
        // The read runs inline, as in the baseline (a real service would use
        // spawn_blocking); this measures the source's own overhead.
        let r = page(&conn.lock().expect("conn"), c.unwrap_or(0)).map(|p| match p.last() {
            Some(&(last, _)) => Page::next(p, last),
            None => Page::end(p),
        });
        async move { r.map_err(|e| e.to_string()) }
    };
    let report = Pipeline::from_cursor(store, name, fetch)
        .map(|(id, payload): (i64, String)| id as u64 + payload.len() as u64)
        .run()
        .await
        .expect("run");
    assert_eq!(report.delivered(), rows as u64);
}

/// Times `f` with the peak RSS reset first; raises `peak` to the peak seen during `f`.
fn measured(peak: &mut f64, f: impl FnOnce()) -> Duration {
    reset_peak_rss();
    let t = Instant::now();
    f();
    let d = t.elapsed();
    *peak = peak.max(peak_rss_mib());
    d
}

fn cursor_sqlite() {
    let rows: i64 = std::env::var("FLOWLINE_BENCH_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("bench.db");
    fill(&db, rows);
    let rt = runtime();
    let (mut flow_rss, mut base_rss) = (0.0f64, 0.0f64);
    let mut rep = 0;
    let (f, b) = alternate(
        CURSOR_REPS,
        || {
            // A fresh checkpoint name per run: each run reads the whole table.
            rep += 1;
            let name = format!("bench-{rep}");
            measured(&mut flow_rss, || {
                rt.block_on(flowline_cursor(&db, &name, rows))
            })
        },
        || measured(&mut base_rss, || baseline_keyset(&db, rows)),
    );
    let (flow, base) = (ns_per_item(f, rows as u64), ns_per_item(b, rows as u64));
    emit(
        "source",
        "cursor_sqlite",
        flow,
        base,
        "ns/item",
        serde_json::json!({
            "rows": rows,
            "page": PAGE,
            "reps": CURSOR_REPS,
            "flowline_rows_per_s": (1e9 / flow).round(),
            "baseline_rows_per_s": (1e9 / base).round(),
            "baseline_peak_rss_mib": base_rss,
            "flowline_peak_rss_mib": flow_rss,
        }),
    );
}

fn progress_overhead() {
    const N: u64 = 1_000_000;
    let rt = runtime();
    let run = |with: bool| {
        time(&rt, || async move {
            let p = Pipeline::from_iter(0..N).map(|x| x.wrapping_mul(3));
            let p = if with {
                p.progress_with(ProgressOptions::new().to_writer(std::io::sink()))
            } else {
                p
            };
            let r = p.run().await.expect("run");
            assert_eq!(r.delivered(), N);
        })
    };
    // Warm up both, then alternate.
    run(false);
    run(true);
    let (with, without) = alternate(PROGRESS_REPS, || run(true), || run(false));
    emit(
        "source",
        "progress_overhead",
        ns_per_item(with, N),
        ns_per_item(without, N),
        "ns/item",
        serde_json::json!({"items": N, "reps": PROGRESS_REPS}),
    );
}

fn metrics_overhead() {
    // 4,000,000 items, about 150 ms a run, 61 pairs: this VM's speed drifts by up to 40%
    // within a minute, more than the 5% looked for, so the ratio is taken within each pair
    // (runs 150 ms apart) and the median of those is the case's ratio.
    const N: u64 = 4_000_000;
    let rt = runtime();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let exposition = recorder.handle();
    let job = || async {
        let r = Pipeline::from_iter(0..N)
            .map_async("call", |x: u64| async move { x.wrapping_mul(3) })
            .workers(16)
            .filter(|x| x % 2 == 0)
            .run()
            .name("bench")
            .await
            .expect("run");
        assert_eq!(r.delivered(), N / 2);
    };
    // The recorder is the thread's own (the run's exporter runs in the task that drives the
    // run, on this thread), so runs without it see none.
    let with = || metrics::with_local_recorder(&recorder, || time(&rt, job));
    let without = || time(&rt, job);
    with();
    without();
    let paired = alternate_paired(METRICS_REPS, with, without);
    assert!(
        exposition
            .render()
            .contains("flowline_stage_sent_items_total")
    );
    emit(
        "source",
        "metrics_overhead",
        ns_per_item(paired.flowline, N),
        ns_per_item(paired.baseline, N),
        "ns/item",
        serde_json::json!({
            "items": N,
            "reps": METRICS_REPS,
            "ratio": round3(paired.ratio),
            "ratio_p10": round3(paired.ratio_p10),
            "ratio_p90": round3(paired.ratio_p90),
            "ratio_of_medians": round3(
                paired.flowline.as_secs_f64() / paired.baseline.as_secs_f64()
            ),
            "goal_ratio": 1.05,
        }),
    );
}

/// Runs every case of the suite, or only `only`.
pub fn run(only: Option<&str>) {
    let want = |c: &str| only.is_none_or(|o| o == c);
    if want("cursor_sqlite") {
        cursor_sqlite();
    }
    if want("progress_overhead") {
        progress_overhead();
    }
    if want("metrics_overhead") {
        metrics_overhead();
    }
    if want("cursor_pg") || want("exactly_once_pg") {
        crate::source_pg::run(only);
    }
}
