//! Limits read from files while the run goes on: `-j FILE` (GNU parallel's meaning: the
//! file holds a `-j` value, read again as jobs end) and `rate(FILE)`. A file is read again
//! only when its modification time changed (one `stat` per job end), and at once on
//! SIGUSR1. A bad value is a warning naming the file and the value; the old limit stays.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use flowline::{Control, Rate};

/// What a file sets, on which stages.
enum Target {
    /// `-j FILE`: the workers of the stages without `fork(N)`; `-j`'s value is relative
    /// to this many CPUs (`50%`, `+2`).
    Workers { cpus: usize },
    /// `rate(FILE)`: the stage's rate.
    Rate,
}

struct Watched {
    path: PathBuf,
    target: Target,
    stages: Vec<String>,
    /// The modification time last read, and the value in force (as text, for messages).
    seen: Mutex<(Option<SystemTime>, String)>,
}

/// The files of a run, and the run's control once it is started.
#[derive(Default)]
pub struct LiveFiles {
    files: Vec<Watched>,
    control: OnceLock<Control>,
}

impl LiveFiles {
    /// `-j FILE`, applied to `stages` (those whose workers come from `-j`).
    pub fn jobs(&mut self, path: PathBuf, cpus: usize, stages: Vec<String>) {
        self.watch(path, Target::Workers { cpus }, stages);
    }

    /// `rate(FILE)` of `stage`.
    pub fn rate(&mut self, path: PathBuf, stage: String) {
        self.watch(path, Target::Rate, vec![stage]);
    }

    fn watch(&mut self, path: PathBuf, target: Target, stages: Vec<String>) {
        if stages.is_empty() {
            return;
        }
        // The value in force is the one read at the start (checked there): read again only
        // once the file changes.
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        self.files.push(Watched {
            path,
            target,
            stages,
            seen: Mutex::new((mtime, text.trim().to_string())),
        });
    }

    /// The run is started: changes go to it from now on.
    pub fn started(&self, control: Control) {
        let _ = self.control.set(control);
    }

    /// A job ended: reads again the files that changed.
    pub fn job_ended(&self) {
        for w in &self.files {
            w.check(self.control.get(), false);
        }
    }

    /// SIGUSR1: reads every file again, changed or not.
    pub fn reread(&self) {
        for w in &self.files {
            w.check(self.control.get(), true);
        }
    }
}

impl Watched {
    fn check(&self, control: Option<&Control>, always: bool) {
        let Some(control) = control else { return };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if !always && mtime == seen.0 {
            return;
        }
        seen.0 = mtime;
        let warn = |why: String| {
            eprintln!(
                "flowline: warning: `{}`: {why}; the limit stays {}",
                self.path.display(),
                seen.1
            );
        };
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t.trim().to_string(),
            Err(e) => return warn(format!("cannot be read: {e}")),
        };
        if text == seen.1 {
            return;
        }
        // Read as a whole: an editor's half-written file is refused, not half applied.
        let applied = match self.target {
            Target::Workers { cpus } => crate::compat::jobs_value(&text, cpus).and_then(|n| {
                self.stages
                    .iter()
                    .try_for_each(|s| control.set_workers(s, n).map_err(|e| e.to_string()))
            }),
            Target::Rate => rate_file_value(&text).and_then(|(count, period, burst)| {
                let rate = Rate::per(count, period).burst(burst);
                self.stages
                    .iter()
                    .try_for_each(|s| control.set_rate(s, &rate).map_err(|e| e.to_string()))
            }),
        };
        match applied {
            Ok(()) => seen.1 = text,
            Err(e) => warn(format!("`{}`: {e}", text.escape_debug())),
        }
    }
}

/// A rate as `rate(..)` takes it: `20/s`, `100/1m`; what is wrong as (what, why).
pub fn rate_value(text: &str) -> Result<(u64, Duration), (&'static str, String)> {
    let bad = |what, why: &str| (what, why.to_string());
    let (n, per) = text
        .split_once('/')
        .ok_or_else(|| bad("rate", "is not like `20/s` or `100/1m`"))?;
    let count: u64 = n
        .trim()
        .parse()
        .map_err(|_| bad("rate", "needs a whole number of calls, like `20/s`"))?;
    if count == 0 || count > 1_000_000_000 {
        return Err(bad("rate", "must allow from 1 to 1e9 calls per period"));
    }
    let period = match per.trim() {
        "s" | "sec" => Duration::from_secs(1),
        "m" | "min" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => crate::spec::parse_duration(other).map_err(|why| bad("rate period", why))?,
    };
    if period < Duration::from_millis(1) || period > crate::spec::MAX_DURATION {
        return Err(bad("rate period", "must be from 1ms to 30 days"));
    }
    if period.as_nanos() / u128::from(count) == 0 {
        return Err(bad("rate", "is faster than one call per nanosecond"));
    }
    Ok((count, period))
}

/// A rate file's text: `20/s`, optionally `, BURST`.
pub fn rate_file_value(text: &str) -> Result<(u64, Duration, u64), String> {
    let (rate, burst) = match text.split_once(',') {
        Some((r, b)) => (r, Some(b.trim())),
        None => (text, None),
    };
    let (count, period) =
        rate_value(rate.trim()).map_err(|(what, why)| format!("a {what} that {why}"))?;
    let burst = match burst {
        Some(b) => match b.parse::<u64>() {
            Ok(b @ 1..=1_000_000) => b,
            _ => return Err("the burst must be a whole number from 1 to 1000000".into()),
        },
        None => 1,
    };
    Ok((count, period, burst))
}
