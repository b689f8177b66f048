//! Crash and resume against a real PostgreSQL server: the `pg_cursor` example runs as a
//! child process over 50,000 rows, is killed with SIGKILL at five random points, and is then
//! let finish. With `--exactly-once` every row's effect is in `processed_rows` exactly once.
//! A graceful stop (without idempotency keys) followed by a rerun repeats nothing either.
//!
//! The child is this test binary itself, re-run with `FLOWLINE_PG_CHILD` set, calling the
//! example's own `run` (the example file is compiled in below), so no cargo build runs
//! inside the test. The server is the test's own cluster (`support::pg`), or
//! `FLOWLINE_PG_URL`.

#[allow(dead_code, unreachable_pub)]
#[path = "../../stores/postgres/examples/pg_cursor.rs"]
mod pg_cursor;
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowline_postgres::tokio_postgres;

const ROWS: i64 = 50_000;
const CHILD: &str = "FLOWLINE_PG_CHILD";
const CHILD_ARGS: &str = "FLOWLINE_PG_CHILD_ARGS";

/// The child's entry: does nothing unless run by the tests below.
#[test]
fn pg_child_entry() {
    let Ok(url) = std::env::var(CHILD) else {
        return;
    };
    let mut args = vec!["--url".to_string(), url, "--rows".into(), ROWS.to_string()];
    if let Ok(more) = std::env::var(CHILD_ARGS) {
        args.extend(more.split_whitespace().map(str::to_string));
    }
    let args = pg_cursor::Args::parse(&args).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(pg_cursor::run(args)).unwrap();
}

fn child(url: &str, args: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "pg_child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, url)
        .env(CHILD_ARGS, args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// A client of the test's own, for reading what the child wrote.
struct Db {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Db {
    fn open(url: &str) -> Db {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
        });
        Db { rt, client }
    }

    fn count(&self, sql: &str) -> i64 {
        self.rt
            .block_on(self.client.query_opt(sql, &[]))
            .ok()
            .flatten()
            .map_or(0, |r| r.get::<_, i64>(0))
    }

    fn checkpoint(&self) -> Option<i64> {
        self.rt
            .block_on(self.client.query_opt(
                "SELECT cursor FROM flowline_checkpoints WHERE name = 'items'",
                &[],
            ))
            .ok()
            .flatten()
            .map(|r| r.get::<_, String>(0).parse().unwrap())
    }

    /// (rows with no effect, rows with more than one).
    fn missing_and_repeated(&self) -> (i64, i64) {
        let missing = self.count(
            "SELECT count(*) FROM items i WHERE NOT EXISTS (SELECT 1 FROM processed_rows p WHERE p.id = i.id)",
        );
        let repeated = self.count(
            "SELECT count(*) FROM (SELECT id FROM processed_rows GROUP BY id HAVING count(*) > 1) d",
        );
        (missing, repeated)
    }
}

fn seed() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as i64
}

#[test]
fn pg_cursor_exactly_once_survives_five_sigkills() {
    let mut server = support::pg::PgServer::start();
    let url = server.database();
    // Four threads spinning beside the server and the children: a loaded machine.
    let _busy = support::busy::BusyThreads::start(4);
    let seed = seed();
    // Five kill points, one in each stretch of ~8,000 rows, so that each life gets some way.
    let points: Vec<i64> = (0..5)
        .map(|i| (i + 1) * 8_000 + (seed / (i + 1)) % 4_000)
        .collect();
    eprintln!("kill points (effects written): {points:?} (seed {seed})");
    let db = Db::open(&url);
    let effects = "SELECT count(*) FROM processed_rows";
    for (life, &at) in points.iter().enumerate() {
        let mut c = child(&url, "--exactly-once");
        let started = Instant::now();
        loop {
            if db.count(effects) >= at {
                break;
            }
            if let Some(status) = c.try_wait().unwrap() {
                panic!("life {life} ended on its own ({status}) before the kill point {at}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "child too slow"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
        let (_, repeated) = db.missing_and_repeated();
        eprintln!(
            "life {life}: killed at {} effects, checkpoint {:?}",
            db.count(effects),
            db.checkpoint()
        );
        assert_eq!(repeated, 0, "a duplicate effect after kill {life}");
    }
    let status = child(&url, "--exactly-once").wait().unwrap();
    assert!(status.success());
    let (missing, repeated) = db.missing_and_repeated();
    assert_eq!(
        (missing, repeated),
        (0, 0),
        "rows without / with repeated effects"
    );
    assert_eq!(db.count(effects), ROWS);
    assert_eq!(db.checkpoint(), Some(ROWS));
}

/// Without idempotency keys, only the source can keep a rerun from repeating rows: after a
/// graceful stop the page begun is finished and committed, so nothing is repeated.
#[test]
fn pg_cursor_graceful_stop_and_rerun_repeat_nothing() {
    let mut server = support::pg::PgServer::start();
    let url = server.database();
    let db = Db::open(&url);
    let stop_after = 10_000 + seed() % 20_000;
    let status = child(&url, &format!("--stop-after {stop_after}"))
        .wait()
        .unwrap();
    assert!(status.success());
    let first = db.count("SELECT count(*) FROM processed_rows");
    assert!(
        first >= stop_after && first < ROWS,
        "{first} after stopping at {stop_after}"
    );
    assert_eq!(
        db.checkpoint(),
        Some(first),
        "the checkpoint is where the stop ended"
    );
    let status = child(&url, "").wait().unwrap();
    assert!(status.success());
    assert_eq!(db.missing_and_repeated(), (0, 0));
    assert_eq!(db.checkpoint(), Some(ROWS));
}
