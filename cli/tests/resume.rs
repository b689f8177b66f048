//! Resume exactness: `--state` records an input done when its job ends, before its worker
//! starts another, so a SIGKILL at any point makes at most the jobs in flight run again.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_flowline");
const INPUTS: usize = 3000;
const FORK: usize = 4;
const KILLS: usize = 20;

fn pipe() -> String {
    format!("seq(1..{INPUTS}) | fork({FORK}) | sh(\"echo $RUN {{}} >> runs; echo {{}}\")")
}

fn flowline(dir: &Path, run: usize) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--quiet", "--state", "run.db", &pipe()])
        .env("RUN", run.to_string())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// xorshift, seeded from the clock and printed, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn sigkill_at_random_points_reruns_at_most_the_jobs_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let seed = std::env::var("FLOWLINE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("seed {seed} (FLOWLINE_TEST_SEED to replay)");
    let mut rng = Rng(seed);
    for run in 0..KILLS {
        let mut child = flowline(d.path(), run).spawn().unwrap();
        // Kill once this run has started some jobs, at a random point after that.
        let before = runs_of(d.path()).get(&run).map_or(0, Vec::len);
        let t = Instant::now();
        while runs_of(d.path()).get(&run).map_or(0, Vec::len) == before {
            // On a fast machine the earlier runs may have done every input: this run then
            // ends by itself, having nothing to start.
            if let Some(st) = child.try_wait().unwrap() {
                assert_eq!(st.code(), Some(0), "run {run} ended with {st}");
                assert_eq!(
                    runs_of(d.path())
                        .values()
                        .flatten()
                        .collect::<HashSet<_>>()
                        .len(),
                    INPUTS
                );
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "run {run} starts no job"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let st = flowline(d.path(), KILLS).status().unwrap();
    assert_eq!(st.code(), Some(0));

    let runs = runs_of(d.path());
    let all: HashSet<&String> = runs.values().flatten().collect();
    assert_eq!(all.len(), INPUTS, "every input ran");
    let mut reruns = 0;
    for k in 0..KILLS {
        let a: HashSet<&String> = runs.get(&k).into_iter().flatten().collect();
        let b: HashSet<&String> = runs.get(&(k + 1)).into_iter().flatten().collect();
        let again = a.intersection(&b).count();
        assert!(
            again <= FORK,
            "kill {k}: {again} inputs ran again, more than the {FORK} in flight (seed {seed})"
        );
        reruns += again;
    }
    let total: usize = runs.values().map(Vec::len).sum();
    assert_eq!(total, INPUTS + reruns, "no input ran twice within a run");
    eprintln!("{reruns} re-runs after {KILLS} kills");
}

/// Which inputs each run started, from the jobs' own log.
fn runs_of(dir: &Path) -> HashMap<usize, Vec<String>> {
    let text = std::fs::read_to_string(dir.join("runs")).unwrap_or_default();
    let mut m: HashMap<usize, Vec<String>> = HashMap::new();
    for line in text.lines() {
        if let Some((run, input)) = line.split_once(' ') {
            if let Ok(run) = run.parse() {
                m.entry(run).or_default().push(input.to_string());
            }
        }
    }
    m
}

/// A state file locked by another program (a backup, `sqlite3` left open in a transaction):
/// the jobs that end wait for their mark, so nothing new starts; once the lock goes, every
/// mark is written and the run ends by itself, each input run once.
#[test]
fn a_locked_state_file_pauses_the_jobs_and_loses_no_mark() {
    use std::io::{BufRead, BufReader};
    let d = tempfile::tempdir().unwrap();
    // The file and its table, made by a first run over one input.
    let first = Command::new(BIN)
        .args(["--quiet", "--state", "run.db", "args(0) | sh(\"true\")"])
        .current_dir(d.path())
        .status()
        .unwrap();
    assert!(first.success());
    let mut lock = rusqlite::Connection::open(d.path().join("run.db")).unwrap();
    let tx = lock
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    tx.execute(
        "UPDATE flowline_idempotency SET expires_ms = expires_ms",
        [],
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--quiet",
            "--state",
            "run.db",
            "seq(1..20) | fork(2) | sh(\"echo {}\")",
        ])
        .current_dir(d.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let printed = printed.clone();
        std::thread::spawn(move || {
            for line in out.lines() {
                printed.lock().unwrap().push(line.unwrap());
            }
        })
    };
    // Held for 3 s: the state's commits fail (1 s busy wait each) and are tried again.
    std::thread::sleep(Duration::from_secs(3));
    let during = printed.lock().unwrap().len();
    assert!(
        during <= 2,
        "{during} jobs ended while their marks could not be written; at most the 2 in flight may"
    );
    tx.commit().unwrap();
    drop(lock);
    let st = child.wait().unwrap();
    reader.join().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(err.contains("cannot record progress"), "{err}");
    let mut got: Vec<u32> = printed
        .lock()
        .unwrap()
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, (1..=20).collect::<Vec<_>>(), "each input once");
    let c = rusqlite::Connection::open(d.path().join("run.db")).unwrap();
    let done: i64 = c
        .query_row(
            "SELECT count(*) FROM flowline_idempotency WHERE state = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(done, 21, "every input recorded done (and the first run's)");
}
