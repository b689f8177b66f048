//! Running one task call: a process (`sh`) or an HTTP request (`http`), with the stage's
//! timeout, and a line in the joblog.

use std::fmt;
use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;

use crate::jobs::Jobs;
use crate::spec::{Task, TaskKind};

/// What flows between stages: the current value and the inputs it came from (several after
/// `batch`), which are the keys of `--state`.
#[derive(Clone, Debug)]
pub struct Item {
    /// Position of the (first) input, from 1.
    pub seq: u64,
    /// The source inputs this item stands for.
    pub inputs: Arc<Vec<String>>,
    /// The current value: one text, or the texts of a batch.
    pub value: Value,
    /// Not run: a stop came before its task started. It passes the later steps untouched
    /// and ends neither done nor failed, so that a rerun with `--state` runs it.
    pub unfinished: bool,
    /// Already written to the sink, and recorded done, by the task that ends the chain.
    pub written: bool,
}

/// An item's value.
#[derive(Clone, Debug)]
pub enum Value {
    One(String),
    Many(Vec<String>),
}

impl Value {
    /// The value as one text (a batch: one line per member).
    pub fn joined(&self, sep: &str) -> String {
        match self {
            Value::One(s) => s.clone(),
            Value::Many(v) => v.join(sep),
        }
    }

    pub fn texts(&self) -> &[String] {
        match self {
            Value::One(s) => std::slice::from_ref(s),
            Value::Many(v) => v,
        }
    }
}

impl Item {
    pub fn new(seq: u64, input: String) -> Item {
        Item {
            seq,
            inputs: Arc::new(vec![input.clone()]),
            value: Value::One(input),
            unfinished: false,
            written: false,
        }
    }
}

/// Why a call failed, with what the process or server said.
#[derive(Clone, Debug, Default)]
pub struct CallError {
    pub message: String,
    /// Exit code of the process, or HTTP status.
    pub exit: Option<i32>,
    pub signal: Option<i32>,
    /// The end of the process's stderr, or the start of the HTTP body.
    pub stderr: String,
    /// A server's `Retry-After`.
    pub retry_after: Option<Duration>,
    /// What a failed process wrote on stdout, as it wrote it.
    pub stdout: Vec<u8>,
}

/// A failed item: what it was, where it failed, why.
#[derive(Clone, Debug)]
pub struct Fail {
    pub item: Item,
    /// Index of the failing step in the main chain (where `error:retry` starts again).
    pub step: usize,
    pub stage: String,
    pub error: CallError,
    pub attempts: u32,
}

/// The error a task returns to flowline: the whole failure, so that the dead-letter
/// target gets it back by downcasting.
#[derive(Debug)]
pub struct Failed(pub Box<Fail>);

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.error.message)
    }
}

impl std::error::Error for Failed {}

/// Keeps the last `n` bytes of a process's stderr (at a char boundary).
fn tail(bytes: &[u8], n: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim_end();
    if s.len() <= n {
        return s.to_string();
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    format!("...{}", &s[i..])
}

/// A call's output as the value of the next step: text, without the final line end (as
/// the shell's `$(...)` does).
pub fn text_of(bytes: &[u8]) -> String {
    let b = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let b = b.strip_suffix(b"\r").unwrap_or(b);
    String::from_utf8_lossy(b).into_owned()
}

/// A command ready to run: direct (no shell needed: split into words) or through `sh -c`.
#[derive(Debug, Clone)]
pub enum Command {
    Direct(Vec<String>),
    Shell(String),
}

impl Command {
    /// Runs the command directly when it has nothing a shell would interpret: one process
    /// per job instead of two.
    pub fn new(cmd: &str) -> Command {
        let probe = cmd.replace("{}", "").replace("{#}", "");
        let needs_shell = probe.chars().any(|c| {
            matches!(
                c,
                '|' | '&'
                    | ';'
                    | '<'
                    | '>'
                    | '('
                    | ')'
                    | '$'
                    | '`'
                    | '\\'
                    | '"'
                    | '\''
                    | '*'
                    | '?'
                    | '['
                    | ']'
                    | '#'
                    | '~'
                    | '='
                    | '%'
                    | '!'
                    | '{'
                    | '}'
                    | '\n'
            )
        });
        if needs_shell {
            Command::Shell(cmd.to_string())
        } else {
            Command::Direct(cmd.split_whitespace().map(String::from).collect())
        }
    }

    fn uses_item(&self) -> bool {
        match self {
            Command::Direct(w) => w.iter().any(|w| w.contains("{}")),
            Command::Shell(s) => s.contains("{}"),
        }
    }

    /// The program and its arguments for this item.
    fn argv(&self, item: &Item) -> Vec<String> {
        let seq = item.seq.to_string();
        match self {
            Command::Direct(words) => {
                let mut out = Vec::with_capacity(words.len());
                for w in words {
                    if w == "{}" {
                        out.extend(item.value.texts().iter().cloned());
                    } else {
                        out.push(
                            w.replace("{#}", &seq)
                                .replace("{}", &item.value.joined(" ")),
                        );
                    }
                }
                out
            }
            Command::Shell(s) => {
                let quoted: Vec<String> =
                    item.value.texts().iter().map(|t| shell_quote(t)).collect();
                let line = s.replace("{#}", &seq).replace("{}", &quoted.join(" "));
                vec!["/bin/sh".into(), "-c".into(), line]
            }
        }
    }
}

/// `'text'` with every `'` written as `'\''`: the shell reads it back as the exact text.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A task ready to call.
pub struct TaskRt {
    pub spec: Task,
    pub command: Option<Command>,
}

impl TaskRt {
    pub fn new(spec: Task) -> TaskRt {
        let command = match &spec.kind {
            TaskKind::Sh(cmd) => Some(Command::new(cmd)),
            TaskKind::Http { .. } => None,
        };
        TaskRt { spec, command }
    }
}

/// What every call needs: the HTTP client (one pool for the run) and the joblog.
pub struct Runner {
    pub http: reqwest::Client,
    pub joblog: Option<Mutex<std::fs::File>>,
    /// The running processes, each in its own group.
    pub jobs: Jobs,
}

impl Runner {
    pub fn new(pool: usize, joblog: Option<std::fs::File>, jobs: Jobs) -> Result<Runner, String> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(pool.max(1))
            .tcp_nodelay(true)
            .user_agent(concat!("flowline/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        let joblog = joblog.map(|mut f| {
            let _ = f.write_all(
                b"Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n",
            );
            Mutex::new(f)
        });
        Ok(Runner { http, joblog, jobs })
    }

    /// One call of `task` on `item`: the new value, or why it failed.
    pub async fn call(&self, task: &TaskRt, item: &Item) -> Result<Vec<u8>, CallError> {
        self.call_from(task, item, (SystemTime::now(), std::time::Instant::now()))
            .await
    }

    /// [`call`](Runner::call) for a job that the stage started at `started` (wall clock,
    /// monotonic): the joblog's start time is when the stage let the job through, not when
    /// the task running it got a thread.
    pub async fn call_from(
        &self,
        task: &TaskRt,
        item: &Item,
        (started, clock): (SystemTime, std::time::Instant),
    ) -> Result<Vec<u8>, CallError> {
        let mut log = LogLine::default();
        let work = async {
            match (&task.spec.kind, &task.command) {
                (TaskKind::Sh(_), Some(cmd)) => self.sh(cmd, item, &mut log).await,
                (TaskKind::Http { method, url, body }, _) => {
                    self.http(method, url, body.as_deref(), item, &mut log)
                        .await
                }
                (TaskKind::Sh(_), None) => Err(CallError {
                    message: "internal: command not prepared".into(),
                    ..CallError::default()
                }),
            }
        };
        let result = match task.spec.policies.timeout {
            Some(limit) => match tokio::time::timeout(limit, work).await {
                Ok(r) => r,
                // The process is killed when its future is dropped (kill_on_drop).
                Err(_) => Err(CallError {
                    message: format!("timed out after {limit:?}"),
                    signal: Some(9),
                    ..CallError::default()
                }),
            },
            None => work.await,
        };
        if let Some(joblog) = &self.joblog {
            let (exit, signal) = match &result {
                Ok(_) => (0, 0),
                Err(e) => (e.exit.unwrap_or(-1), e.signal.unwrap_or(0)),
            };
            let start = started
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let line = format!(
                "{}\t:\t{start:.3}\t{:.3}\t{}\t{}\t{exit}\t{signal}\t{}\n",
                item.seq,
                clock.elapsed().as_secs_f64(),
                log.sent,
                log.received,
                log.command.replace(['\t', '\n'], " "),
            );
            if let Ok(mut f) = joblog.lock() {
                let _ = f.write_all(line.as_bytes());
            }
        }
        result
    }

    async fn sh(
        &self,
        cmd: &Command,
        item: &Item,
        log: &mut LogLine,
    ) -> Result<Vec<u8>, CallError> {
        let argv = cmd.argv(item);
        log.command = argv.join(" ");
        if matches!(cmd, Command::Shell(_)) {
            log.command = argv.last().cloned().unwrap_or_default();
        }
        let stdin_data = if cmd.uses_item() {
            None
        } else {
            let mut s = item.value.joined("\n");
            s.push('\n');
            Some(s)
        };
        let (prog, args) = argv.split_first().ok_or_else(|| CallError {
            message: "empty command".into(),
            ..CallError::default()
        })?;
        let mut command = tokio::process::Command::new(prog);
        command
            .args(args)
            .stdin(if stdin_data.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| {
            let message = format!("cannot start `{prog}`: {e}");
            // What a shell would have said on the job's stderr.
            let _ = writeln!(std::io::stderr().lock(), "flowline: {message}");
            CallError {
                message,
                exit: Some(127),
                ..CallError::default()
            }
        })?;
        let group = child.id().map(|pid| self.jobs.started(pid));
        let stdin = child.stdin.take();
        let feed = async {
            if let (Some(mut pipe), Some(data)) = (stdin, stdin_data.as_deref()) {
                // A command that does not read its stdin closes the pipe: not an error.
                let _ = pipe.write_all(data.as_bytes()).await;
                log.sent = data.len();
            }
        };
        let (_, out) = tokio::join!(feed, child.wait_with_output());
        if let Some(g) = group {
            g.reaped();
        }
        let out = out.map_err(|e| CallError {
            message: format!("waiting for `{prog}`: {e}"),
            ..CallError::default()
        })?;
        log.received = out.stdout.len();
        // A job's stderr goes to stderr as one block, whether it failed or not.
        if !out.stderr.is_empty() {
            let _ = std::io::stderr().lock().write_all(&out.stderr);
        }
        if out.status.success() {
            return Ok(out.stdout);
        }
        use std::os::unix::process::ExitStatusExt;
        let (exit, signal) = (out.status.code(), out.status.signal());
        let message = match (exit, signal) {
            (Some(c), _) => format!("`{prog}` exited with {c}"),
            (None, Some(s)) => format!("`{prog}` killed by signal {s}"),
            _ => format!("`{prog}` failed"),
        };
        Err(CallError {
            message,
            exit,
            signal,
            stderr: tail(&out.stderr, 4096),
            retry_after: None,
            stdout: out.stdout,
        })
    }

    async fn http(
        &self,
        method: &str,
        url: &str,
        body: Option<&str>,
        item: &Item,
        log: &mut LogLine,
    ) -> Result<Vec<u8>, CallError> {
        let seq = item.seq.to_string();
        let url = url
            .replace("{#}", &seq)
            .replace("{}", &item.value.joined(","));
        log.command = format!("{method} {url}");
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| CallError {
            message: format!("bad method: {e}"),
            ..CallError::default()
        })?;
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            let b = b
                .replace("{#}", &seq)
                .replace("{}", &item.value.joined("\n"));
            log.sent = b.len();
            req = req.body(b);
        }
        let resp = req.send().await.map_err(|e| CallError {
            message: format!("{url}: {}", error_chain(&e)),
            ..CallError::default()
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(3600)));
        let bytes = resp.bytes().await.map_err(|e| CallError {
            message: format!("{url}: reading the body: {}", error_chain(&e)),
            exit: Some(i32::from(status.as_u16())),
            ..CallError::default()
        })?;
        log.received = bytes.len();
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        let text = String::from_utf8_lossy(&bytes);
        let mut start = text.len().min(512);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        Err(CallError {
            message: format!("{url}: HTTP {status}"),
            exit: Some(i32::from(status.as_u16())),
            signal: None,
            stderr: text[..start].to_string(),
            retry_after,
            stdout: Vec::new(),
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[derive(Default)]
struct LogLine {
    command: String,
    sent: usize,
    received: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_without_shell_syntax_run_directly() {
        assert!(matches!(Command::new("curl -fsS {}"), Command::Direct(_)));
        assert!(matches!(Command::new("echo {} | wc"), Command::Shell(_)));
        assert!(matches!(
            Command::new("sleep 0.1; echo {}"),
            Command::Shell(_)
        ));
        let item = Item {
            seq: 3,
            inputs: Arc::new(vec![]),
            value: Value::Many(vec!["a b".into(), "c".into()]),
            unfinished: false,
            written: false,
        };
        assert_eq!(Command::new("rm {}").argv(&item), ["rm", "a b", "c"]);
        assert_eq!(
            Command::new("echo {#}: {} > x").argv(&item)[2],
            "echo 3: 'a b' 'c' > x"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
