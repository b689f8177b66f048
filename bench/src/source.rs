//! Suite `source`: the cursor source and the progress observer.
//!
//! - `cursor_sqlite`: rows through `Pipeline::from_cursor` over a SQLite table (keyset pages
//!   of 1,000, checkpoints in the same file, a trivial stage) against a hand-written keyset
//!   loop doing the same reads. Rows: `FLOWLINE_BENCH_ROWS` (default 1,000,000). Peak RSS of
//!   the process is printed after each side.
//! - `progress_overhead`: a 1,000,000-item pipeline with `.progress()` (plain lines, to a
//!   sink writer) against the same pipeline without.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use flowline::prelude::*;
use flowline::{Page, ProgressOptions, SqliteCheckpoints};
use rusqlite::{Connection, params};

const PAGE: i64 = 1000;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn line(case: &str, flowline: f64, baseline: f64, unit: &str, extra: serde_json::Value) {
    let mut v = serde_json::json!({
        "suite": "source", "case": case, "flowline": flowline, "baseline": baseline,
        "unit": unit, "ratio": flowline / baseline,
    });
    if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    println!("{v}");
}

fn page(conn: &Connection, after: i64) -> rusqlite::Result<Vec<(i64, String)>> {
    let mut q =
        conn.prepare_cached("select id, payload from items where id > ?1 order by id limit ?2")?;
    q.query_map(params![after, PAGE], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

fn cursor_sqlite(rt: &tokio::runtime::Runtime) {
    let rows: i64 = std::env::var("FLOWLINE_BENCH_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("bench.db");
    {
        let mut c = Connection::open(&db).expect("open");
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

    // Baseline: a hand-written keyset loop, same reads, same trivial work.
    let t = Instant::now();
    let conn = Connection::open(&db).expect("open");
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
    let base = t.elapsed().as_nanos() as f64 / rows as f64;
    let base_rss = peak_rss_mib();

    // flowline: from_cursor, checkpoints committed in the same file.
    let t = Instant::now();
    let store = SqliteCheckpoints::open(&db).expect("store");
    let conn = Arc::new(Mutex::new(Connection::open(&db).expect("open")));
    let fetch = move |c: Option<i64>| {
        // The read runs inline, as in the baseline (a real service would use
        // spawn_blocking); this measures the source's own overhead.
        let r = page(&conn.lock().expect("conn"), c.unwrap_or(0)).map(|p| match p.last() {
            Some(&(last, _)) => Page::next(p, last),
            None => Page::end(p),
        });
        async move { r.map_err(|e| e.to_string()) }
    };
    let report = rt
        .block_on(
            Pipeline::from_cursor(store, "bench", fetch)
                .map(move |(id, payload): (i64, String)| id as u64 + payload.len() as u64)
                .run(),
        )
        .expect("run");
    assert_eq!(report.delivered(), rows as u64);
    let flow = t.elapsed().as_nanos() as f64 / rows as f64;
    std::hint::black_box(sum);
    line(
        "cursor_sqlite",
        flow,
        base,
        "ns/item",
        serde_json::json!({
            "rows": rows,
            "page": PAGE,
            "flowline_rows_per_s": 1e9 / flow,
            "baseline_rows_per_s": 1e9 / base,
            "baseline_peak_rss_mib": base_rss,
            "flowline_peak_rss_mib": peak_rss_mib(),
        }),
    );
}

fn progress_overhead(rt: &tokio::runtime::Runtime) {
    const N: u64 = 1_000_000;
    let time = |with: bool| {
        let t = Instant::now();
        let p = Pipeline::from_iter(0..N).map(|x| x.wrapping_mul(3));
        let p = if with {
            p.progress_with(ProgressOptions::new().to_writer(std::io::sink()))
        } else {
            p
        };
        let r = rt.block_on(p.run()).expect("run");
        assert_eq!(r.delivered(), N);
        t.elapsed().as_nanos() as f64 / N as f64
    };
    // Warm up, then take the best of three of each.
    time(false);
    let best = |with| (0..3).map(|_| time(with)).fold(f64::MAX, f64::min);
    let (without, with) = (best(false), best(true));
    line(
        "progress_overhead",
        with,
        without,
        "ns/item",
        serde_json::json!({"items": N}),
    );
}

/// Runs every case of the suite.
pub fn run() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    cursor_sqlite(&rt);
    progress_overhead(&rt);
}
