//! Stopping a run with signals, against real processes: the first signal starts nothing
//! new and lets the running jobs finish, a second one kills every job's whole process
//! group, and a SIGKILL of `flowline` takes its jobs with it.

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
