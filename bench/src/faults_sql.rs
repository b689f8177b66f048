//! Suite `faults`, PostgreSQL and SQLite cases: the `pg_cursor` and `sql_cursor` examples
//! with `--exactly-once` (idempotency keys, each batch's effect in one transaction with its
//! keys), unpaced, while the server has a fault in the middle of the run (after 30 % of the
//! rows), against the same run with no fault.
//!
//! - `pg_kill`: every connection to the database killed every 2 s (`pg_terminate_backend`)
//!   until the run ends;
//! - `pg_restart`: `pg_ctl restart -m fast`;
//! - `pg_stop5`: `pg_ctl stop -m fast`, 5 s, `pg_ctl start`;
//! - `pg_freeze5`: the server's processes stopped (SIGSTOP) for 5 s, then resumed;
//! - `sqlite_lock8`: the file write-locked by another connection for 8 s (`BEGIN IMMEDIATE`
//!   and a write, then `COMMIT`).
//!
//! Each line: `flowline` the run's time with the fault (s), `baseline` the same run with no
//! fault (s), `ratio` of the two (for information); `lost` (rows without an effect),
//! `duplicate_effects` (effects written twice), `dead_letters` (rows failed), `unfinished`
//! (whether the run left anything undone or needed a rerun), `recovery_s`: from the server
//! being back (the kill, the restart or start returning, the resume, the commit that lets go
//! of the lock) to the throughput being at 90 % of what it was before the fault, over
//! windows of 250 ms (the largest over the kills of `pg_kill`). Rows:
//! `FLOWLINE_BENCH_FAULT_ROWS` (default 500,000).

#[allow(dead_code, unreachable_pub)]
#[path = "../../stores/postgres/examples/pg_cursor.rs"]
mod pg_cursor;
#[allow(dead_code, unreachable_pub)]
#[path = "../../stores/sqlite/examples/sql_cursor.rs"]
mod sql_cursor;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowline::Report;
use flowline_postgres::tokio_postgres::{self, NoTls};

use crate::pg_server::PgServer;
use crate::util::emit;

/// The window throughput is measured over, before the fault and after it.
const WINDOW: Duration = Duration::from_millis(250);
const SAMPLE: Duration = Duration::from_millis(10);

fn rows() -> i64 {
    std::env::var("FLOWLINE_BENCH_FAULT_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n: &i64| n >= 10_000)
        .unwrap_or(500_000)
}

/// One run: its time, its report, and the rows done over time.
struct Watched {
    elapsed: Duration,
    report: Result<Report, String>,
    /// (time since the start, rows whose effects were written).
    samples: Vec<(Duration, u64)>,
    /// When the fault began, and each time the server was back.
    fault_at: Option<Duration>,
    back: Vec<Duration>,
}

/// What a fault does to the server, told when the run reached 30 % of its rows; returns the
/// times the server was back (since `start`).
type Fault<'a> = Box<dyn FnOnce(Instant, &AtomicBool) -> Vec<Duration> + 'a>;

/// Runs `run` on a runtime of its own thread, samples its progress, and at 30 % of `total`
/// rows applies `fault`.
fn watch(
    total: i64,
    progress: Arc<AtomicU64>,
    run: impl FnOnce() -> Result<Report, String> + Send + 'static,
    fault: Option<Fault<'_>>,
) -> Watched {
    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handle = {
        let done = done.clone();
        std::thread::spawn(move || {
            let r = run();
            let elapsed = start.elapsed();
            done.store(true, Ordering::Release);
            (r, elapsed)
        })
    };
    let sampler = {
        let (done, progress) = (done.clone(), progress.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !done.load(Ordering::Acquire) {
                samples.push((start.elapsed(), progress.load(Ordering::Relaxed)));
                std::thread::sleep(SAMPLE);
            }
            samples.push((start.elapsed(), progress.load(Ordering::Relaxed)));
            samples
        })
    };
    let (mut fault_at, mut back) = (None, Vec::new());
    if let Some(fault) = fault {
        while progress.load(Ordering::Relaxed) < (total as u64) * 3 / 10
            && !done.load(Ordering::Acquire)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        fault_at = Some(start.elapsed());
        back = fault(start, &done);
    }
    let (report, elapsed) = handle.join().expect("run thread");
    let samples = sampler.join().expect("sampler");
    Watched {
        elapsed,
        report,
        samples,
        fault_at,
        back,
    }
}

/// Rows per second over the window ending at sample `i`.
fn rate_at(samples: &[(Duration, u64)], i: usize) -> Option<f64> {
    let (t, n) = samples[i];
    let from = t.checked_sub(WINDOW)?;
    let j = samples.iter().rposition(|(s, _)| *s <= from)?;
    let (t0, n0) = samples[j];
    let dt = (t - t0).as_secs_f64();
    (dt > 0.0).then(|| (n - n0) as f64 / dt)
}

/// From `back` to the start of the first window at 90 % of the throughput before the fault;
/// `None` when the run ended first below it.
fn recovery(w: &Watched, back: Duration) -> Option<f64> {
    let fault_at = w.fault_at?;
    let k = w.samples.iter().rposition(|(t, _)| *t <= fault_at)?;
    let before = rate_at(&w.samples, k)?;
    let last = w.samples.last()?.1;
    w.samples.iter().enumerate().find_map(|(i, &(t, n))| {
        if t < back {
            return None;
        }
        // The run's last rows (the tail of the table) count as recovered: a run that ends
        // within a window of the server's return has recovered by its end at the latest.
        if n == last {
            return Some((t - back).as_secs_f64());
        }
        if t < back + WINDOW {
            return None;
        }
        let rate = rate_at(&w.samples, i)?;
        (rate >= 0.9 * before).then(|| (t - WINDOW).saturating_sub(back).as_secs_f64())
    })
}

fn pg_count(url: &str, sql: &str) -> i64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
        tokio::spawn(conn);
        c.query_one(sql, &[]).await.expect("count").get::<_, i64>(0)
    })
}

/// lost, duplicate effects.
fn pg_effects(url: &str, rows: i64) -> (i64, i64) {
    let total = pg_count(url, "SELECT count(*) FROM processed_rows");
    let distinct = pg_count(url, "SELECT count(DISTINCT id) FROM processed_rows");
    let inside = pg_count(
        url,
        &format!("SELECT count(DISTINCT id) FROM processed_rows WHERE id BETWEEN 1 AND {rows}"),
    );
    (rows - inside, total - distinct)
}

fn sqlite_effects(db: &str, rows: i64) -> (i64, i64) {
    let c = rusqlite::Connection::open(db).expect("open");
    let q = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).expect("count") };
    let total = q("select count(*) from processed_rows");
    let distinct = q("select count(distinct id) from processed_rows");
    let inside = q(&format!(
        "select count(distinct id) from processed_rows where id between 1 and {rows}"
    ));
    (rows - inside, total - distinct)
}

/// A fresh database with the example's tables filled; the example's arguments for it.
fn pg_prepare(server: &mut PgServer, rows: i64) -> (String, pg_cursor::Args, Arc<AtomicU64>) {
    let url = server.database();
    let rt = crate::util::runtime();
    rt.block_on(async {
        let cps = flowline_postgres::PgCheckpoints::connect(&url)
            .await
            .expect("connect");
        pg_cursor::create_tables(cps.pool(), rows)
            .await
            .expect("fill");
    });
    let argv: Vec<String> = ["--url", &url, "--rows", &rows.to_string(), "--exactly-once"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut args = pg_cursor::Args::parse(&argv).expect("args");
    let progress = Arc::new(AtomicU64::new(0));
    args.progress = Some(progress.clone());
    (url, args, progress)
}

fn pg_run(args: pg_cursor::Args) -> impl FnOnce() -> Result<Report, String> + Send + 'static {
    move || {
        crate::util::runtime()
            .block_on(pg_cursor::run(args))
            .map_err(|e| flowline::error_chain(&*e))
    }
}

fn report_line(case: &str, rows: i64, plain: &Watched, faulty: &Watched, effects: (i64, i64)) {
    let (lost, duplicates) = effects;
    let (dead, unfinished) = match &faulty.report {
        Ok(r) => (r.failures, pg_cursor::unfinished(r).is_some()),
        Err(e) => {
            eprintln!("{case}: the run failed: {e}");
            (0, true)
        }
    };
    let recoveries: Vec<Option<f64>> = faulty.back.iter().map(|&b| recovery(faulty, b)).collect();
    // FLOWLINE_BENCH_TRACE=1: the progress samples around the fault, to see a slow recovery.
    if std::env::var_os("FLOWLINE_BENCH_TRACE").is_some() {
        if let (Some(at), Some(&back)) = (faulty.fault_at, faulty.back.last()) {
            let near = faulty.samples.iter().filter(|(t, _)| {
                *t + Duration::from_millis(200) >= back && *t <= back + Duration::from_secs(3)
            });
            let line: Vec<String> = near
                .map(|(t, n)| format!("{:.3}:{n}", t.as_secs_f64()))
                .collect();
            eprintln!(
                "{case}: fault at {at:?}, back at {back:?}; samples {}",
                line.join(" ")
            );
        }
    }
    let recovery_s = if recoveries.iter().all(Option::is_some) {
        recoveries
            .iter()
            .flatten()
            .copied()
            .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))))
    } else {
        None
    };
    emit(
        "faults",
        case,
        faulty.elapsed.as_secs_f64(),
        plain.elapsed.as_secs_f64(),
        "s",
        serde_json::json!({
            "rows": rows,
            "lost": lost,
            "dead_letters": dead,
            "duplicate_effects": duplicates,
            "unfinished": unfinished,
            "recovery_s": recovery_s.map(crate::util::round3),
            "faults": faulty.back.len(),
            "fault_at_s": faulty.fault_at.map(|d| crate::util::round3(d.as_secs_f64())),
        }),
    );
}

fn pg_case(server: &mut PgServer, case: &str, rows: i64) {
    let (_, args, progress) = pg_prepare(server, rows);
    let plain = watch(rows, progress, pg_run(args), None);
    let (url, args, progress) = pg_prepare(server, rows);
    let srv = &*server;
    let fault: Fault<'_> = match case {
        "pg_kill" => {
            let url = url.clone();
            Box::new(move |start, done| {
                let mut back = Vec::new();
                while !done.load(Ordering::Acquire) {
                    srv.terminate_connections(&url);
                    back.push(start.elapsed());
                    let next = Instant::now() + Duration::from_secs(2);
                    while Instant::now() < next && !done.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                back
            })
        }
        "pg_restart" => Box::new(move |start, _| {
            srv.restart_fast();
            vec![start.elapsed()]
        }),
        "pg_stop5" => Box::new(move |start, _| {
            srv.stop_fast();
            std::thread::sleep(Duration::from_secs(5));
            srv.start_again();
            vec![start.elapsed()]
        }),
        "pg_freeze5" => Box::new(move |start, _| {
            let pids = srv.freeze();
            std::thread::sleep(Duration::from_secs(5));
            srv.thaw(&pids);
            vec![start.elapsed()]
        }),
        other => unreachable!("{other}"),
    };
    let faulty = watch(rows, progress, pg_run(args), Some(fault));
    report_line(case, rows, &plain, &faulty, pg_effects(&url, rows));
}

fn sqlite_case(rows: i64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let prepare = |name: &str| {
        let db = dir.path().join(name).to_string_lossy().into_owned();
        sql_cursor::create_table(&db, rows).expect("fill");
        let argv: Vec<String> = [&db, &rows.to_string(), "--exactly-once"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut args = sql_cursor::Args::parse(&argv).expect("args");
        let progress = Arc::new(AtomicU64::new(0));
        args.progress = Some(progress.clone());
        (db, args, progress)
    };
    let run = |args: sql_cursor::Args| {
        move || {
            crate::util::runtime()
                .block_on(sql_cursor::run(args))
                .map_err(|e| flowline::error_chain(&*e))
        }
    };
    let (_, args, progress) = prepare("plain.db");
    let plain = watch(rows, progress, run(args), None);
    let (db, args, progress) = prepare("locked.db");
    let locked_db = db.clone();
    let fault: Fault<'_> = Box::new(move |start, _| {
        let c = rusqlite::Connection::open(&locked_db).expect("open");
        c.execute_batch(
            "BEGIN IMMEDIATE; CREATE TABLE IF NOT EXISTS backup_marker (at INTEGER);
             INSERT INTO backup_marker VALUES (1);",
        )
        .expect("take the write lock");
        std::thread::sleep(Duration::from_secs(8));
        c.execute_batch("COMMIT").expect("commit");
        vec![start.elapsed()]
    });
    let faulty = watch(rows, progress, run(args), Some(fault));
    report_line(
        "sqlite_lock8",
        rows,
        &plain,
        &faulty,
        sqlite_effects(&db, rows),
    );
}

/// The PostgreSQL and SQLite cases of suite `faults` (all, or the one named).
pub fn run(case: Option<&str>) {
    let rows = rows();
    let pg_cases = ["pg_kill", "pg_restart", "pg_stop5", "pg_freeze5"];
    let wanted = |c: &str| case.is_none_or(|w| c.starts_with(w));
    if pg_cases.iter().any(|c| wanted(c)) {
        let mut server = PgServer::start();
        assert!(
            server.is_own(),
            "the faults suite stops and freezes its server: unset FLOWLINE_PG_URL"
        );
        for c in pg_cases.iter().filter(|c| wanted(c)) {
            pg_case(&mut server, c, rows);
        }
    }
    if wanted("sqlite_lock8") {
        sqlite_case(rows);
    }
}
