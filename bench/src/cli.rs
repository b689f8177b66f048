//! The `flowline` command against the tools people use for the same jobs: `xargs -P`,
//! GNU parallel, `xargs -P16 curl`. Runs the release binary as a child process, like a
//! user would.
//!
//! - `cli_jobs`: 2,000 `true` jobs, 4 at a time (ratio against `xargs -P4`; GNU parallel
//!   in the field `parallel`; `floor`: the same processes spawned and awaited by 4 bare
//!   threads, the cost no runner avoids).
//! - `cli_http`: 20,000 GETs against a local server started here (ratio against
//!   `xargs -P16 curl`).
//! - `cli_rate`: 1,000 jobs at `rate(100/s)`: the rate kept (`error_pct`) and the most job
//!   starts in any sliding second (`max_in_period`), from the joblog.
//! - `cli_floor`: the same 2,000 jobs, the whole `flowline` command against 4 bare threads
//!   that spawn each job with its stdout and stderr captured through pipes, as any runner
//!   that shows a job's output must (the floor of `cli_jobs`, made fair).
//! - `cli_filter`: `lines | filter(regex) | print` over 2,000,000 lines against `grep`,
//!   with flowline's peak RSS (`/usr/bin/time`).
//! - `cli_queue`: 2,000 `sleep 0.01` jobs through `--queue` on a `redis-server` started
//!   here, `fork(4)` per worker: the throughput of 3 worker processes (`flowline`, jobs/s)
//!   against 1 (`baseline`); higher is better. `lost`: inputs the feeder never got a
//!   result for. `floor_ratio`: the same jobs spawned by bare threads, 12 at a time
//!   against 4 — the most any queue of 3 × 4 slots can gain over 1 × 4 on this machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::util::{alternate, emit};

pub fn run(case: Option<&str>) {
    let bin = flowline_binary();
    let want = |c: &str| case.is_none_or(|x| c.starts_with(x));
    // Every case but cli_queue compares with GNU parallel.
    if [
        "cli_jobs",
        "cli_http",
        "cli_rate",
        "cli_floor",
        "cli_filter",
    ]
    .into_iter()
    .any(want)
    {
        ensure_parallel();
    }
    if want("cli_jobs") {
        jobs(&bin);
    }
    if want("cli_http") {
        http(&bin);
    }
    if want("cli_rate") {
        rate(&bin);
    }
    if want("cli_floor") {
        floor(&bin);
    }
    if want("cli_filter") {
        filter(&bin);
    }
    if want("cli_queue") {
        queue(&bin);
    }
}

/// `cli_queue`: 3 workers against 1 on one Redis, each run a queue of its own.
fn queue(bin: &Path) {
    const N: u32 = 2000;
    let server = flowline_redis::test_server::RedisServer::start(false);
    let pipe = format!("seq(1..{N}) | fork(4) | sh(\"sleep 0.01\")");
    let (run, lost) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let one = |workers: usize| {
        run.set(run.get() + 1);
        let name = format!("bench{}", run.get());
        let (d, l) = queue_run(bin, &server, &name, &pipe, workers, N);
        lost.set(lost.get() + l);
        d
    };
    let (three, single) = alternate(3, || one(3), || one(1));
    // The floor: the same jobs spawned by bare threads (output through pipes), 12 at a
    // time against 4. On two cores, 12 slots of `sleep 0.01` are bound by the cost of
    // starting the processes, not by the sleeps: the best ratio any queue can reach here.
    let (floor12, floor4) = alternate(3, || spawn_sleeps(N, 12), || spawn_sleeps(N, 4));
    let per_s = |d: Duration| f64::from(N) / d.as_secs_f64();
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    emit(
        "cli",
        "cli_queue",
        per_s(three),
        per_s(single),
        "jobs/s",
        json!({
            "jobs": N,
            "fork_per_worker": 4,
            "workers": 3,
            "baseline_tool": "the same queue with 1 worker process",
            "higher_is_better": true,
            "goal": ">= 2.5",
            "lost": lost.get(),
            "lost_goal": 0,
            "floor_12_slots_jobs_per_s": round(per_s(floor12)),
            "floor_4_slots_jobs_per_s": round(per_s(floor4)),
            "floor_ratio": round(floor4.as_secs_f64() / floor12.as_secs_f64()),
        }),
    );
}

/// `n` `sleep 0.01` processes, `slots` at a time, each slot a thread that spawns one with
/// its stdout and stderr on pipes and reads both to their end.
fn spawn_sleeps(n: u32, slots: u32) -> Duration {
    let t = Instant::now();
    let next = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|s| {
        for _ in 0..slots {
            s.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let out = Command::new("sleep")
                        .arg("0.01")
                        .stdin(Stdio::null())
                        .output()
                        .expect("sleep runs");
                    assert!(out.status.success());
                }
            });
        }
    });
    t.elapsed()
}

/// One run of a queue: `workers` worker processes started (and waiting) first, then the
/// feeder; the time from the feeder's start to its end, and how many inputs it did not
/// mark ended (read from Redis before the finished run's keys expire).
fn queue_run(
    bin: &Path,
    server: &flowline_redis::test_server::RedisServer,
    name: &str,
    pipe: &str,
    workers: usize,
    n: u32,
) -> (Duration, u64) {
    let q = format!("{}{name}", server.url());
    let mut ws: Vec<_> = (0..workers)
        .map(|_| {
            Command::new(bin)
                .args(["--quiet", "--queue", &q, "--worker", pipe])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("a worker starts")
        })
        .collect();
    // The workers connect and wait in the group before the clock starts.
    std::thread::sleep(Duration::from_millis(300));
    let d = flowline(bin, &["--queue", &q, pipe]);
    for w in &mut ws {
        let st = w.wait().expect("a worker ends");
        assert!(st.success(), "a worker failed: {st}");
    }
    let mut c = server.client().get_connection().expect("redis");
    // The run's keys are named by its id; they expire a minute after the run.
    let run: Option<String> = redis::cmd("HGET")
        .arg(format!("flowline:{{{name}}}:meta"))
        .arg("run")
        .query(&mut c)
        .expect("HGET");
    let run = run.expect("the queue's meta names its run");
    let ended: u64 = redis::cmd("BITCOUNT")
        .arg(format!("flowline:{{{name}}}:{run}:ended"))
        .query(&mut c)
        .expect("BITCOUNT");
    (d, u64::from(n).saturating_sub(ended))
}

fn floor(bin: &Path) {
    const N: u32 = 2000;
    let pipe = format!("seq(1..{N}) | fork(4) | sh(\"true {{}}\") | discard");
    let p = crate::util::alternate_paired(5, || flowline(bin, &[&pipe]), || spawn_captured(N, 4));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(N);
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    emit(
        "cli",
        "cli_floor",
        ms(p.flowline),
        ms(p.baseline),
        "ms/job",
        json!({
            "jobs": N,
            "slots": 4,
            "baseline_tool": "4 threads: spawn, read stdout and stderr through pipes, wait",
            "pair_ratio_median": round(p.ratio),
            "pair_ratio_p10": round(p.ratio_p10),
            "pair_ratio_p90": round(p.ratio_p90),
        }),
    );
}

/// `n` `true` processes, `slots` at a time, each slot a thread that spawns one with its
/// stdout and stderr on pipes and reads both to their end (`Command::output`).
fn spawn_captured(n: u32, slots: u32) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..slots {
            s.spawn(move || {
                for i in 0..n / slots {
                    let out = Command::new("true")
                        .arg(i.to_string())
                        .stdin(Stdio::null())
                        .output()
                        .expect("true runs");
                    assert!(out.status.success());
                }
            });
        }
    });
    t.elapsed()
}

/// Runs `cmd` with its stdout read to the end through a pipe; how long it took.
fn drained(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .expect("command runs");
    let d = t.elapsed();
    assert!(out.status.success(), "{cmd:?} failed");
    assert!(!out.stdout.is_empty(), "{cmd:?} printed nothing");
    d
}

fn filter(bin: &Path) {
    const LINES: u32 = 2_000_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("lines.txt");
    let mut text = String::with_capacity(16 * LINES as usize);
    for i in 1..=LINES {
        text.push_str(&i.to_string());
        text.push('\n');
    }
    std::fs::write(&file, text).expect("write lines");
    let path = file.to_str().expect("utf-8 path").to_string();
    let pipe = format!("lines({path}) | filter(\"7$\") | print");
    // Both write into a pipe that is read here: GNU grep stops at its first match when its
    // output is /dev/null.
    let (f, g) = alternate(
        5,
        || drained(Command::new(bin).args(["--quiet", &pipe])),
        || drained(Command::new("grep").args(["7$", &path])),
    );
    // Peak RSS of one more run, from /usr/bin/time (absent: not measured).
    let rss_kib = Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(bin)
        .args(["--quiet", &pipe])
        .stdout(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .and_then(|l| l.trim().parse::<u64>().ok())
        });
    emit(
        "cli",
        "cli_filter",
        f.as_secs_f64(),
        g.as_secs_f64(),
        "s",
        json!({
            "lines": LINES,
            "regex": "7$",
            "baseline_tool": "grep",
            "peak_rss_mib": rss_kib.map(|k| (k as f64 / 1024.0 * 10.0).round() / 10.0),
        }),
    );
}

/// The release `flowline` next to this binary (same target dir), built if missing.
fn flowline_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.with_file_name("flowline");
    if !bin.exists() {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "flowline-cli"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building flowline-cli failed");
    }
    assert!(bin.exists(), "no flowline binary at {}", bin.display());
    bin
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// GNU parallel from Debian's packages, installed when missing.
fn ensure_parallel() {
    if have("parallel") {
        return;
    }
    eprintln!("cli: installing GNU parallel (apt-get)");
    let _ = Command::new("apt-get").arg("update").status();
    let _ = Command::new("apt-get")
        .args(["install", "-y", "parallel"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
}

fn sh(script: &str) -> Duration {
    let t = Instant::now();
    let status = Command::new("sh")
        .args(["-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("sh runs");
    let d = t.elapsed();
    assert!(status.success(), "failed: {script}");
    d
}

fn flowline(bin: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new(bin)
        .arg("--quiet")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("flowline runs");
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "flowline {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn jobs(bin: &Path) {
    const N: u32 = 2000;
    let pipe = format!("seq(1..{N}) | fork(4) | sh(\"true {{}}\") | discard");
    let (f, x) = alternate(
        5,
        || flowline(bin, &[&pipe]),
        || sh(&format!("seq {N} | xargs -P4 -n1 true")),
    );
    let parallel = if have("parallel") {
        Some(sh(&format!("seq {N} | parallel --will-cite -j4 true {{}}")))
    } else {
        None
    };
    let floor = spawn_floor(N, 4);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(N);
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    emit(
        "cli",
        "cli_jobs",
        ms(f),
        ms(x),
        "ms/job",
        json!({
            "jobs": N,
            "slots": 4,
            "baseline_tool": "xargs -P4 -n1",
            "parallel": parallel.map(|p| round(ms(p))),
            "vs_parallel": parallel.map(|p| round(f.as_secs_f64() / p.as_secs_f64())),
            "floor": round(ms(floor)),
            "floor_vs_parallel": parallel.map(|p| round(floor.as_secs_f64() / p.as_secs_f64())),
        }),
    );
}

/// What no job runner can beat here: `n` bare `true` processes, `slots` at a time, each
/// slot a thread that only spawns and waits (std's `posix_spawn`, no shell, no output).
fn spawn_floor(n: u32, slots: u32) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..slots {
            s.spawn(move || {
                for _ in 0..n / slots {
                    let st = Command::new("true")
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .expect("true runs");
                    assert!(st.success());
                }
            });
        }
    });
    t.elapsed()
}

/// A small HTTP/1.1 server with keep-alive on its own runtime: `200` with the path.
fn start_server() -> (u16, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(l.local_addr().expect("addr").port()).expect("port");
            loop {
                let Ok((conn, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = conn.set_nodelay(true);
                    let (r, mut w) = conn.into_split();
                    let mut r = BufReader::new(r);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if h == "\r\n" {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0; len];
                        if len > 0 && r.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                            path.len()
                        );
                        if w.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    (rx.recv().expect("server port"), h)
}

fn http(bin: &Path) {
    const N: u32 = 20_000;
    let (port, _server) = start_server();
    let pipe = format!(
        "seq(1..{N}) | fork(16) | http(GET, \"http://127.0.0.1:{port}/users/{{}}\") | discard"
    );
    let (f, c) = alternate(
        3,
        || flowline(bin, &[&pipe]),
        || {
            sh(&format!(
                "seq {N} | xargs -P16 -I{{}} curl -fsS -o /dev/null http://127.0.0.1:{port}/users/{{}}"
            ))
        },
    );
    let rps = |d: Duration| f64::from(N) / d.as_secs_f64();
    emit(
        "cli",
        "cli_http",
        f.as_secs_f64(),
        c.as_secs_f64(),
        "s",
        json!({
            "requests": N,
            "concurrency": 16,
            "baseline_tool": "xargs -P16 curl",
            "flowline_rps": rps(f).round(),
            "baseline_rps": rps(c).round(),
        }),
    );
}

fn rate(bin: &Path) {
    const N: usize = 1000;
    const RATE: f64 = 100.0;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("joblog.tsv");
    let pipe = format!("seq(1..{N}) | fork(16) | rate(100/s) | sh(\"true {{}}\") | discard");
    let wall = flowline(bin, &["--joblog", log.to_str().expect("utf-8 path"), &pipe]);
    let text = std::fs::read_to_string(&log).expect("joblog");
    let mut starts: Vec<f64> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').nth(2)?.parse().ok())
        .collect();
    starts.sort_by(f64::total_cmp);
    assert_eq!(starts.len(), N, "one joblog line per job");
    let span = starts[N - 1] - starts[0];
    let measured = (N - 1) as f64 / span;
    // The most starts within any half-open second [t, t + 1 s), t at a start.
    let (mut best, mut j) = (0, 0);
    for i in 0..N {
        while j < N && starts[j] < starts[i] + 1.0 {
            j += 1;
        }
        best = best.max(j - i);
    }
    emit(
        "cli",
        "cli_rate",
        measured,
        RATE,
        "jobs/s",
        json!({
            "jobs": N,
            "error_pct": ((measured - RATE).abs() / RATE * 100.0 * 1000.0).round() / 1000.0,
            "max_in_period": best,
            "wall_s": (wall.as_secs_f64() * 1000.0).round() / 1000.0,
        }),
    );
}
