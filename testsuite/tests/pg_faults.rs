//! Faults of a real PostgreSQL server under a running pipeline: the `pg_cursor` example with
//! `--exactly-once` (idempotency keys, each batch's effect in one transaction with its keys)
//! over 100,000 rows, paced at 10,000 rows/s so that the fault lands in the middle of the
//! run, while the test's own server has its connections killed every 2 s
//! (`pg_terminate_backend`), is restarted (`pg_ctl restart -m fast`), is stopped for 5 s
//! then started, or is frozen (SIGSTOP) for 5 s then resumed. Each run must finish by itself
//! (no rerun) with every row's effect written exactly once: lost 0, duplicate effects 0,
//! failed (dead-lettered) rows 0, nothing left unfinished.
//!
//! Each test has a cluster of its own (the faults hit the whole server). The example's own
//! `run` is compiled in below and runs in this process, on a runtime of its own thread.

#[allow(dead_code, unreachable_pub)]
#[path = "../../stores/postgres/examples/pg_cursor.rs"]
mod pg_cursor;
mod support;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use flowline::Report;
use flowline_postgres::tokio_postgres;
use support::pg::PgServer;

const ROWS: i64 = 100_000;
const RATE: u64 = 10_000;
/// Longer than any run below takes (about 10 s of rows plus the fault): a run still going
/// then has hung.
const RUN_BOUND: Duration = Duration::from_secs(50);

/// The example's run: its report (or its error as a paragraph) comes on this channel.
type Run = mpsc::Receiver<Result<Report, String>>;

/// The example, started on a thread of its own; its report comes back on the channel.
fn start(url: &str) -> Run {
    let args = [
        "--url",
        url,
        "--rows",
        &ROWS.to_string(),
        "--exactly-once",
        "--rate",
        &RATE.to_string(),
    ];
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let args = pg_cursor::Args::parse(&args).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(pg_cursor::run(args));
        let _ = tx.send(r.map_err(|e| flowline::error_chain(&*e)));
    });
    rx
}

/// A query on a connection of the test's own, made for the call (the server may have
/// restarted since the last one). `None` while the server does not answer.
fn count(url: &str, sql: &str) -> Option<i64> {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
            let (client, conn) = tokio::time::timeout(Duration::from_secs(2), connect)
                .await
                .ok()?
                .ok()?;
            tokio::spawn(conn);
            let row = client.query_opt(&sql, &[]).await.ok()??;
            row.try_get::<_, i64>(0).ok()
        })
    })
    .join()
    .unwrap()
}

/// Waits until the run has written `rows` effects (the fault then lands mid-run).
fn wait_for_progress(url: &str, rows: i64, run: &Run) {
    let until = Instant::now() + RUN_BOUND;
    loop {
        if count(url, "SELECT count(*) FROM processed_rows").unwrap_or(0) >= rows {
            return;
        }
        if let Ok(r) = run.try_recv() {
            panic!("the run ended before the fault: {r:?}");
        }
        assert!(Instant::now() < until, "no progress to {rows} rows");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The run's end, which must come by itself within the bound, complete, and with every
/// row's effect exactly once.
fn assert_exactly_once(url: &str, run: Run, fault: &str) {
    let report = match run.recv_timeout(RUN_BOUND) {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => panic!("{fault}: the run failed: {e}"),
        Err(_) => panic!("{fault}: the run did not finish within {RUN_BOUND:?}"),
    };
    assert_eq!(report.failures, 0, "{fault}: dead-lettered rows\n{report}");
    assert_eq!(
        pg_cursor::unfinished(&report),
        None,
        "{fault}: the run did not finish\n{report}"
    );
    let total = count(url, "SELECT count(*) FROM processed_rows").unwrap();
    let distinct = count(url, "SELECT count(DISTINCT id) FROM processed_rows").unwrap();
    let in_range = count(
        url,
        "SELECT count(DISTINCT id) FROM processed_rows WHERE id BETWEEN 1 AND 100000",
    )
    .unwrap();
    assert_eq!(ROWS - in_range, 0, "{fault}: rows lost");
    assert_eq!(total - distinct, 0, "{fault}: duplicate effects");
    assert_eq!(distinct, ROWS, "{fault}: effects of rows that do not exist");
    eprintln!("{fault}: {report}");
}

/// A cluster of the test's own with the example running on it past `rows` rows. `None`,
/// after a SKIPPED line, when `FLOWLINE_PG_URL` points the tests at a shared server: these
/// faults hit the whole server, so they are only made on one the test started.
fn running(test: &str, rows: i64) -> Option<(PgServer, String, Run)> {
    let mut server = PgServer::start();
    if !server.is_own() {
        eprintln!("SKIPPED {test}: it needs a cluster of its own; unset FLOWLINE_PG_URL");
        return None;
    }
    let url = server.database();
    let run = start(&url);
    wait_for_progress(&url, rows, &run);
    Some((server, url, run))
}

#[test]
fn connections_killed_every_2s_lose_nothing_and_duplicate_nothing() {
    let Some((server, url, run)) = running("connections killed", 10_000) else {
        return;
    };
    let mut kills = 0;
    let mut killed = 0;
    // Every 2 s until the run ends: about four kills in a run of ten seconds.
    let report = loop {
        match run.recv_timeout(Duration::from_secs(2)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                killed += server.terminate_connections(&url);
                kills += 1;
                assert!(kills < 25, "the run did not finish under kills");
            }
            Err(e) => panic!("{e}"),
        }
    };
    let (tx, rx) = mpsc::channel();
    tx.send(report).unwrap();
    assert_exactly_once(&url, rx, "connections killed");
    assert!(
        kills >= 2 && killed >= 2,
        "{kills} kills, {killed} connections"
    );
}

#[test]
fn a_fast_restart_loses_nothing_and_duplicates_nothing() {
    let Some((server, url, run)) = running("fast restart", 20_000) else {
        return;
    };
    server.restart_fast();
    assert_exactly_once(&url, run, "pg_ctl restart -m fast");
}

#[test]
fn a_server_stopped_for_5s_loses_nothing_and_duplicates_nothing() {
    let Some((server, url, run)) = running("server stopped", 20_000) else {
        return;
    };
    server.stop_fast();
    let stopped = Instant::now();
    assert_eq!(
        count(&url, "SELECT 1::bigint"),
        None,
        "the server still answers"
    );
    std::thread::sleep(Duration::from_secs(5).saturating_sub(stopped.elapsed()));
    server.start_again();
    assert_exactly_once(&url, run, "server stopped for 5 s");
}

#[test]
fn a_server_frozen_for_5s_loses_nothing_and_duplicates_nothing() {
    let Some((server, url, run)) = running("server frozen", 20_000) else {
        return;
    };
    let frozen = server.freeze();
    let at = Instant::now();
    assert_eq!(
        count(&url, "SELECT 1::bigint"),
        None,
        "the frozen server answered"
    );
    std::thread::sleep(Duration::from_secs(5).saturating_sub(at.elapsed()));
    server.thaw(&frozen);
    assert_exactly_once(&url, run, "server frozen for 5 s");
}

/// A `commit_with` whose answer was lost is tried again: the keys are done by this holder
/// already, so the second call writes nothing and says `AlreadyCommitted`; keys another
/// holder committed are still "not reserved", never taken for this holder's.
#[test]
fn commit_with_tried_again_after_a_lost_answer_writes_the_effect_once() {
    use flowline::Store;
    use flowline_postgres::{AlreadyCommitted, PgStore};
    let mut server = PgServer::start();
    let url = server.database();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = PgStore::connect(&url).await.unwrap().holder("w1");
        let client = store.pool().get().await.unwrap();
        client
            .batch_execute("CREATE TABLE sent (id BIGINT NOT NULL)")
            .await
            .unwrap();
        let keys = vec!["a".to_string(), "b".to_string()];
        store.reserve(&keys, Duration::from_secs(60)).await.unwrap();
        let write = async |tx: &tokio_postgres::Transaction<'_>| {
            tx.execute("INSERT INTO sent VALUES (1), (2)", &[]).await
        };
        store.commit_with(&keys, write).await.unwrap();
        let again = store.commit_with(&keys, write).await.unwrap_err();
        let already = again.downcast_ref::<AlreadyCommitted>();
        assert_eq!(already.map(AlreadyCommitted::keys), Some(2), "{again}");
        let other = store.handle();
        let e = other.commit_with(&keys, write).await.unwrap_err();
        assert!(!e.is::<AlreadyCommitted>(), "{e}");
        assert!(e.to_string().contains("not reserved"), "{e}");
        let n: i64 = client
            .query_one("SELECT count(*) FROM sent", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2, "the effect was written more than once");
    });
}
