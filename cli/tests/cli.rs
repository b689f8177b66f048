//! End to end: the built `flowline` binary, real processes, a local HTTP server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, flowline};

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(String::from).collect();
    v.sort();
    v
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn sh_with_placeholder_and_keep_order() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "-k",
            "seq(1..20) | fork(4) | sh(\"echo n={} s{#}\")",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let want: Vec<String> = (1..=20).map(|i| format!("n={i} s{i}")).collect();
    assert_eq!(out(&o).lines().collect::<Vec<_>>(), want);
}

#[test]
fn sh_reads_the_item_on_stdin_and_lines_come_from_stdin() {
    let d = tmp();
    let o = flowline(d.path(), &["--quiet", "sh(\"tr a-z A-Z\")"], "ab\ncd\n");
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(sorted_lines(&out(&o)), ["AB", "CD"]);
}

#[test]
fn shell_quoting_keeps_hostile_inputs_as_data() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "-k",
            "sh(\"printf '%s\\n' {} | wc -c\")",
            ":::",
            "a'b; rm -rf x",
            "$(id)",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(
        out(&o).lines().map(str::trim).collect::<Vec<_>>(),
        ["14", "6"]
    );
}

#[test]
fn lines_file_filter_reject_dedup_and_file_sink() {
    let d = tmp();
    std::fs::write(
        d.path().join("in.txt"),
        "apple\nbanana\napple\ncherry\navocado\n",
    )
    .unwrap();
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "-k",
            "lines(in.txt) | dedup | filter(\"^a\") | reject(\"cado\") | file(out.txt)",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(
        std::fs::read_to_string(d.path().join("out.txt")).unwrap(),
        "apple\n"
    );
}

#[test]
fn batch_gives_n_items_to_one_command() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "-k",
            "seq(1..7) | batch(3, 50ms) | sh(\"echo {}\")",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(out(&o), "1 2 3\n4 5 6\n7\n");
}

#[test]
fn jsonl_and_discard_sinks() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "-k",
            "args(x, y) | sh(\"echo got {}\") | jsonl(o.jsonl)",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let text = std::fs::read_to_string(d.path().join("o.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["input"], "x");
    assert_eq!(rows[1]["output"], "got y");
    let o = flowline(
        d.path(),
        &["--quiet", "seq(1..5) | sh(\"echo {}\") | discard"],
        "",
    );
    assert_eq!((o.status.code(), out(&o)), (Some(0), String::new()));
}

#[test]
fn failures_go_to_the_dead_letter_file_with_exit_code_and_stderr() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "seq(1..4) | fork(2) | sh(\"echo oops {} >&2; exit {}\")",
        ],
        "",
    );
    assert_eq!(
        o.status.code(),
        Some(4),
        "exit status = failures; {}",
        err(&o)
    );
    let text = std::fs::read_to_string(d.path().join("flowline-failed.jsonl")).unwrap();
    let mut rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    rows.sort_by_key(|r| r["exit"].as_i64());
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[2]["input"], "3");
    assert_eq!(rows[2]["exit"], 3);
    assert_eq!(rows[2]["stderr"], "oops 3");
    assert_eq!(rows[2]["stage"], "sh");
    // The library's dead-letter line, with the job's fields added.
    assert_eq!(rows[2]["kind"], "error");
    assert_eq!(rows[2]["attempts"], 1);
    assert_eq!(rows[2]["seq"], 3);
    assert!(
        rows[2]["at_ms"].as_u64().is_some_and(|t| t > 0),
        "{}",
        rows[2]
    );
    assert!(
        rows[2]["error"].as_str().is_some_and(|e| e.contains('3')),
        "{}",
        rows[2]
    );
}

#[test]
fn exit_status_is_capped_at_101() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &["--quiet", "seq(1..120) | fork(8) | sh(false)"],
        "",
    );
    assert_eq!(o.status.code(), Some(101));
}

#[test]
fn retry_policy_retries_with_backoff() {
    let d = tmp();
    // Each input fails once (its marker file is missing), then succeeds.
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "-k",
            "seq(1..3) | retry(2, 10ms..20ms) | sh(\"test -e m{} || { touch m{}; exit 1; }; echo ok {}\")",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(out(&o), "ok 1\nok 2\nok 3\n");
}

#[test]
fn branch_error_retry_rejoins_success_and_error_sink_takes_failures() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "seq(1..6) | fork(3) | sh(\"test -e m{} || { touch m{}; exit 1; }; echo ok {}\") | branch | error:retry(3, 10ms..20ms) success:print",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(sorted_lines(&out(&o)).len(), 6);

    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "seq(1..6) | sh(\"case {} in *[13579]) exit 1;; esac; echo {}\") | branch | error:jsonl(bad.jsonl) success:file(good.txt)",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(3), "{}", err(&o));
    let bad = std::fs::read_to_string(d.path().join("bad.jsonl")).unwrap();
    assert_eq!(bad.lines().count(), 3);
    assert!(bad.contains("\"exit\":1"));
    assert_eq!(
        std::fs::read_to_string(d.path().join("good.txt"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    assert!(!d.path().join("flowline-failed.jsonl").exists());
}

#[test]
fn timeout_kills_a_slow_command() {
    let d = tmp();
    let t = Instant::now();
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "seq(1..2) | fork(2) | sh(\"sleep 10\") | timeout(200ms)",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(t.elapsed() < Duration::from_secs(5));
    let text = std::fs::read_to_string(d.path().join("flowline-failed.jsonl")).unwrap();
    assert!(text.contains("timed out after 200ms"), "{text}");
}

#[test]
fn joblog_in_gnu_parallel_format() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "--joblog",
            "log.tsv",
            "seq(1..3) | sh(\"sh -c 'exit 0'\")",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let log = std::fs::read_to_string(d.path().join("log.tsv")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines[0],
        "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand"
    );
    assert_eq!(lines.len(), 4);
    let f: Vec<&str> = lines[1].split('\t').collect();
    assert_eq!(f.len(), 9);
    assert_eq!((f[1], f[6], f[7]), (":", "0", "0"));
}

#[test]
fn state_skips_done_inputs_and_retry_failed_runs_only_failures() {
    let d = tmp();
    // Odd inputs fail until the `fixed` file exists.
    let pipe = "seq(1..6) | sh(\"test -e fixed || case {} in *[13579]) exit 1;; esac; echo {}\")";
    let o = flowline(d.path(), &["--quiet", "--state", "s.db", pipe], "");
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(sorted_lines(&out(&o)), ["2", "4", "6"]);
    // A rerun skips the done inputs: only the failures run (and fail) again.
    let o = flowline(d.path(), &["--state", "s.db", pipe], "");
    assert_eq!(o.status.code(), Some(3));
    assert!(out(&o).is_empty());
    assert!(err(&o).contains("3 skipped"), "{}", err(&o));
    std::fs::write(d.path().join("fixed"), "").unwrap();
    let o = flowline(
        d.path(),
        &["--quiet", "--state", "s.db", "--retry-failed", pipe],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(sorted_lines(&out(&o)), ["1", "3", "5"]);
    let o = flowline(d.path(), &["--quiet", "--state", "s.db", pipe], "");
    assert_eq!((o.status.code(), out(&o)), (Some(0), String::new()));
}

/// Inputs that are not UTF-8 are keys of their own: done ones are skipped, and the failed
/// one comes back byte for byte with `--retry-failed`.
#[test]
fn state_keys_inputs_that_are_not_utf8_by_their_bytes() {
    let d = tmp();
    let inputs: [&[u8]; 4] = [b"ok\xff", b"bad\xfe", b"plain", b"bad\xff"];
    let mut file = Vec::new();
    for i in inputs {
        file.extend_from_slice(i);
        file.push(b'\n');
    }
    std::fs::write(d.path().join("in.txt"), file).unwrap();
    // `bad\xfe` fails until `fixed` exists; every job logs its input's bytes.
    let pipe = "lines(in.txt) | sh(\"printf '%s\\n' {} >> ran; test -e fixed || case {} in bad*$(printf '\\376')) exit 1;; esac\")";
    let ran = || std::fs::read(d.path().join("ran")).unwrap_or_default();
    let o = flowline(d.path(), &["--quiet", "--state", "s.db", pipe], "");
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert_eq!(
        ran()
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        4
    );
    let o = flowline(d.path(), &["--state", "s.db", pipe], "");
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("3 skipped"), "{}", err(&o));
    std::fs::write(d.path().join("fixed"), "").unwrap();
    std::fs::remove_file(d.path().join("ran")).unwrap();
    let o = flowline(
        d.path(),
        &["--quiet", "--state", "s.db", "--retry-failed", pipe],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(ran(), b"bad\xfe\n", "only the failed input, as it was");
    let o = flowline(d.path(), &["--state", "s.db", pipe], "");
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(err(&o).contains("4 skipped"), "{}", err(&o));
    assert_eq!(ran(), b"bad\xfe\n", "nothing ran again");
}

/// Under `--state`, an input that failed in the main chain and then succeeded in
/// `error:retry(..)` is done: a rerun skips it.
#[test]
fn state_records_done_an_input_the_error_retry_recovered() {
    let d = tmp();
    let pipe = "seq(1..6) | fork(3) | sh(\"test -e m{} || { touch m{}; exit 1; }; echo ok {}\") | branch | error:retry(3, 10ms..20ms) success:print";
    let o = flowline(d.path(), &["--quiet", "--state", "s.db", pipe], "");
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(out(&o).lines().count(), 6, "{}", out(&o));
    let o = flowline(d.path(), &["--state", "s.db", pipe], "");
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).is_empty(), "{}", out(&o));
    assert!(err(&o).contains("6 skipped"), "{}", err(&o));
}

/// A state file that is not a database is a usage error naming the option and the path,
/// before any job runs.
#[test]
fn a_state_file_that_is_not_a_database_is_a_clear_error() {
    let d = tmp();
    std::fs::write(
        d.path().join("notes.txt"),
        "these are notes, not a database; long enough for SQLite to read a header\n",
    )
    .unwrap();
    let o = flowline(
        d.path(),
        &["--state", "notes.txt", "seq(1..3) | sh(\"touch ran.{}\")"],
        "",
    );
    assert_eq!(o.status.code(), Some(255), "{}", err(&o));
    assert!(
        err(&o).contains("--state notes.txt: not a usable state file"),
        "{}",
        err(&o)
    );
    assert!(!d.path().join("ran.1").exists());
}

#[test]
fn resume_after_sigkill_loses_nothing_and_skips_done() {
    let d = tmp();
    let pipe = "seq(1..300) | fork(4) | sh(\"sleep 0.02; echo {}\") | file(out.txt)";
    let mut child = Command::new(BIN)
        .args(["--quiet", "--state", "s.db", pipe])
        .current_dir(d.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let first = std::fs::read_to_string(d.path().join("out.txt")).unwrap_or_default();
    let n1 = first.lines().count();
    assert!(n1 > 0 && n1 < 300, "killed mid-run: {n1} done");
    // Right after the kill: the killed run's reservations are taken back at once (the
    // holder is named), not waited out for their 20 s lease.
    let t = Instant::now();
    let o = flowline(d.path(), &["--quiet", "--state", "s.db", pipe], "");
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let all = std::fs::read_to_string(d.path().join("out.txt")).unwrap();
    let mut seen: Vec<u32> = all.lines().map(|l| l.parse().unwrap()).collect();
    let total = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, (1..=300).collect::<Vec<_>>(), "no input lost");
    // The second run did only what the first had not recorded (a few in flight or in
    // the last uncommitted batch may run twice).
    assert!(
        total - n1 < 300 - n1 / 2,
        "first {n1}, second {}",
        total - n1
    );
}

#[test]
fn sql_source_pages_by_key() {
    let d = tmp();
    let db = d.path().join("jobs.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    // One transaction: 2,500 commits of one row each cost seconds of fsync.
    conn.execute_batch(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500)
         INSERT INTO jobs SELECT i, 'n' || i FROM n;",
    )
    .unwrap();
    drop(conn);
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "sql(jobs.db, \"SELECT id, name FROM jobs WHERE id % 5 = 0\", id) | sh(\"cat\")",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let lines = sorted_lines(&out(&o));
    assert_eq!(lines.len(), 500);
    assert!(lines.contains(&"2500\tn2500".to_string()));
}

/// `jobs.db` in `dir`: a table `jobs` of ids 1 to 2,500; a connection to it.
fn jobs_db(dir: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("jobs.db")).unwrap();
    conn.execute_batch(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500)
         INSERT INTO jobs SELECT i FROM n;",
    )
    .unwrap();
    conn
}

/// `flowline` echoing every id of `jobs.db` in `dir`, two jobs at a time; output piped.
fn sql_echo(dir: &std::path::Path) -> std::process::Child {
    Command::new(BIN)
        .args([
            "--quiet",
            "sql(jobs.db, \"SELECT id FROM jobs\", id) | fork(2) | sh(\"echo {}\")",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A database locked by a writer mid-run (rollback journal: readers wait) pauses the `sql`
/// source; it reads on when the lock goes, skipping and repeating no row. A query naming a
/// missing column ends the run at once with a clear error.
#[test]
fn sql_source_waits_out_a_locked_database() {
    let d = tmp();
    let mut conn = jobs_db(d.path());
    let mut child = sql_echo(d.path());
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    // The first page (1,000 rows) is read; the next is read while this lock is held.
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    tx.execute("UPDATE jobs SET id = id WHERE id = 1", [])
        .unwrap();
    // Held long enough for the source to meet it, whatever it had read ahead; whether it
    // did is timing (the run may have read every page before the lock): the test below
    // holds the lock from the start.
    std::thread::sleep(Duration::from_secs(3));
    tx.commit().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let st = child.wait().unwrap();
    let mut e = String::new();
    child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
    assert_eq!(st.code(), Some(0), "{e}");
    let mut ids: Vec<u32> = first
        .lines()
        .chain(rest.lines())
        .map(|l| l.parse().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, (1..=2500).collect::<Vec<_>>(), "every row once");

    let o = flowline(
        d.path(),
        &["sql(jobs.db, \"SELECT id FROM jobs\", nope) | sh(\"echo {}\")"],
        "",
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(
        err(&o).contains("sql: the query has no column `nope`"),
        "{}",
        err(&o)
    );
}

/// A database locked from before the run starts: the `sql` source waits (nothing out, the
/// run not ended) and, once the lock goes, every row comes out once.
#[test]
fn sql_source_started_under_a_lock_waits_for_it() {
    let d = tmp();
    let mut conn = jobs_db(d.path());
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    tx.execute("UPDATE jobs SET id = id WHERE id = 1", [])
        .unwrap();
    let mut child = sql_echo(d.path());
    let out = child.stdout.take().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut out = BufReader::new(out);
            let (mut all, mut line) = (String::new(), String::new());
            while out.read_line(&mut line).unwrap() > 0 {
                all.push_str(&line);
                line.clear();
                seen.fetch_add(1, Relaxed);
            }
            all
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended under the lock"
    );
    let under_lock = seen.load(Relaxed);
    assert_eq!(under_lock, 0, "{under_lock} rows out under the lock");
    tx.commit().unwrap();
    let all = reader.join().unwrap();
    let st = child.wait().unwrap();
    let mut e = String::new();
    child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
    assert_eq!(st.code(), Some(0), "{e}");
    let mut ids: Vec<u32> = all.lines().map(|l| l.parse().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (1..=2500).collect::<Vec<_>>(), "every row once");
}

/// A tiny HTTP/1.1 server with keep-alive: answers `200 <path>` once `healthy_after` has
/// passed since it started, `503` before; counts both.
struct Server {
    port: u16,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

fn server(healthy_after: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (ok2, failed2) = (ok.clone(), failed.clone());
    let start = Instant::now();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (ok, failed) = (ok2.clone(), failed2.clone());
            std::thread::spawn(move || serve(conn, start, healthy_after, &ok, &failed));
        }
    });
    Server { port, ok, failed }
}

fn serve(
    conn: TcpStream,
    start: Instant,
    healthy_after: Duration,
    ok: &AtomicU64,
    failed: &AtomicU64,
) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    while let Some(path) = common::read_request(&mut r) {
        let resp = if start.elapsed() >= healthy_after {
            ok.fetch_add(1, Relaxed);
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                path.len()
            )
        } else {
            failed.fetch_add(1, Relaxed);
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown".to_string()
        };
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn http_stage_with_a_connection_pool() {
    let d = tmp();
    let s = server(Duration::ZERO);
    let pipe = format!(
        "seq(1..200) | fork(8) | http(GET, \"http://127.0.0.1:{}/users/{{}}\")",
        s.port
    );
    let o = flowline(d.path(), &["--quiet", &pipe], "");
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let lines = sorted_lines(&out(&o));
    assert_eq!(lines.len(), 200);
    assert!(lines.contains(&"/users/17".to_string()));
    assert_eq!(s.ok.load(Relaxed), 200);
}

#[test]
fn breaker_pauses_the_input_against_a_failing_server() {
    let d = tmp();
    // Down for 1.5 s, then up. Without a breaker all 300 requests fail within that time;
    // with breaker(3, 500ms) the input pauses after 3 failures and only probes go out, and
    // the requests that failed are sent again once it is up: the outage costs no job.
    let s = server(Duration::from_millis(1500));
    let pipe = format!(
        "seq(1..300) | fork(4) | breaker(3, 500ms) | http(http://127.0.0.1:{}/{{}}) | discard",
        s.port
    );
    let o = flowline(d.path(), &["--quiet", &pipe], "");
    let failed = s.failed.load(Relaxed);
    assert!(
        failed <= 20,
        "503s sent while the breaker was open: {failed}"
    );
    assert!(failed >= 3, "the breaker opened on failures: {failed}");
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(s.ok.load(Relaxed), 300);
    let dead = std::fs::read_to_string(d.path().join("flowline-failed.jsonl")).unwrap_or_default();
    assert_eq!(dead.lines().count(), 0, "{dead}");
}

#[test]
fn parse_errors_show_position_and_caret() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &["seq(1..3) | fork(4) | sh(\"echo {}\" | print"],
        "",
    );
    assert_eq!(o.status.code(), Some(255));
    let e = err(&o);
    assert!(
        e.contains("expected `,` or `)` in the arguments of `sh`"),
        "{e}"
    );
    assert!(
        e.contains(
            "  seq(1..3) | fork(4) | sh(\"echo {}\" | print\n                                     ^"
        ),
        "{e}"
    );
    let o = flowline(d.path(), &["check", "seq(1..3) | rate(NaN/s) | sh(x)"], "");
    assert_eq!(o.status.code(), Some(255));
    let e = err(&o);
    assert!(e.contains("stage `rate`: rate `NaN/s`"), "{e}");
    assert!(e.contains("\n                   ^"), "{e}");
    let o = flowline(
        d.path(),
        &[
            "check",
            "seq(1..3) | fork(2) | sh(x) | branch | error:retry(3) success:print",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0));
    assert!(out(&o).starts_with("ok\n"));
}

#[test]
fn hostile_values_are_errors_not_panics() {
    let d = tmp();
    for pipe in [
        "seq(1..3) | timeout(1e999s) | sh(x)",
        "seq(1..3) | fork(99999999999999999999999) | sh(x)",
        "seq(1..3) | rate(1/0ms) | sh(x)",
        "seq(1..3) | retry(0) | sh(x)",
        "seq(-9223372036854775808..9223372036854775807, 9223372036854775807) | discard",
        "seq(1..3) | batch(1, inf) | sh(x)",
    ] {
        let o = flowline(d.path(), &["--quiet", pipe], "");
        let code = o.status.code();
        assert!(
            code == Some(255) || code == Some(0),
            "{pipe}: {code:?} {}",
            err(&o)
        );
        assert!(!err(&o).contains("panicked"), "{pipe}: {}", err(&o));
    }
}

#[test]
fn help_shows_recipes() {
    let o = Command::new(BIN).arg("--help").output().unwrap();
    let h = out(&o);
    assert!(h.contains("xargs -P8 -n1 gzip"), "{h}");
    assert!(h.contains("parallel --retry-failed"), "{h}");
}

#[test]
fn progress_lines_when_not_a_terminal() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &["--progress", "seq(1..50) | sh(\"sleep 0.03\") | discard"],
        "",
    );
    assert_eq!(o.status.code(), Some(0));
    let e = err(&o);
    assert!(e.contains("progress final"), "{e}");
    assert!(e.contains("total=50"), "{e}");
}

/// `lines | filter | print` over lines that are not UTF-8 gives what `grep` gives, byte
/// for byte; `reject` drops what it matches.
#[test]
fn filter_over_bytes_matches_grep() {
    let d = tmp();
    let mut text = Vec::new();
    for i in 0..20_000u32 {
        text.extend_from_slice(format!("{i}").as_bytes());
        if i % 7 == 0 {
            text.extend_from_slice(b"\xff\xfe");
        }
        text.push(b'\n');
    }
    text.extend_from_slice(b"no newline at the end 7");
    std::fs::write(d.path().join("in.bin"), &text).unwrap();
    let o = flowline(
        d.path(),
        &["--quiet", "lines(in.bin) | filter(\"7\") | print"],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let g = Command::new("grep")
        .args(["-a", "7", "in.bin"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(!g.stdout.is_empty());
    assert_eq!(o.stdout, g.stdout);
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "lines(in.bin) | filter(\"7\") | reject(\"^1\") | print",
        ],
        "",
    );
    let g = Command::new("sh")
        .args(["-c", "grep -a 7 in.bin | grep -av '^1'"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert_eq!(o.stdout, g.stdout);
}

/// `--load` / `--memfree`: jobs start while the machine has room; while it has none,
/// nothing starts (and nothing fails); bad values are named, all at once, exit 255.
#[test]
fn load_and_memfree_hold_job_starts() {
    let d = tmp();
    let o = flowline(
        d.path(),
        &[
            "--quiet",
            "--load",
            "10000",
            "--memfree",
            "1k",
            "echo",
            ":::",
            "a",
            "b",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(sorted_lines(&out(&o)), ["a", "b"]);

    // More free memory than any machine has: the job waits, it does not fail.
    let mut child = Command::new(BIN)
        .args([
            "--quiet",
            "--memfree",
            "900T",
            "touch",
            "started",
            ":::",
            "x",
        ])
        .current_dir(d.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "the run ended");
    assert!(
        !d.path().join("started").exists(),
        "a job started without room"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let o = flowline(
        d.path(),
        &["--load", "many", "--memfree", "3X", "echo", ":::", "a"],
        "",
    );
    assert_eq!(o.status.code(), Some(255));
    let e = err(&o);
    assert!(
        e.contains("--load `many`") && e.contains("--memfree `3X`"),
        "{e}"
    );
}
