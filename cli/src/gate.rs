//! `--load` and `--memfree`: a job starts only while the machine has room for it, as with
//! GNU parallel. A job held here keeps its place: the jobs already running go on, nothing
//! new starts, and the job starts as soon as the load falls or memory is freed.
//!
//! The load is the number of processes running or waiting for the disk now (`procs_running`
//! and `procs_blocked` in `/proc/stat`, less this process's own running thread), parallel's
//! measure too: the load average lags by a minute, far too long to pace job starts. Free
//! memory is `MemAvailable` in `/proc/meminfo`. Unlike parallel, a running job is never
//! killed when memory runs low (parallel kills the youngest job below half of `--memfree`
//! and runs it again later).

use std::time::Duration;

/// The limits a job start waits for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StartGate {
    max_load: Option<f64>,
    min_free: Option<u64>,
}

/// The machine now, as the gate reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Machine {
    pub load: Option<f64>,
    pub free: Option<u64>,
}

impl StartGate {
    /// `--load` (`N`, `N%` of the CPUs, `+N`, `-N`) and `--memfree` (bytes, with `k m g t`
    /// for powers of 1000 or `K M G T` for powers of 1024). `None` when neither is given;
    /// every bad value is named.
    pub fn parse(
        load: Option<&str>,
        memfree: Option<&str>,
        cpus: usize,
    ) -> Result<Option<StartGate>, Vec<String>> {
        let mut errors = Vec::new();
        let max_load = load.and_then(|t| {
            parse_load(t, cpus)
                .map_err(|why| errors.push(format!("error: --load `{}` {why}", t.escape_debug())))
                .ok()
        });
        let min_free = memfree.and_then(|t| {
            parse_size(t)
                .map_err(|why| {
                    errors.push(format!("error: --memfree `{}` {why}", t.escape_debug()))
                })
                .ok()
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok((max_load.is_some() || min_free.is_some()).then_some(StartGate { max_load, min_free }))
    }

    /// Whether a job may start on `m`. A reading that failed (no `/proc`) lets jobs start:
    /// a limit that cannot be read must not stop the run for good.
    pub fn open(&self, m: Machine) -> bool {
        let load_ok = match (self.max_load, m.load) {
            (Some(max), Some(load)) => load < max,
            _ => true,
        };
        let mem_ok = match (self.min_free, m.free) {
            (Some(min), Some(free)) => free >= min,
            _ => true,
        };
        load_ok && mem_ok
    }

    /// Waits until a job may start: reads the machine every 100 ms at first, then less often
    /// (up to every second) while it stays busy.
    pub async fn wait(&self) {
        let mut pause = Duration::from_millis(100);
        while !self.open(Machine::now()) {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

impl Machine {
    /// Reads `/proc/stat` and `/proc/meminfo`.
    pub fn now() -> Machine {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            load: load_of(&stat),
            free: free_of(&meminfo),
        }
    }
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Processes running or in uninterruptible sleep, less the one reading.
fn load_of(stat: &str) -> Option<f64> {
    let running = field(stat, "procs_running ")?;
    let blocked = field(stat, "procs_blocked ").unwrap_or(0);
    Some((running + blocked).saturating_sub(1) as f64)
}

fn free_of(meminfo: &str) -> Option<u64> {
    field(meminfo, "MemAvailable:").map(|kb| kb.saturating_mul(1024))
}

fn parse_load(text: &str, cpus: usize) -> Result<f64, String> {
    let t = text.trim();
    let num = |s: &str| -> Result<f64, String> {
        s.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| "is not N, N%, +N or -N (N a number from 0)".to_string())
    };
    let cpus = cpus as f64;
    let v = if let Some(p) = t.strip_suffix('%') {
        cpus * num(p)? / 100.0
    } else if let Some(x) = t.strip_prefix('+') {
        cpus + num(x)?
    } else if let Some(x) = t.strip_prefix('-') {
        cpus - num(x)?
    } else {
        num(t)?
    };
    if v <= 0.0 {
        return Err(format!(
            "comes to {v} with {cpus} CPUs: no job could ever start"
        ));
    }
    Ok(v)
}

fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit {
        "" | "b" | "B" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "K" => 1024.0,
        "M" => 1024f64.powi(2),
        "G" => 1024f64.powi(3),
        "T" => 1024f64.powi(4),
        _ => return Err("has an unknown unit (k m g t, K M G T)".into()),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .ok_or_else(|| "is not a size such as 512M or 2G".to_string())?;
    let bytes = n * mult;
    if bytes >= u64::MAX as f64 {
        return Err("is more memory than a machine has".into());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_read_as_jobs_counts_do() {
        assert_eq!(parse_load("3", 4), Ok(3.0));
        assert_eq!(parse_load("1.5", 4), Ok(1.5));
        assert_eq!(parse_load("50%", 4), Ok(2.0));
        assert_eq!(parse_load("+2", 4), Ok(6.0));
        assert_eq!(parse_load("-1", 4), Ok(3.0));
        for bad in ["", "x", "NaN", "inf", "-4", "0", "0%"] {
            assert!(parse_load(bad, 4).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2k"), Ok(2000));
        assert_eq!(parse_size("2K"), Ok(2048));
        assert_eq!(parse_size("1.5G"), Ok(1_610_612_736));
        for bad in ["", "G", "1x", "1e400", "99999999999T", "-1G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_bad_value_is_named_at_once() {
        let e = StartGate::parse(Some("lots"), Some("big"), 2).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("--load `lots`") && e[1].contains("--memfree `big`"));
        assert_eq!(StartGate::parse(None, None, 2), Ok(None));
    }

    #[test]
    fn the_gate_opens_below_the_load_and_above_the_memory() {
        let g = StartGate::parse(Some("2"), Some("1K"), 2).unwrap().unwrap();
        let m = |load, free| Machine {
            load: Some(load),
            free: Some(free),
        };
        assert!(g.open(m(1.0, 4096)));
        assert!(!g.open(m(2.0, 4096)), "load at the limit");
        assert!(!g.open(m(0.0, 1000)), "less free than asked");
        assert!(g.open(Machine {
            load: None,
            free: None
        }));
    }

    #[test]
    fn proc_files_are_read() {
        let stat = "cpu  1 2 3\nprocs_running 3\nprocs_blocked 1\n";
        assert_eq!(load_of(stat), Some(3.0));
        assert_eq!(load_of("garbage"), None);
        let mem = "MemTotal: 100 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(free_of(mem), Some(2048 * 1024));
        let now = Machine::now();
        assert!(now.load.is_some() && now.free.is_some_and(|f| f > 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_gate_that_is_open_lets_the_job_start_at_once() {
        let g = StartGate::parse(None, Some("1"), 2).unwrap().unwrap();
        let t = tokio::time::Instant::now();
        g.wait().await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
