//! `--queue redis://HOST[:PORT]/NAME`: one job spread over several machines, with a Redis
//! stream as its queue (GNU parallel's `--sshlogin`, without ssh).
//!
//! - The *feeder* (`feeder.rs`, the command without `--worker`) runs the pipe's source and
//!   adds each input to the stream, then prints what the workers send back as a local run
//!   would, writes the dead letters, and exits with a local run's exit code.
//! - A *worker* (`worker.rs`, with `--worker`, on any number of machines) reads the stream
//!   through a consumer group (flowline-redis's [`RedisStream`](flowline_redis::RedisStream):
//!   acknowledgements after the result is written, leases, reclaim of a dead worker's
//!   entries), runs the pipe's tasks with their policies, `rate(..)` and `inflight(..)`
//!   shared by every worker through Redis, and writes each result to a results stream.
//!
//! Limits read from files (`-j FILE`, `rate(FILE)`), which a local run reads again as jobs
//! end and at SIGUSR1, are refused with a queue: a worker's rate is shared by every worker
//! through Redis, and a run through a queue reads its options once.
//!
//! Per-key order (`key(..)` / `--key` on the first task, one input of a key at a time):
//! the feeder holds an input back while an earlier input of its key is fed and not ended
//! (`key_gate.rs`), so a key's inputs run one after another in input order across all the
//! workers, and other keys' inputs are fed meanwhile.
//!
//! The keys of a queue `NAME` share one hash tag, `flowline:{NAME}:...`. One hash,
//! `flowline:{NAME}:meta`, names the current run (`run`, an id the feeder draws when it
//! starts a new run) and holds its counts (`fed`, `failed`, `finished`); each run has keys
//! of its own, `flowline:{NAME}:RUN:...`: `jobs` (the inputs), `results` (what the workers
//! send back), `dead` (entries the stream source gave up on) and `ended` (a bitmap of the
//! inputs whose result the feeder has written out). A worker joins the run that is not
//! finished and ends with it (or when another run has taken the NAME): a worker started
//! just after a run finished waits for the next one, and a late worker of an old run
//! writes only to the old run's keys, never into the new run's.

pub mod feeder;
pub mod key_gate;
pub mod worker;

use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::spec::{Plan, Step};

/// The consumer group every worker reads in.
pub const GROUP: &str = "workers";

/// The longest queue name: its limits' names (`NAME.task`) must stay within 200 bytes.
const MAX_NAME: usize = 150;

/// A queue named on the command line: the server and the queue's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// `redis://HOST[:PORT]/`, as the Redis client takes it.
    pub server: String,
    /// The queue's name: the hash tag of its keys.
    pub name: String,
    /// The run whose keys [`key`](Self::key) names (empty until the run is known).
    pub run: String,
}

impl Queue {
    /// Reads `redis://[USER:PASSWORD@]HOST[:PORT]/NAME`; the error names the option and
    /// the value.
    pub fn parse(url: &str) -> Result<Queue, String> {
        let shown = without_password(url);
        let bad = |why: &str| format!("error: --queue `{shown}`: {why}");
        let Some(rest) = url.strip_prefix("redis://") else {
            return Err(bad("must be redis://HOST[:PORT]/NAME"));
        };
        let Some((host, name)) = rest.split_once('/') else {
            return Err(bad(
                "no queue NAME after the host: give redis://HOST[:PORT]/NAME",
            ));
        };
        if host.is_empty() || host.rsplit('@').next().is_some_and(str::is_empty) {
            return Err(bad("no HOST: give redis://HOST[:PORT]/NAME"));
        }
        if name.is_empty() {
            return Err(bad(
                "no queue NAME after the host: give redis://HOST[:PORT]/NAME",
            ));
        }
        if let Some(why) = bad_name(name) {
            return Err(bad(&format!("the queue NAME `{name}` {why}")));
        }
        let server = format!("redis://{host}/");
        if let Err(e) = redis::Client::open(server.as_str()) {
            return Err(bad(&format!("not a Redis address: {e}")));
        }
        Ok(Queue {
            server,
            name: name.to_string(),
            run: String::new(),
        })
    }

    /// The server as errors and logs name it: `redis HOST:PORT`, never its password.
    pub fn label(&self) -> String {
        let shown = without_password(&self.server);
        format!(
            "redis {}",
            shown.trim_start_matches("redis://").trim_end_matches('/')
        )
    }

    /// The key of the queue's `meta` hash: the current run and its counts.
    pub fn meta_key(&self) -> String {
        format!("flowline:{{{}}}:meta", self.name)
    }

    /// The key of one part of the current run (`jobs`, `results`, `dead`, `ended`).
    pub fn key(&self, part: &str) -> String {
        // A key built before the run is known would name no run's keys, silently.
        debug_assert!(!self.run.is_empty(), "queue key `{part}` before the run");
        format!("flowline:{{{}}}:{}:{part}", self.name, self.run)
    }

    /// The same queue, with the keys of run `run`.
    pub fn with_run(&self, run: &str) -> Queue {
        Queue {
            run: run.to_string(),
            ..self.clone()
        }
    }

    /// The keys of several parts.
    pub fn keys(&self, parts: &[&str]) -> Vec<String> {
        parts.iter().map(|p| self.key(p)).collect()
    }

    /// The name of a limit shared by the workers (`rate`, `inflight`) of this queue.
    pub fn limit_name(&self, what: &str) -> String {
        format!("{}.{what}", self.name)
    }
}

/// `url` with its password, if any, as `***`: an error message is no place for it.
fn without_password(url: &str) -> std::borrow::Cow<'_, str> {
    let Some(rest) = url.strip_prefix("redis://") else {
        return url.into();
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("redis://{user}:***{}", &rest[at..]).into()
        }
        None => url.into(),
    }
}

/// Why a queue's NAME cannot be used, if it cannot: it names keys and shared limits.
fn bad_name(name: &str) -> Option<&'static str> {
    if name.len() > MAX_NAME {
        return Some("is longer than 150 bytes");
    }
    if name
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '{' | '}' | '/'))
    {
        return Some("may not hold spaces, control characters, `{`, `}` or `/`");
    }
    None
}

/// What makes no sense for a pipe run through a queue, every problem at once.
pub fn check_plan(plan: &Plan) -> Vec<String> {
    let mut errors = Vec::new();
    if plan.branched {
        errors.push(
            "error: --queue: `branch | error:... success:...` is not supported with a queue; \
             failures go to the feeder's dead-letter file (--dead-letter)"
                .to_string(),
        );
    }
    if plan.main_tasks().next().is_none() {
        errors.push(
            "error: --queue: the pipe has no task (sh(..) or http(..)) for the workers to run"
                .to_string(),
        );
    }
    // The feeder keys the inputs it feeds: the key must be the first step's, over the
    // input itself, one input of a key at a time.
    for (i, step) in plan.main.steps.iter().enumerate() {
        let Step::Task(t) = step else { continue };
        let Some(k) = &t.policies.key else { continue };
        let key = k.template.escape_debug();
        if i > 0 {
            errors.push(format!(
                "error: --queue: `key({key})` on `{}`, not the first stage after the source: with a queue only the first task can be keyed (the feeder keys the inputs it feeds)",
                t.name
            ));
        } else if k.per_key > 1 {
            errors.push(format!(
                "error: --queue: `key({key}, {})`: with a queue one input of a key runs at a time (per_key 1)",
                k.per_key
            ));
        }
    }
    for step in &plan.main.steps {
        match step {
            Step::Dedup(_) => errors.push(
                "error: --queue: `dedup` is not supported with a queue (each worker sees only its own inputs)"
                    .to_string(),
            ),
            Step::Batch(..) => errors.push(
                "error: --queue: `batch` (and -n/-N/-X) is not supported with a queue: each input is one job"
                    .to_string(),
            ),
            Step::Task(t) => {
                if let Some(file) = &t.policies.rate_file {
                    errors.push(format!(
                        "error: --queue: `rate({})` of `{}`: a rate read from a file is not supported with a queue (the rate is shared by every worker through Redis and not read again); give it, like `rate(20/s)`",
                        file.display(),
                        t.name
                    ));
                }
            }
            Step::Filter { .. } => {}
        }
    }
    errors
}

/// A connection that reconnects by itself, made on first use: a feeder or a worker started
/// while Redis is down waits for it.
pub fn connect(server: &str) -> Result<ConnectionManager, String> {
    let shown = without_password(server);
    let client = redis::Client::open(server).map_err(|e| format!("--queue {shown}: {e}"))?;
    flowline_redis::connect_lazy(&client, Duration::from_secs(10))
        .map_err(|e| format!("--queue {shown}: {e}"))
}

/// A new run's id: the clock and the process, distinct for every feeder that starts a run
/// (two feeders of one NAME at once are refused anyway).
pub fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{:x}", std::process::id())
}

/// The queue's current run and whether it has finished, as `meta` holds them (`None` for
/// a queue without a run); an error when Redis does not answer.
pub async fn run_state(
    conn: &ConnectionManager,
    queue: &Queue,
) -> redis::RedisResult<(Option<String>, bool)> {
    let mut c = conn.clone();
    let (run, finished): (Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg(queue.meta_key())
        .arg("run")
        .arg("finished")
        .query_async(&mut c)
        .await?;
    Ok((run.filter(|r| !r.is_empty()), finished.is_some()))
}

/// The signals that stop a run (SIGINT, SIGTERM, SIGHUP), listened for from now on.
pub fn stop_signals() -> Result<flowline::UnixSignals, String> {
    flowline::UnixSignals::stop()
        .map_err(|e| format!("cannot listen for SIGINT, SIGTERM and SIGHUP: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_url_names_server_and_queue() {
        let q = Queue::parse("redis://10.0.0.5:6380/jobs").unwrap();
        assert_eq!(q.server, "redis://10.0.0.5:6380/");
        assert_eq!(q.name, "jobs");
        assert_eq!(q.meta_key(), "flowline:{jobs}:meta");
        assert_eq!(q.with_run("r1").key("jobs"), "flowline:{jobs}:r1:jobs");
        let q = Queue::parse("redis://:secret@host/j-1").unwrap();
        assert_eq!(q.server, "redis://:secret@host/");
        assert_eq!(q.label(), "redis :***@host");
    }

    #[test]
    fn bad_queue_urls_are_refused_naming_option_and_value() {
        for (url, says) in [
            ("http://h/jobs", "must be redis://"),
            ("redis://h", "no queue NAME"),
            ("redis://h/", "no queue NAME"),
            ("redis:///jobs", "no HOST"),
            ("redis://h/a b", "spaces"),
            ("redis://h/{x}", "`{`"),
            ("redis://h/a/b", "`/`"),
            ("", "must be redis://"),
        ] {
            let err = Queue::parse(url).unwrap_err();
            assert!(err.contains("--queue") && err.contains(url), "{err}");
            assert!(err.contains(says), "{url}: {err}");
        }
        let err = Queue::parse("redis://u:hunter2@h/a b").unwrap_err();
        assert!(
            !err.contains("hunter2") && err.contains("redis://u:***@h/a b"),
            "{err}"
        );
        let long = format!("redis://h/{}", "x".repeat(151));
        assert!(Queue::parse(&long).unwrap_err().contains("150 bytes"));
        assert!(Queue::parse(&format!("redis://h/{}", "x".repeat(150))).is_ok());
    }
}
