//! `--queue`: one feeder and several worker processes (the real `flowline` binary) on a
//! real `redis-server` started on a free port: every input's result printed once, a
//! worker killed with SIGKILL or Redis dropping its connections losing nothing, failures
//! in the feeder's dead-letter file, and the argument errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flowline_redis::test_server::RedisServer;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_flowline");

/// A server of its own (`aof`: writes kept across a restart), a folder, and the URL of
/// the queue `name` on the server.
fn setup(aof: bool, name: &str) -> (RedisServer, tempfile::TempDir, String) {
    let server = RedisServer::start(aof);
    let q = format!("{}{name}", server.url());
    (server, tempfile::tempdir().unwrap(), q)
}

fn succeeded(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `flowline ARGS` in `dir`, reading nothing.
fn flowline(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).current_dir(dir).stdin(Stdio::null());
    c
}

/// A `flowline` process in `dir`, its output captured.
fn start(dir: &Path, args: &[&str]) -> Child {
    let mut c = flowline(dir, args);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().expect("flowline runs")
}

fn workers(dir: &Path, q: &str, pipe: &str, n: usize) -> Vec<Child> {
    workers_with(dir, q, &[], pipe, n)
}

/// `n` workers of `pipe`, with the options `opts` too.
fn workers_with(dir: &Path, q: &str, opts: &[&str], pipe: &str, n: usize) -> Vec<Child> {
    let mut args = vec!["--queue", q, "--worker", "--lease", "1s"];
    args.extend_from_slice(opts);
    args.push(pipe);
    (0..n).map(|_| start(dir, &args)).collect()
}

/// Waits for a process, killing it (and failing) after 60 s: a run that never ends is a
/// bug, not slowness.
fn finish(child: Child, what: &str) -> Output {
    let pid = child.id();
    let t = Instant::now();
    let waiter = std::thread::spawn(move || child.wait_with_output().expect("wait"));
    while !waiter.is_finished() {
        if t.elapsed() > Duration::from_secs(60) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{what} did not end within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    waiter.join().expect("waiter")
}

/// How often each line was printed.
fn counts(out: &[u8]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in String::from_utf8_lossy(out).lines() {
        *m.entry(l.to_string()).or_insert(0) += 1;
    }
    m
}

fn expect_each_once(out: &Output, n: u64, prefix: &str) {
    let c = counts(&out.stdout);
    for i in 1..=n {
        assert_eq!(
            c.get(&format!("{prefix}{i}")),
            Some(&1),
            "input {i} printed {:?} times; stderr: {}",
            c.get(&format!("{prefix}{i}")),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(c.values().sum::<usize>() as u64, n, "extra lines: {c:?}");
}

fn all_exit_0(ws: Vec<Child>) {
    for w in ws {
        let o = finish(w, "a worker");
        assert_eq!(
            o.status.code(),
            Some(0),
            "worker: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// A pipe over `seq(1..n)` whose jobs note their input in the file `effects` of `dir`
/// before they sleep and print `PREFIX-INPUT`; the file and the pipe.
fn noting_pipe(dir: &Path, n: u32, fork: u32, sleep: &str, prefix: &str) -> (PathBuf, String) {
    let effects = dir.join("effects");
    let pipe = format!(
        r#"seq(1..{n}) | fork({fork}) | sh("echo {{}} >> {}; sleep {sleep}; echo {prefix}-{{}}")"#,
        effects.display()
    );
    (effects, pipe)
}

/// How many lines `path` has (0 when it is not there).
fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Waits until `path` has `n` lines, failing after 20 s.
fn wait_for_lines(path: &Path, n: usize, what: &str) {
    let t = Instant::now();
    while lines_in(path) < n {
        assert!(t.elapsed() < Duration::from_secs(20), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn three_workers_print_every_input_once() {
    let (_server, dir, q) = setup(false, "three");
    let pipe = r#"seq(1..300) | fork(4) | sh("echo out-{}")"#;
    // Workers started before the feeder wait for it.
    let ws = workers(dir.path(), &q, pipe, 3);
    let out = finish(start(dir.path(), &["--queue", &q, pipe]), "the feeder");
    succeeded(&out);
    expect_each_once(&out, 300, "out-");
    all_exit_0(ws);
}

#[test]
fn parallel_syntax_and_keep_order_work_through_a_queue() {
    let (_server, dir, q) = setup(false, "compat");
    let ws: Vec<Child> = (0..2)
        .map(|_| {
            start(
                dir.path(),
                &["--queue", &q, "--worker", "-j4", "echo", "x{}"],
            )
        })
        .collect();
    let args: Vec<String> = (1..=20).rev().map(|i| i.to_string()).collect();
    let mut feeder = vec!["--queue", &q, "-k", "-j4", "echo", "x{}", ":::"];
    feeder.extend(args.iter().map(String::as_str));
    let out = finish(start(dir.path(), &feeder), "the feeder");
    succeeded(&out);
    let want: String = (1..=20).rev().map(|i| format!("x{i}\n")).collect();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        want,
        "-k: input order"
    );
    all_exit_0(ws);
}

#[test]
fn a_worker_killed_mid_run_loses_nothing() {
    let (_server, dir, q) = setup(false, "kill");
    let (effects, pipe) = noting_pipe(dir.path(), 300, 4, "0.05", "out");
    // One worker first, so that it holds jobs when it is killed.
    let mut first = workers(dir.path(), &q, &pipe, 1).remove(0);
    let mut feeder = start(dir.path(), &["--queue", &q, &pipe]);
    wait_for_lines(&effects, 8, "no job started");
    let others = workers(dir.path(), &q, &pipe, 2);
    first.kill().unwrap(); // SIGKILL, with jobs in flight
    assert!(
        feeder.try_wait().unwrap().is_none(),
        "the run ended before the kill"
    );
    let _ = first.wait();
    let out = finish(feeder, "the feeder");
    succeeded(&out);
    expect_each_once(&out, 300, "out-");
    // At least once: every input ran; some ran twice (those the killed worker held).
    let ran = counts(std::fs::read_to_string(&effects).unwrap().as_bytes());
    for i in 1..=300 {
        assert!(
            ran.get(&i.to_string()).is_some_and(|&n| n >= 1),
            "{i} never ran"
        );
    }
    assert!(
        ran.values().any(|&n| n >= 2),
        "no job of the killed worker ran again elsewhere"
    );
    all_exit_0(others);
}

/// The end of a run through a Redis outage (with `--dead-letter dead.jsonl`): the feeder
/// prints each of the `n` inputs once, the outage turned none into a failure, and the
/// workers exit 0.
fn outage_lost_and_failed_nothing(feeder: Child, dir: &Path, n: u64, ws: Vec<Child>) {
    let out = finish(feeder, "the feeder");
    succeeded(&out);
    expect_each_once(&out, n, "out-");
    assert!(
        !dir.join("dead.jsonl").exists(),
        "the outage turned inputs into failures"
    );
    all_exit_0(ws);
}

#[test]
fn redis_dropping_connections_and_restarting_loses_nothing() {
    // AOF with fsync on every write: a restarted server has every write it acknowledged.
    let (mut server, dir, q) = setup(true, "weather");
    let pipe = r#"seq(1..300) | fork(4) | sh("sleep 0.05; echo out-{}")"#;
    let ws = workers(dir.path(), &q, pipe, 3);
    let mut feeder = start(
        dir.path(),
        &["--queue", &q, "--dead-letter", "dead.jsonl", pipe],
    );
    let client = server.client();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        let mut c = client.get_connection().unwrap();
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query(&mut c)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    server.restart();
    assert!(
        feeder.try_wait().unwrap().is_none(),
        "the run ended before the restart"
    );
    outage_lost_and_failed_nothing(feeder, dir.path(), 300, ws);
}

#[test]
fn a_failing_job_ends_in_the_feeders_dead_letters_as_in_a_local_run() {
    let (_server, dir, q) = setup(false, "fail");
    let pipe = r#"args(1, 2, 3) | sh("if [ {} = 2 ]; then echo half; echo oops-{} >&2; exit 3; fi; echo warn-{} >&2; echo ok-{}")"#;
    let ws = workers(dir.path(), &q, pipe, 2);
    let out = finish(
        start(
            dir.path(),
            &["--queue", &q, "--dead-letter", "queue.jsonl", pipe],
        ),
        "the feeder",
    );
    let local = finish(
        start(dir.path(), &["--dead-letter", "local.jsonl", pipe]),
        "the local run",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.status.code(), local.status.code());
    let (a, b) = (counts(&out.stdout), counts(&local.stdout));
    assert_eq!(a, b, "the same output as a local run");
    let read = |f: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        serde_json::from_str(text.trim()).unwrap()
    };
    let (qd, ld) = (read("queue.jsonl"), read("local.jsonl"));
    for field in ["input", "seq", "stage", "exit", "stderr", "error"] {
        assert_eq!(qd[field], ld[field], "{field}: {qd} vs {ld}");
    }
    assert_eq!(qd["stderr"], "oops-2");
    // Every job's stderr comes back to the feeder's, as one block per job.
    let err = String::from_utf8_lossy(&out.stderr);
    for line in ["oops-2", "warn-1", "warn-3"] {
        assert!(err.lines().any(|l| l == line), "{line} not in: {err}");
    }
    all_exit_0(ws);
}

/// An input whose job kills its worker every time is delivered again and again until the
/// stream gives up on it: it then ends in the feeder's dead letters as a failure, the run
/// ends, and the other input is printed.
#[test]
fn an_input_that_kills_every_worker_ends_in_the_feeders_dead_letters() {
    let (_server, dir, q) = setup(false, "poison");
    let pipe =
        r#"args(ok, poison) | sh("if [ {} = poison ]; then kill -9 $PPID; sleep 5; fi; echo {}")"#;
    let feeder = start(
        dir.path(),
        &["--queue", &q, "--dead-letter", "queue.jsonl", pipe],
    );
    let pid = feeder.id();
    let waiter = std::thread::spawn(move || feeder.wait_with_output().expect("wait"));
    let t = Instant::now();
    let mut started = 0;
    // One worker after another, each killed by the poison input it takes.
    let bound = Duration::from_secs(60);
    let give_up = |why: &str| {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("{why}");
    };
    while !waiter.is_finished() {
        if t.elapsed() > bound || started >= 40 {
            give_up(&format!("the feeder did not end after {started} workers"));
        }
        let mut w = flowline(
            dir.path(),
            &["--queue", &q, "--worker", "--lease", "100ms", pipe],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker");
        started += 1;
        while w.try_wait().unwrap().is_none() && !waiter.is_finished() {
            if t.elapsed() > bound {
                let _ = w.kill();
                give_up("a worker lived on and the feeder did not end");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = w.kill();
        let _ = w.wait();
    }
    let out = waiter.join().expect("waiter");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(counts(&out.stdout).get("ok"), Some(&1));
    let dead = std::fs::read_to_string(dir.path().join("queue.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(
        dead.contains("poison") && dead.contains("gave up"),
        "{dead}"
    );
}

#[test]
fn queue_argument_errors_name_the_option_and_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| finish(start(dir.path(), args), "flowline");
    let pipe = r#"seq(1..3) | sh("echo {}")"#;
    std::fs::write(dir.path().join("rate.txt"), "5/s").unwrap();
    std::fs::write(dir.path().join("jobs.txt"), "2").unwrap();
    for (args, says) in [
        (
            vec!["--queue", "http://h/q", pipe],
            vec!["--queue `http://h/q`", "redis://HOST[:PORT]/NAME"],
        ),
        (
            vec!["--queue", "redis://h:6379", pipe],
            vec!["--queue `redis://h:6379`", "no queue NAME"],
        ),
        (
            vec!["--queue", "redis://h/a b", pipe],
            vec!["--queue `redis://h/a b`", "spaces"],
        ),
        (vec!["--worker", pipe], vec!["--worker needs --queue"]),
        (
            vec!["--queue", "redis://h/q", "--lease", "1s", pipe],
            vec!["--lease", "--worker"],
        ),
        (
            vec!["--queue", "redis://h/q", "--worker", "--lease", "1ms", pipe],
            vec!["--lease `1ms`"],
        ),
        (
            vec!["--queue", "redis://h/q", "--worker", "echo", ":::", "a"],
            vec!["--worker takes no inputs"],
        ),
        (
            vec!["--queue", "redis://h/q", "seq(1..3) | print"],
            vec!["no task"],
        ),
        (
            vec![
                "--queue",
                "redis://h/q",
                r#"seq(1..3) | sh("echo {}") | branch | error:print success:print"#,
            ],
            vec!["branch"],
        ),
        (
            vec![
                "--queue",
                "redis://h/q",
                r#"seq(1..3) | dedup | sh("echo {}")"#,
            ],
            vec!["dedup"],
        ),
        // Limits read from files are read again locally, never by a worker: refused.
        (
            vec![
                "--queue",
                "redis://h/q",
                r#"seq(1..3) | rate(rate.txt) | sh("echo {}")"#,
            ],
            vec!["`rate(rate.txt)`", "not supported with a queue"],
        ),
        (
            vec!["--queue", "redis://h/q", "--worker", "-j", "jobs.txt", pipe],
            vec!["-j `jobs.txt`", "not supported with --queue"],
        ),
        // Every problem at once.
        (
            vec!["--queue", "redis://h/", "--state", "s.db", "--worker", pipe],
            vec!["no queue NAME", "--state is not supported with --queue"],
        ),
    ] {
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(255), "{args:?}: {err}");
        for s in says {
            assert!(err.contains(s), "{args:?}: `{s}` not in: {err}");
        }
        assert!(o.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn a_feeder_killed_and_run_again_resumes_without_losing_inputs() {
    let (_server, dir, q) = setup(false, "resume");
    let pipe = r#"seq(1..200) | fork(2) | sh("sleep 0.02; echo out-{}")"#;
    let ws = workers(dir.path(), &q, pipe, 2);
    let out1 = dir.path().join("out1");
    let mut first = flowline(dir.path(), &["--queue", &q, pipe])
        .stdout(std::fs::File::create(&out1).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::fs::read_to_string(&out1).map_or(0, |s| s.lines().count()) < 30 {
        assert!(t.elapsed() < Duration::from_secs(20), "nothing printed");
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill().unwrap(); // SIGKILL
    assert!(first.wait().unwrap().code().is_none());
    let printed_before = counts(&std::fs::read(&out1).unwrap());
    assert!(printed_before.len() < 200, "the first feeder had finished");
    let second = finish(start(dir.path(), &["--queue", &q, pipe]), "the rerun");
    succeeded(&second);
    assert!(String::from_utf8_lossy(&second.stderr).contains("resuming queue"));
    let again = counts(&second.stdout);
    for i in 1..=200 {
        let line = format!("out-{i}");
        let n = printed_before.get(&line).unwrap_or(&0) + again.get(&line).unwrap_or(&0);
        assert!(n >= 1, "{line} was never printed");
    }
    // What the first feeder wrote out and marked ended is not printed again; at most the
    // batch it was writing when killed is.
    let twice = (1..=200)
        .filter(|i| {
            let l = format!("out-{i}");
            printed_before.contains_key(&l) && again.contains_key(&l)
        })
        .count();
    assert!(
        twice < printed_before.len(),
        "the rerun printed everything again"
    );
    all_exit_0(ws);
}

#[test]
fn inflight_is_shared_by_every_worker() {
    let (_server, dir, q) = setup(false, "inflight");
    std::fs::create_dir(dir.path().join("running")).unwrap();
    // A job counts the jobs running when it starts: with at most 2 in flight across all
    // workers, never more than 1 other (up to 5 if each of the 3 workers had its own bound).
    let pipe = r#"seq(1..30) | fork(4) | inflight(2) | sh("ls running | wc -l >> seen; touch running/{}; sleep 0.1; rm running/{}; echo out-{}")"#;
    let ws = workers(dir.path(), &q, pipe, 3);
    let out = finish(start(dir.path(), &["--queue", &q, pipe]), "the feeder");
    succeeded(&out);
    expect_each_once(&out, 30, "out-");
    let seen = std::fs::read_to_string(dir.path().join("seen")).unwrap();
    let most: usize = seen
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .unwrap();
    assert!(
        most <= 1,
        "{most} other jobs were running: inflight(2) not shared"
    );
    all_exit_0(ws);
}

#[test]
fn rate_is_shared_by_every_worker() {
    let (_server, dir, q) = setup(false, "rate");
    let pipe = r#"seq(1..30) | fork(4) | rate(20/s) | sh("echo out-{}")"#;
    let ws = workers(dir.path(), &q, pipe, 3);
    let t = Instant::now();
    let out = finish(start(dir.path(), &["--queue", &q, pipe]), "the feeder");
    let took = t.elapsed();
    succeeded(&out);
    expect_each_once(&out, 30, "out-");
    // 30 calls at 20/s for all the workers together take at least 29 intervals of 50 ms
    // (three rates of their own, a third of it).
    assert!(
        took >= Duration::from_millis(1450),
        "{took:?}: rate not shared"
    );
    all_exit_0(ws);
}

#[test]
fn filters_and_the_feeders_sink_give_what_a_local_run_gives() {
    let (_server, dir, q) = setup(false, "sinks");
    let pipe = r#"seq(1..40) | fork(4) | sh("echo n{}") | reject("7$") | jsonl(out.jsonl)"#;
    let ws = workers(dir.path(), &q, pipe, 2);
    succeeded(&finish(
        start(dir.path(), &["--queue", &q, pipe]),
        "the feeder",
    ));
    let queued = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    std::fs::remove_file(dir.path().join("out.jsonl")).unwrap();
    succeeded(&finish(start(dir.path(), &[pipe]), "the local run"));
    let local = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    let records = |text: &str| {
        let mut v: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        v.sort_by_key(|r| r["seq"].as_u64());
        v
    };
    let (a, b) = (records(&queued), records(&local));
    assert_eq!(a.len(), 36, "{queued}");
    assert_eq!(a, b);
    all_exit_0(ws);
}

/// `kill -STOP` / `kill -CONT` on a process.
fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// Whether some input was noted twice in `effects` (its job ran twice).
fn ran_twice(effects: &Path) -> bool {
    let text = std::fs::read_to_string(effects).unwrap_or_default();
    counts(text.as_bytes()).values().any(|&n| n >= 2)
}

/// A worker stopped (SIGSTOP) with jobs in flight: its leases run out and the other
/// workers take its inputs over; once it runs again (SIGCONT) it writes the results of
/// the jobs it held, which the feeder has already written out from the others: each
/// input is still printed exactly once, and the resumed worker ends with the run.
#[test]
fn a_worker_stopped_mid_run_and_resumed_duplicates_no_output() {
    let (_server, dir, q) = setup(false, "stopped");
    let (effects, pipe) = noting_pipe(dir.path(), 300, 3, "0.1", "out");
    let first = workers(dir.path(), &q, &pipe, 1).remove(0);
    let mut feeder = start(dir.path(), &["--queue", &q, &pipe]);
    wait_for_lines(&effects, 6, "no job started");
    signal(first.id(), "-STOP");
    let held = lines_in(&effects);
    let others = workers(dir.path(), &q, &pipe, 2);
    wait_for_lines(&effects, held + 30, "the other workers took nothing over");
    // Past the lease (1 s): the others take the stopped worker's inputs over, and run one
    // of them a second time.
    let t = Instant::now();
    while !ran_twice(&effects) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the other workers took nothing of the stopped one's over"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        feeder.try_wait().unwrap().is_none(),
        "the run ended while the worker was stopped: nothing left to duplicate"
    );
    signal(first.id(), "-CONT");
    let out = finish(feeder, "the feeder");
    succeeded(&out);
    expect_each_once(&out, 300, "out-");
    assert!(
        ran_twice(&effects),
        "no input of the stopped worker ran again elsewhere"
    );
    let mut ws = others;
    ws.push(first);
    all_exit_0(ws);
}

/// Redis down when the feeder and a worker start: both wait for it (under the outage
/// policy) and, once it is up, run every input; none is turned into a failure.
#[test]
fn redis_down_when_the_feeder_and_a_worker_start_is_waited_for() {
    let (mut server, dir, q) = setup(false, "late");
    server.kill();
    let pipe = r#"seq(1..50) | fork(4) | sh("echo out-{}")"#;
    let mut ws = workers(dir.path(), &q, pipe, 1);
    let mut feeder = start(
        dir.path(),
        &["--queue", &q, "--dead-letter", "dead.jsonl", pipe],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        feeder.try_wait().unwrap().is_none(),
        "the feeder gave up while Redis was down"
    );
    assert!(
        ws[0].try_wait().unwrap().is_none(),
        "the worker gave up while Redis was down"
    );
    server.restart();
    outage_lost_and_failed_nothing(feeder, dir.path(), 50, ws);
}

/// Redis frozen (SIGSTOP: connections open, nothing answered) for longer than the
/// workers' lease while jobs run: the feeder and the workers wait for it, and once it
/// answers again every input is printed once and none is turned into a failure.
#[test]
fn redis_frozen_mid_run_loses_nothing_and_fails_nothing() {
    let (server, dir, q) = setup(false, "frozen");
    let (effects, pipe) = noting_pipe(dir.path(), 200, 4, "0.05", "out");
    let ws = workers(dir.path(), &q, &pipe, 2);
    let mut feeder = start(
        dir.path(),
        &["--queue", &q, "--dead-letter", "dead.jsonl", &pipe],
    );
    wait_for_lines(&effects, 20, "no job started");
    server.freeze();
    std::thread::sleep(Duration::from_secs(3));
    let frozen_at = lines_in(&effects);
    server.thaw();
    assert!(
        feeder.try_wait().unwrap().is_none(),
        "the feeder ended while Redis was frozen"
    );
    assert!(frozen_at < 200, "the run ended while Redis was frozen");
    outage_lost_and_failed_nothing(feeder, dir.path(), 200, ws);
}

/// A worker started just after a run finished (its keys still there for a minute) waits
/// for the next run instead of ending with the old one, and runs it.
#[test]
fn a_worker_started_after_a_run_finished_waits_for_the_next_run() {
    let (_server, dir, q) = setup(false, "next");
    let pipe = r#"seq(1..20) | fork(2) | sh("echo out-{}")"#;
    let ws = workers(dir.path(), &q, pipe, 1);
    let out = finish(start(dir.path(), &["--queue", &q, pipe]), "the first run");
    succeeded(&out);
    all_exit_0(ws);
    let mut late = workers(dir.path(), &q, pipe, 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        late[0].try_wait().unwrap().is_none(),
        "the worker ended with the finished run"
    );
    let out = finish(start(dir.path(), &["--queue", &q, pipe]), "the next run");
    succeeded(&out);
    expect_each_once(&out, 20, "out-");
    all_exit_0(std::mem::take(&mut late));
}

/// A worker of an old run, stopped (SIGSTOP) while it held jobs and resumed once a new run
/// of another pipe has started on the same NAME, mixes nothing into the new run: its late
/// results go to the old run's keys, it runs none of the new run's inputs, and it ends.
#[test]
fn a_late_worker_of_an_old_run_does_not_mix_with_the_new_run() {
    let (_server, dir, q) = setup(false, "mix");
    let (effects, old) = noting_pipe(dir.path(), 40, 2, "0.2", "old");
    let new_dir = dir.path().join("new");
    std::fs::create_dir(&new_dir).unwrap();
    let (new_effects, new) = noting_pipe(&new_dir, 40, 2, "0.1", "new");
    let stale = workers(dir.path(), &q, &old, 1).remove(0);
    let feeder = start(dir.path(), &["--queue", &q, &old]);
    wait_for_lines(&effects, 2, "no job started");
    signal(stale.id(), "-STOP");
    let others = workers(dir.path(), &q, &old, 2);
    let out = finish(feeder, "the old run");
    succeeded(&out);
    expect_each_once(&out, 40, "old-");
    all_exit_0(others);
    let ws = workers(dir.path(), &q, &new, 1);
    let feeder = start(dir.path(), &["--queue", &q, &new]);
    // The new run has taken the NAME (its jobs run) before the stale worker goes on.
    wait_for_lines(&new_effects, 1, "the new run started no job");
    signal(stale.id(), "-CONT");
    let out = finish(feeder, "the new run");
    succeeded(&out);
    expect_each_once(&out, 40, "new-");
    assert_eq!(lines_in(&new_effects), 40, "a new input ran twice");
    let mut ws = ws;
    ws.push(stale);
    all_exit_0(ws);
}

/// A feeder killed after its source ended, rerun on a source that gives more inputs (and
/// gives them late): the rerun ends only once its own source has ended and every input,
/// the new ones too, has been printed; what the first feeder knew of its total does not
/// end the rerun early.
#[test]
fn a_rerun_whose_source_gives_more_inputs_waits_for_them() {
    let (_server, dir, q) = setup(false, "grown");
    let first: String = (1..=20).map(|i| format!("{i}\n")).collect();
    let more: String = (21..=30).map(|i| format!("{i}\n")).collect();
    std::fs::write(dir.path().join("first"), &first).unwrap();
    std::fs::write(dir.path().join("more"), &more).unwrap();
    let pipe = r#"sh("echo out-{}")"#;
    // No worker yet: the first feeder feeds every input, sees its source end and waits.
    let mut feeder = flowline(dir.path(), &["--queue", &q, pipe])
        .stdin(std::fs::File::open(dir.path().join("first")).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    feeder.kill().unwrap(); // SIGKILL
    let _ = feeder.wait();
    let ws = workers(dir.path(), &q, pipe, 1);
    let script = format!("(cat first; sleep 2; cat more) | {BIN} --queue '{q}' '{pipe}'");
    let rerun = Command::new("sh")
        .args(["-c", &script])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(rerun, "the rerun");
    succeeded(&out);
    expect_each_once(&out, 30, "out-");
    all_exit_0(ws);
}

/// SIGUSR1, as in a local run: a worker lists its running jobs on stderr and goes on, and
/// the feeder (which runs no job) goes on too; neither is ended by the signal.
#[test]
fn sigusr1_lists_a_workers_running_jobs_and_ends_no_process() {
    let (_server, dir, q) = setup(false, "usr1");
    let (effects, pipe) = noting_pipe(dir.path(), 6, 2, "1", "out");
    let ws = workers(dir.path(), &q, &pipe, 1);
    let feeder = start(dir.path(), &["--queue", &q, &pipe]);
    wait_for_lines(&effects, 2, "no job started");
    signal(ws[0].id(), "-USR1");
    signal(feeder.id(), "-USR1");
    let out = finish(feeder, "the feeder");
    succeeded(&out);
    expect_each_once(&out, 6, "out-");
    let w = finish(ws.into_iter().next().unwrap(), "the worker");
    let err = String::from_utf8_lossy(&w.stderr);
    assert_eq!(w.status.code(), Some(0), "{err}");
    // Each listed as it ran: its command with the input put in.
    let listed: Vec<&str> = err.lines().filter(|l| l.contains("; sleep 1;")).collect();
    assert!((1..=2).contains(&listed.len()), "{err}");
    for l in listed {
        let n: u32 = l
            .rsplit_once("out-")
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or_else(|| panic!("{l}"));
        let job = format!("echo {n} >> {}; sleep 1; echo out-{n}", effects.display());
        assert_eq!(l, format!("flowline: {job}"));
    }
}

/// `key({1})` through a queue: the feeder holds an input back while an earlier one of its
/// key is out, so a key's jobs run one at a time and in input order across all workers,
/// and other keys' jobs run meanwhile, on several workers.
#[test]
fn per_key_order_holds_across_workers() {
    use common::keyed::{JOB, inputs, outputs_in_key_order, overlaps};
    let (_server, dir, q) = setup(false, "keyed");
    std::fs::write(dir.path().join("events.tsv"), inputs(5, 12, 11)).unwrap();
    let pipe =
        format!(r#"lines(events.tsv) | fork(4) | key({{1}}) | sh("echo $PPID >> ran; {JOB}")"#);
    let ws = workers_with(dir.path(), &q, &["--colsep", "\t"], &pipe, 3);
    let out = finish(
        start(dir.path(), &["--queue", &q, "--colsep", "\t", &pipe]),
        "the feeder",
    );
    succeeded(&out);
    outputs_in_key_order(&String::from_utf8_lossy(&out.stdout), 5, 12);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("waited for their key"), "{stderr}");
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    let (most, most_total) = overlaps(&log, 1);
    assert!(most.values().all(|&m| m == 1), "{most:?}");
    assert!(most_total > 1, "never two jobs at once");
    let ran = counts(&std::fs::read(dir.path().join("ran")).unwrap());
    assert!(ran.len() >= 2, "the jobs ran on one worker only: {ran:?}");
    assert_eq!(ran.values().sum::<usize>(), 60, "a job ran twice");
    all_exit_0(ws);
}

/// A keyed feeder killed while it holds inputs back for a slow key, and run again: the
/// rerun feeds the inputs held (Redis keeps which), behind the key's input still out, and
/// every input runs once, each key's in order.
#[test]
fn a_keyed_feeder_killed_and_run_again_feeds_what_it_held() {
    use common::keyed::{JOB, overlaps};
    let (_server, dir, q) = setup(false, "keyed-resume");
    let mut events = String::new();
    for i in 1..=6 {
        events.push_str(&format!("a\t{i}\t0.2\n"));
        for k in ["b", "c", "d"] {
            events.push_str(&format!("{k}\t{i}\t0.01\n"));
        }
    }
    std::fs::write(dir.path().join("events.tsv"), events).unwrap();
    let pipe = format!(r#"lines(events.tsv) | fork(4) | key({{1}}) | sh("{JOB}")"#);
    let args = ["--queue", &q, "--colsep", "\t", &pipe];
    let ws = workers_with(dir.path(), &q, &["--colsep", "\t"], &pipe, 2);
    let out1 = dir.path().join("out1");
    let mut first = flowline(dir.path(), &args)
        .stdout(std::fs::File::create(&out1).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_lines(&out1, 10, "nothing printed");
    first.kill().unwrap(); // SIGKILL
    let _ = first.wait();
    let printed_before = std::fs::read_to_string(&out1).unwrap();
    assert!(
        !printed_before.contains("a 6"),
        "the first feeder held nothing"
    );
    let second = finish(start(dir.path(), &args), "the rerun");
    succeeded(&second);
    assert!(String::from_utf8_lossy(&second.stderr).contains("resuming queue"));
    let printed = format!(
        "{printed_before}{}",
        String::from_utf8_lossy(&second.stdout)
    );
    for k in ["a", "b", "c", "d"] {
        for i in 1..=6 {
            assert!(
                printed.contains(&format!("{k} {i}\n")),
                "{k} {i} never printed"
            );
        }
    }
    // Every job started once, each key's in input order, one at a time.
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(log.lines().filter(|l| l.starts_with("start")).count(), 24);
    let (most, _) = overlaps(&log, 1);
    assert!(most.values().all(|&m| m == 1), "{most:?}");
    all_exit_0(ws);
}
