//! The processes a run starts: each job in a process group of its own, every running group
//! known, so that a cancel, a timeout or the end of `flowline` itself takes the job's
//! whole tree with it (a `sh -c "sleep 20; true"` leaves no `sleep` behind).
//!
//! - A job is its own process group leader (`setpgid(0, 0)` at spawn, through
//!   `posix_spawn`'s flag, so the spawn stays as cheap as without it). A terminal's Ctrl-C
//!   goes to the terminal's foreground group only: it reaches `flowline`, not the jobs,
//!   and `flowline` decides (first signal: let them finish; second: kill them).
//! - A job's group is killed (SIGKILL to the group) when its call is dropped before the
//!   job was reaped: a `timeout(..)`, a cancel. A job that exited is never signalled after
//!   it was reaped, so a reused process id is never hit.
//! - A guard process, started once per run, holds the other end of a pipe on which
//!   `flowline` writes `+PGID` when a job starts and `-PGID` when it is reaped. When the pipe
//!   closes — `flowline` ended, however it ended, SIGKILL included — the guard kills every
//!   group still listed. The kernel's `PR_SET_PDEATHSIG` would reach only the direct child
//!   (the `sh`, not its `sleep`), and setting it forces a `fork` + `exec` for every job
//!   instead of `posix_spawn`; the guard reaches the whole group and costs one pipe write
//!   per job start and end. It is in its own process group too, so that a terminal's
//!   Ctrl-C does not end it.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Stdio};
use std::sync::Mutex;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The argument that starts `flowline` as a run's guard (see the module doc).
pub const GUARD_ARG: &str = "__flowline-job-guard";

/// The running jobs of a run.
pub struct Jobs {
    /// Each running job's group and its command as shown (for SIGUSR1's list).
    running: Mutex<HashMap<i32, String>>,
    guard: Mutex<Option<ChildStdin>>,
}

impl Jobs {
    /// A registry with a guard process (started from this same executable), or without one
    /// when it cannot be started (then a SIGKILL of `flowline` leaves the jobs running; a
    /// warning says so).
    pub fn new() -> Jobs {
        let guard = std::env::current_exe()
            .and_then(|exe| {
                std::process::Command::new(exe)
                    .arg(GUARD_ARG)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .process_group(0)
                    .spawn()
            })
            .map(|mut c| c.stdin.take());
        let guard = match guard {
            Ok(g) => g,
            Err(e) => {
                eprintln!(
                    "flowline: cannot start the job guard ({e}): jobs would outlive a killed flowline"
                );
                None
            }
        };
        Jobs {
            running: Mutex::new(HashMap::new()),
            guard: Mutex::new(guard),
        }
    }

    /// A registry without a guard, for a run that starts no process.
    pub fn none() -> Jobs {
        Jobs {
            running: Mutex::new(HashMap::new()),
            guard: Mutex::new(None),
        }
    }

    fn tell_guard(&self, line: &str) {
        if let Ok(mut g) = self.guard.lock() {
            if let Some(pipe) = g.as_mut() {
                if pipe.write_all(line.as_bytes()).is_err() {
                    g.take();
                }
            }
        }
    }

    /// Records a started job (the leader of group `pgid`, running `command`); the returned
    /// token kills the group if it is dropped before [`Started::reaped`].
    pub fn started(&self, pgid: u32, command: &str) -> Started<'_> {
        let pgid = pgid as i32;
        if let Ok(mut r) = self.running.lock() {
            r.insert(pgid, command.to_string());
        }
        self.tell_guard(&format!("+{pgid}\n"));
        Started {
            jobs: self,
            pgid,
            reaped: false,
        }
    }

    fn forget(&self, pgid: i32) {
        if let Ok(mut r) = self.running.lock() {
            r.remove(&pgid);
        }
        self.tell_guard(&format!("-{pgid}\n"));
    }

    /// How many jobs are running.
    pub fn running(&self) -> usize {
        self.running.lock().map_or(0, |r| r.len())
    }

    /// The commands of the running jobs, by process group id (GNU parallel's answer to
    /// SIGUSR1).
    pub fn commands(&self) -> Vec<String> {
        let Ok(r) = self.running.lock() else {
            return Vec::new();
        };
        let mut jobs: Vec<(&i32, &String)> = r.iter().collect();
        jobs.sort_by_key(|(g, _)| **g);
        jobs.into_iter().map(|(_, c)| c.clone()).collect()
    }

    /// Kills every running job's whole group (SIGKILL); returns how many groups.
    pub fn kill_all(&self) -> usize {
        let groups: Vec<i32> = self
            .running
            .lock()
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default();
        for &g in &groups {
            let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
        }
        groups.len()
    }
}

/// A running job's group; dropped before [`reaped`](Started::reaped), it kills the group.
pub struct Started<'a> {
    jobs: &'a Jobs,
    pgid: i32,
    reaped: bool,
}

impl Started<'_> {
    /// The job was waited for: its group is no longer ours to signal.
    pub fn reaped(mut self) {
        self.reaped = true;
    }
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        if !self.reaped {
            // The leader is not reaped yet (its call was dropped while waiting), so the
            // group id is still this job's.
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        }
        self.jobs.forget(self.pgid);
    }
}

/// The guard's whole life: read `+PGID` / `-PGID` lines until the pipe closes, then kill
/// every group still listed.
pub fn guard_main() {
    let mut groups: HashSet<i32> = HashSet::new();
    let stdin = std::io::stdin().lock();
    for line in stdin.split(b'\n') {
        let Ok(line) = line else { break };
        let Ok(text) = std::str::from_utf8(&line) else {
            continue;
        };
        let (sign, num) = text.split_at(text.len().min(1));
        // Outside input in principle: only positive process ids above 1 are acted on.
        match (sign, num.parse::<i32>()) {
            ("+", Ok(g)) if g > 1 => {
                groups.insert(g);
            }
            ("-", Ok(g)) => {
                groups.remove(&g);
            }
            _ => {}
        }
    }
    for g in groups {
        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
}
