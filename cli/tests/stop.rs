//! Stopping a run with signals, against real processes: the first signal starts nothing
//! new and lets the running jobs finish, a second one kills every job's whole process
//! group, and a SIGKILL of `flowline` takes its jobs with it. And steering a running job:
//! limits changed through `-j FILE`, `rate(FILE)` and SIGUSR1.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flowline");

/// `flowline` in a process group of its own, like a shell's foreground job: a signal to
/// the group is what a terminal's Ctrl-C sends.
fn start(dir: &Path, args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("flowline runs")
}

/// Sends `sig` to a process (`pid`) or, negative, to a process group.
fn signal(sig: &str, target: i64) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), "--", &target.to_string()])
        .status()
        .expect("kill runs");
    assert!(st.success(), "kill -{sig} {target}");
}

/// Waits for `cond`, failing the test after 20 s (a condition that is never met is a bug,
/// not slowness).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn files_named(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// Whether a process is alive: it exists and is not a zombie (a zombie left to a PID 1
/// that does not reap has ended all the same).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The pids the jobs wrote into `pid.*` files.
fn job_pids(dir: &Path) -> Vec<i32> {
    files_named(dir, "pid.")
        .iter()
        .filter_map(|f| {
            std::fs::read_to_string(dir.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// Reads a pipe on a thread of its own, into a string the test can look at meanwhile.
fn read_along(mut pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let seen = Arc::new(Mutex::new(String::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            s.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    seen
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A terminal's Ctrl-C (SIGINT to the whole foreground group) is the first signal: the
/// 4 running jobs are in groups of their own, so they are not hit and they finish; nothing
/// else starts; the other 46 inputs are reported unfinished, are not done in `--state`,
/// not failed, not in the dead-letter file; a rerun runs exactly them.
#[test]
fn ctrl_c_to_the_group_lets_running_jobs_finish_and_starts_nothing_new() {
    let d = tempfile::tempdir().unwrap();
    let pipe = "seq(1..50) | fork(4) | sh(\"touch started.{}; while [ ! -e go ]; do sleep 0.02; done; echo {}\")";
    let mut child = start(d.path(), &["--state", "run.db", pipe]);
    let stderr = read_along(child.stderr.take().unwrap());
    wait_for("4 jobs running", || {
        files_named(d.path(), "started.").len() == 4
    });
    signal("INT", -i64::from(child.id()));
    // The stop is seen before the jobs are let go: what would run next is a new start.
    wait_for("the stop is seen", || {
        stderr.lock().unwrap().contains("stopping:")
    });
    std::fs::write(d.path().join("go"), "").unwrap();
    let o: Output = child.wait_with_output().unwrap();
    let err = stderr.lock().unwrap().clone();
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert_eq!(files_named(d.path(), "started.").len(), 4, "{err}");
    assert_eq!(
        text(&o.stdout).lines().count(),
        4,
        "running jobs finish: {err}"
    );
    assert!(err.contains("0 failed, 46 left unfinished"), "{err}");
    assert!(!d.path().join("flowline-failed.jsonl").exists());

    let o = Command::new(BIN)
        .args(["--quiet", "--state", "run.db", pipe])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).lines().count(), 46);
    assert_eq!(files_named(d.path(), "started.").len(), 50);
}

/// A second signal kills each running job's whole group: the `sleep` a job's shell
/// started dies with it, nothing is left under PID 1.
#[test]
fn second_signal_kills_every_jobs_whole_group() {
    let d = tempfile::tempdir().unwrap();
    let pipe = "seq(1..20) | fork(3) | sh(\"sleep 60 & echo $! > pid.{}; wait\")";
    let mut child = start(d.path(), &[pipe]);
    wait_for("3 jobs running", || job_pids(d.path()).len() == 3);
    let pids = job_pids(d.path());
    assert!(pids.iter().all(|&p| alive(p)));
    signal("TERM", i64::from(child.id()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        pids.iter().all(|&p| alive(p)),
        "the first signal kills nothing"
    );
    signal("TERM", i64::from(child.id()));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    wait_for("every grandchild gone", || pids.iter().all(|&p| !alive(p)));
    assert_eq!(job_pids(d.path()).len(), 3, "nothing new started");
}

/// `--grace` is the deadline instead of a second signal.
#[test]
fn grace_deadline_kills_jobs_still_running() {
    let d = tempfile::tempdir().unwrap();
    let pipe = "seq(1..5) | fork(2) | sh(\"sleep 60 & echo $! > pid.{}; wait\")";
    let child = start(d.path(), &["--grace", "300ms", pipe]);
    wait_for("2 jobs running", || job_pids(d.path()).len() == 2);
    let pids = job_pids(d.path());
    signal("INT", i64::from(child.id()));
    let t = Instant::now();
    let o = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(130));
    assert!(
        text(&o.stderr).contains("killed 2 running job(s)"),
        "{}",
        text(&o.stderr)
    );
    wait_for("every grandchild gone", || pids.iter().all(|&p| !alive(p)));
}

/// Jobs 1 and 2 sleep (their `sleep` a grandchild); job 3 fails with 7 once they run.
const HALTING: &str = "seq(1..10) | fork(3) | sh(\"if [ {} = 3 ]; then while [ ! -e pid.1 ] || [ ! -e pid.2 ]; do sleep 0.02; done; exit 7; fi; sleep 60 & echo $! > pid.{}; wait\")";

/// `--halt now`: the failure kills every running job's whole group at once, without a
/// signal, and the run ends with the failing job's code.
#[test]
fn halt_now_kills_every_running_jobs_group() {
    let d = tempfile::tempdir().unwrap();
    let child = start(d.path(), &["--halt", "now,fail=1", HALTING]);
    let t = Instant::now();
    let o = child.wait_with_output().unwrap();
    let err = text(&o.stderr);
    assert!(t.elapsed() < Duration::from_secs(20), "{err}");
    assert_eq!(o.status.code(), Some(7), "{err}");
    assert!(err.contains("--halt now: killed"), "{err}");
    assert!(!err.contains("stopping:"), "{err}");
    let pids = job_pids(d.path());
    assert!(pids.len() >= 2, "{err}");
    wait_for("every grandchild gone", || pids.iter().all(|&p| !alive(p)));
}

/// `--halt soon`: the failure stops the run as a first signal would (the running jobs go
/// on); a signal after it is the second, which kills them; the exit code stays the failing
/// job's.
#[test]
fn a_signal_after_halt_soon_kills_the_running_jobs() {
    let d = tempfile::tempdir().unwrap();
    let mut child = start(d.path(), &["--halt", "soon,fail=1", HALTING]);
    let stderr = read_along(child.stderr.take().unwrap());
    wait_for("the halt is seen", || {
        stderr.lock().unwrap().contains("stopping:")
    });
    let pids = job_pids(d.path());
    assert!(pids.len() >= 2);
    std::thread::sleep(Duration::from_millis(200));
    assert!(pids.iter().all(|&p| alive(p)), "the halt kills nothing");
    signal("TERM", i64::from(child.id()));
    let status = child.wait().unwrap();
    let err = stderr.lock().unwrap().clone();
    assert_eq!(status.code(), Some(7), "{err}");
    wait_for("every grandchild gone", || pids.iter().all(|&p| !alive(p)));
    wait_for("the cancel is told", || {
        stderr.lock().unwrap().contains("cancelling: killed")
    });
}

/// A SIGKILL of `flowline` takes its jobs, and their children, with it.
#[test]
fn sigkill_of_flowline_takes_its_jobs_with_it() {
    let d = tempfile::tempdir().unwrap();
    let pipe = "seq(1..20) | fork(4) | sh(\"sleep 60 & echo $! > pid.{}; wait\")";
    let mut child = start(d.path(), &[pipe]);
    wait_for("4 jobs running", || job_pids(d.path()).len() == 4);
    let pids = job_pids(d.path());
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("every job gone", || pids.iter().all(|&p| !alive(p)));
}

/// The numbers a job wrote, one a line: how many jobs ran when it started.
fn counts(dir: &Path) -> Vec<usize> {
    std::fs::read_to_string(dir.join("counts"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A job that counts the jobs running as it starts (its own file in `run/` among theirs;
/// a job's file is gone before it ends, so the count never exceeds the jobs running).
fn counting_job(secs: &str) -> String {
    format!("sh(\"touch run/{{}}; ls run | wc -l >> counts; sleep {secs}; rm run/{{}}\")")
}

/// Writes `text` to `path` with a new modification time.
fn rewrite(path: &Path, text: &str) {
    let before = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    loop {
        std::fs::write(path, text).unwrap();
        if std::fs::metadata(path).and_then(|m| m.modified()).ok() != before {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stderr(child: Child) -> (Option<i32>, String) {
    let o = child.wait_with_output().unwrap();
    (o.status.code(), text(&o.stderr))
}

/// A directory with `run/` for the counting jobs and a `-j` file holding `jobs`.
fn counting_dir(jobs: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("run")).unwrap();
    let file = d.path().join("jobs.txt");
    std::fs::write(&file, jobs).unwrap();
    (d, file)
}

#[test]
fn a_jobs_file_is_read_again_as_jobs_end_and_a_bad_value_keeps_the_limit() {
    let (d, jobs) = counting_dir("2\n");
    let pipe = format!("seq(1..60) | {}", counting_job("0.2"));
    let child = start(d.path(), &["--quiet", "-j", "jobs.txt", &pipe]);
    wait_for("6 jobs", || counts(d.path()).len() >= 6);
    rewrite(&jobs, "6\n");
    let raised_at = counts(d.path()).len();
    wait_for("18 more jobs", || counts(d.path()).len() >= raised_at + 18);
    // Not a -j value: a warning, and the limit stays 6.
    rewrite(&jobs, "lots\n");
    let bad_at = counts(d.path()).len();
    wait_for("12 more jobs", || counts(d.path()).len() >= bad_at + 12);
    rewrite(&jobs, "1\n");
    let lowered_at = counts(d.path()).len();
    let (code, err) = stderr(child);
    assert_eq!(code, Some(0), "{err}");
    let c = counts(d.path());
    assert_eq!(c.len(), 60);
    assert!(c[..raised_at].iter().all(|&n| n <= 2), "{c:?}");
    // Raised: up to 6 at once (jobs that started as the file changed may count 2).
    let raised = &c[raised_at..lowered_at];
    assert!(raised.iter().all(|&n| n <= 6), "{c:?}");
    assert!(raised.iter().any(|&n| n >= 4), "{c:?}");
    assert!(c[bad_at + 6..lowered_at].iter().any(|&n| n >= 4), "{c:?}");
    // Lowered: once the jobs in flight (and the ones starting as it changed) are done,
    // one at a time.
    assert!(c[lowered_at + 12..].iter().all(|&n| n == 1), "{c:?}");
    assert!(
        err.contains("jobs.txt") && err.contains("lots") && err.contains("the limit stays 6"),
        "{err}"
    );
}

#[test]
fn sigusr1_reads_the_files_again_without_waiting_for_a_job_to_end() {
    let (d, jobs) = counting_dir("1");
    let pipe = format!("seq(1..6) | {}", counting_job("3"));
    let child = start(d.path(), &["--quiet", "-j", "jobs.txt", &pipe]);
    wait_for("the first job", || counts(d.path()).len() == 1);
    rewrite(&jobs, "3");
    signal("USR1", i64::from(child.id()));
    // 3 jobs at once before the first job's 3 s are over: polled until the first job's
    // file is gone (its end is the deadline). The count is read before the file is looked
    // at, so a count seen with the file still there was reached while it ran.
    let first = d.path().join("run").join("1");
    loop {
        let n = counts(d.path()).len();
        let running = first.exists();
        if n >= 3 {
            assert!(running, "3 jobs only once the first had ended");
            break;
        }
        assert!(running, "the first job ended with {n} jobs started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, err) = stderr(child);
    assert_eq!(code, Some(0), "{err}");
    assert!(counts(d.path()).iter().all(|&n| n <= 3));
}

/// GNU parallel's SIGUSR1: the running jobs' commands on stderr, and the run goes on. A
/// run with no limit file takes it too (the signal's default action would end it).
#[test]
fn sigusr1_lists_the_running_jobs_and_the_run_goes_on() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("run")).unwrap();
    let mut child = start(
        d.path(),
        &[
            "--quiet",
            "-j",
            "3",
            "seq(1..4) | sh(\"touch run/{}; sleep 1; echo {}\")",
        ],
    );
    let err = read_along(child.stderr.take().unwrap());
    wait_for("3 jobs running", || {
        files_named(&d.path().join("run"), "").len() == 3
    });
    signal("USR1", i64::from(child.id()));
    wait_for("3 jobs listed", || err.lock().unwrap().lines().count() >= 3);
    let o = child.wait_with_output().unwrap();
    let err = err.lock().unwrap().clone();
    assert_eq!(o.status.code(), Some(0), "{err}");
    let mut out: Vec<String> = text(&o.stdout).lines().map(String::from).collect();
    out.sort();
    assert_eq!(out, ["1", "2", "3", "4"], "every job ran to its end");
    let mut listed: Vec<&str> = err.lines().collect();
    listed.sort();
    assert_eq!(
        listed,
        [1, 2, 3].map(|i| format!("flowline: touch run/{i}; sleep 1; echo {i}")),
        "{err}"
    );
}

#[test]
fn a_rate_file_is_read_again_as_jobs_end() {
    let d = tempfile::tempdir().unwrap();
    let rate = d.path().join("rate.txt");
    std::fs::write(&rate, "5/s").unwrap();
    let child = start(
        d.path(),
        &[
            "--quiet",
            "-j",
            "4",
            "seq(1..40) | rate(rate.txt) | sh(\"echo x >> counts\")",
        ],
    );
    let lines = |d: &Path| {
        std::fs::read_to_string(d.join("counts"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    wait_for("3 jobs", || lines(d.path()) >= 3);
    // 5 a second would take 8 s for 40; 200 a second takes a fraction of one.
    rewrite(&rate, "0/s");
    let t = Instant::now();
    wait_for("1 more job", || lines(d.path()) >= 4);
    rewrite(&rate, "200/s");
    let (code, err) = stderr(child);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(lines(d.path()), 40);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        err.contains("rate.txt") && err.contains("0/s") && err.contains("the limit stays 5/s"),
        "{err}"
    );
}
