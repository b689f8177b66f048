//! End to end: `key(TEMPLATE[, PER_KEY])` and `--key`, in order per key and concurrent
//! across keys, with real processes that log when they start and end.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::keyed::{JOB, inputs, outputs_in_key_order, overlaps};
use common::{flowline, start};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `JOB` run over `input` in a folder of its own, the columns split at tabs: `opts`, then
/// `last` (a pipe, or the command). It must succeed; its output and its jobs' log.
fn run_jobs(opts: &[&str], last: &str, input: &str) -> (Output, String) {
    let d = tempfile::tempdir().unwrap();
    let mut args = vec!["--quiet", "--colsep", "\t"];
    args.extend_from_slice(opts);
    args.push(last);
    let o = flowline(d.path(), &args, input);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let log = std::fs::read_to_string(d.path().join("log")).unwrap();
    (o, log)
}

/// `JOB` as a task of 8 workers with the policy `key`.
fn keyed(key: &str) -> String {
    format!("fork(8) | {key} | sh(\"{JOB}\")")
}

/// One run over `KEYS x PER` inputs; asserts order and the bound per key; the most jobs
/// at once over all keys.
fn keyed_run(opts: &[&str], last: &str, per_key: usize, seed: u64) -> usize {
    const KEYS: u32 = 6;
    const PER: u32 = 15;
    let (o, log) = run_jobs(opts, last, &inputs(KEYS, PER, seed));
    outputs_in_key_order(&text(&o.stdout), KEYS, PER);
    let (most, most_total) = overlaps(&log, per_key);
    for (k, m) in &most {
        assert!(
            *m <= per_key,
            "key {k}: {m} jobs at once, per_key {per_key}"
        );
    }
    assert!(most_total <= 8, "{most_total} jobs at once, fork(8)");
    most_total
}

#[test]
fn each_keys_jobs_run_one_at_a_time_in_input_order_and_keys_run_side_by_side() {
    let mut most = 0;
    for seed in [7, 1234] {
        most = most.max(keyed_run(&[], &keyed("key({1})"), 1, seed));
    }
    // Across keys the jobs did run at once: a run one job at a time passes no key test.
    assert!(most > 1, "never more than one job at a time");
}

#[test]
fn the_key_option_keys_a_command_as_the_stage_does() {
    let most = keyed_run(&["--key", "{1}", "-j", "8"], JOB, 1, 99);
    assert!(most > 1, "never more than one job at a time");
}

#[test]
fn per_key_two_runs_two_of_a_key_at_once_and_keeps_their_output_in_order() {
    let mut most = BTreeMap::new();
    for seed in [3, 77] {
        let (o, log) = run_jobs(&[], &keyed("key({1}, 2)"), &inputs(2, 20, seed));
        outputs_in_key_order(&text(&o.stdout), 2, 20);
        for (k, m) in overlaps(&log, 2).0 {
            assert!(m <= 2, "key {k}: {m} jobs at once");
            let e = most.entry(k).or_insert(0);
            *e = m.max(*e);
        }
    }
    assert!(most.values().any(|&m| m == 2), "never two of a key at once");
}

/// A key's second job ends long before its first: the output still has the first one
/// first (unordered output keeps a key's order), while other keys go out as they end.
#[test]
fn a_keys_later_job_that_ends_first_waits_for_the_earlier_one_in_the_output() {
    let (o, log) = run_jobs(
        &[],
        &keyed("key({1}, 2)"),
        "a\t1\t0.5\na\t2\t0.01\nb\t1\t0.01\n",
    );
    let ends: Vec<&str> = log.lines().filter(|l| l.starts_with("end a")).collect();
    assert_eq!(ends, ["end a 2", "end a 1"], "the jobs ran side by side");
    let out = text(&o.stdout);
    let a: Vec<&str> = out.lines().filter(|l| l.starts_with('a')).collect();
    assert_eq!(a, ["a 1", "a 2"]);
    assert_eq!(out.lines().next(), Some("b 1"), "{out}");
}

#[test]
fn keep_order_with_a_key_writes_in_input_order() {
    let input = inputs(4, 10, 5);
    let (o, _) = run_jobs(&["-k"], &keyed("key({1})"), &input);
    let want: Vec<String> = input
        .lines()
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            format!("{} {}", c[0], c[1])
        })
        .collect();
    assert_eq!(text(&o.stdout).lines().collect::<Vec<_>>(), want);
}

/// Lines of a child's stdout as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The slow key's first job runs until the test lets it end: every other key's jobs
/// finish meanwhile, and the slow key's later jobs start only after it.
#[test]
fn a_slow_key_holds_back_only_its_own_jobs() {
    let d = tempfile::tempdir().unwrap();
    let mut input = String::from("slow\t1\n");
    for i in 1..=10 {
        input.push_str(&format!("a\t{i}\nb\t{i}\n"));
        if i % 4 == 0 {
            input.push_str(&format!("slow\t{}\n", i / 4 + 1));
        }
    }
    // The slow job waits for `release` (at most 20 s, never forever).
    let job = "echo start {1} {2} >> log; \
               if [ {1} = slow ] && [ {2} = 1 ]; then \
                 i=0; while [ ! -e release ] && [ $i -lt 2000 ]; do sleep 0.01; i=$((i+1)); done; \
               fi; echo end {1} {2} >> log; echo {1} {2}";
    let pipe = format!("fork(4) | key({{1}}) | sh(\"{job}\")");
    let mut child = start(d.path(), &["--colsep", "\t", &pipe], &input);
    let rx = lines_of(&mut child);
    let mut fast = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while fast.len() < 20 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                assert!(!line.starts_with("slow"), "{line} before the release");
                fast.push(line);
            }
            Err(e) => panic!("the fast keys did not finish: {e}; got {fast:?}"),
        }
    }
    let log = std::fs::read_to_string(d.path().join("log")).unwrap();
    assert!(log.contains("start slow 1\n"), "{log}");
    assert!(!log.contains("start slow 2"), "{log}");
    std::fs::write(d.path().join("release"), "").unwrap();
    let rest: Vec<String> = rx.iter().collect();
    assert_eq!(rest, ["slow 1", "slow 2", "slow 3"]);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let stderr = text(&o.stderr);
    // slow 2 and slow 3 waited behind slow 1; some fast ones behind their key too.
    assert!(stderr.contains("waited for their key in sh"), "{stderr}");
}

#[test]
fn bad_keys_are_all_reported_with_the_option_and_value() {
    let d = tempfile::tempdir().unwrap();
    let o = flowline(
        d.path(),
        &[
            "--key",
            "",
            "-j",
            "x",
            "seq(3) | key({1}, 0) | sh(\"echo {}\")",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(255));
    let e = text(&o.stderr);
    for needle in [
        "--key `` is empty",
        "--jobs `x`",
        "stage `key`: per_key `0` must be from 1 to 65536",
    ] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
    for (args, needle) in [
        (
            &["seq(3) | key() | sh(x)"][..],
            "`key` takes 1 to 2 arguments, got 0",
        ),
        (
            &["seq(3) | key({1}, many) | sh(x)"],
            "per_key `many` is not a whole number",
        ),
        (&["seq(3) | key({1}) | print"], "`key` has no task"),
        (
            &["--key", "{1}", "seq(3) | filter(x)"],
            "--key `{1}`: the pipe has no task",
        ),
        (&["--key", "{%}", "echo"], "--key `{%}` uses `{%}`"),
        (
            &[
                "--queue",
                "redis://127.0.0.1:1/q",
                "seq(3) | key({1}, 2) | sh(x)",
            ],
            "`key({1}, 2)`: with a queue one input of a key runs at a time",
        ),
        (
            &[
                "--queue",
                "redis://127.0.0.1:1/q",
                "seq(3) | sh(a) | key({1}) | sh(x)",
            ],
            "`key({1})` on `sh-2`, not the first stage after the source",
        ),
    ] {
        let o = flowline(d.path(), args, "");
        assert_eq!(o.status.code(), Some(255), "{args:?}");
        let e = text(&o.stderr);
        assert!(e.contains(needle), "{args:?}: {e}");
    }
}

/// Polls `cond` until it holds, at most 20 s.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Inputs waiting for a busy key are bounded (4 × the jobs, at least 1024): while the one
/// key's first job runs, the source is read that far and no further, not to its end. A
/// stop then leaves the waiting inputs unfinished, and the run ends.
#[test]
fn inputs_waiting_for_a_busy_key_hold_the_source_back() {
    let d = tempfile::tempdir().unwrap();
    let job = "echo start {} >> log; if [ {} = 1 ]; then \
               i=0; while [ ! -e release ] && [ $i -lt 2000 ]; do sleep 0.01; i=$((i+1)); done; \
               fi";
    let pipe = format!("seq(1..1000000) | fork(4) | key(one) | sh(\"{job}\") | discard");
    let child = start(d.path(), &[&pipe], "");
    let log = d.path().join("log");
    wait_for("the first job", || log.exists());
    // Time for a source without a bound to run far past it.
    std::thread::sleep(Duration::from_millis(300));
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(d.path().join("release"), "").unwrap();
    let o = child.wait_with_output().unwrap();
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{stderr}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start 1\n");
    let read: u64 = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("flowline: ")?
                .split_once(" inputs")?
                .0
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no summary: {stderr}"));
    assert!((2..=2048).contains(&read), "{read} inputs read: {stderr}");
}

/// An HTTP server for `GET /KEY/SEQ/SECONDS`: each request notes `start KEY SEQ` in the
/// log, sleeps its time, notes `end KEY SEQ` and answers `KEY SEQ` (a thread per
/// connection, keep-alive).
fn logging_server() -> (u16, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log: Arc<Mutex<String>> = Arc::default();
    let l = log.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let log = l.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                while let Some(path) = common::read_request(&mut r) {
                    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                    let [key, seq, secs] = parts[..] else {
                        panic!("request {path:?}")
                    };
                    log.lock()
                        .unwrap()
                        .push_str(&format!("start {key} {seq}\n"));
                    let secs: f64 = secs.parse().unwrap_or_else(|e| panic!("{path:?}: {e}"));
                    std::thread::sleep(Duration::from_secs_f64(secs));
                    log.lock().unwrap().push_str(&format!("end {key} {seq}\n"));
                    let answer = format!("{key} {seq}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, log)
}

#[test]
fn an_http_stage_keeps_each_keys_requests_in_order_one_at_a_time() {
    const KEYS: u32 = 5;
    const PER: u32 = 16;
    let (port, log) = logging_server();
    let d = tempfile::tempdir().unwrap();
    let pipe = format!("fork(8) | key({{1}}) | http(http://127.0.0.1:{port}/{{1}}/{{2}}/{{3}})");
    let o = flowline(
        d.path(),
        &["--quiet", "--colsep", "\t", &pipe],
        &inputs(KEYS, PER, 42),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    outputs_in_key_order(&text(&o.stdout), KEYS, PER);
    let log = log.lock().unwrap().clone();
    let (most, most_total) = overlaps(&log, 1);
    assert!(most.values().all(|m| *m == 1), "{most:?}");
    assert!(most_total > 1, "the keys' requests never ran side by side");
    assert!(most_total <= 8, "{most_total} requests at once, fork(8)");
}
