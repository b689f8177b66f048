//! Running one task call: a process (`sh`) or an HTTP request (`http`), with the stage's
//! timeout, and a line in the joblog.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::jobs::Jobs;
use crate::spec::{Task, TaskKind};
use crate::template::{Part, Template};

/// What flows between stages: the current value and the inputs it came from (several after
/// `batch`), which are the keys of `--state`. Inputs and values are bytes: nothing is
/// re-encoded on the way.
#[derive(Clone, Debug)]
pub struct Item {
    /// Position of the (first) input, from 1.
    pub seq: u64,
    /// The source inputs this item stands for.
    pub inputs: Arc<Vec<Vec<u8>>>,
    /// Its arguments as the source gave them (for `--tag`).
    pub args: Arc<Vec<Vec<u8>>>,
    /// The current value.
    pub value: Value,
    /// Already written to the sink by the task that ends the chain: the item ends there.
    pub written: bool,
}

/// An item's value.
#[derive(Clone, Debug)]
pub enum Value {
    /// One argument.
    One(Vec<u8>),
    /// Several arguments: a batch, the columns of `--colsep`, one per `:::` group.
    Many(Vec<Vec<u8>>),
    /// A job's output as it wrote it: printed as it is; as the next step's argument,
    /// without its final line end.
    Output(Vec<u8>),
}

impl Value {
    /// The arguments, joined by `sep`.
    pub fn joined(&self, sep: &[u8]) -> Vec<u8> {
        match self {
            Value::One(s) => s.clone(),
            Value::Many(v) => v.join(sep),
            Value::Output(o) => trim_line_end(o).to_vec(),
        }
    }

    /// The value as the arguments of a step.
    pub fn args(&self) -> std::borrow::Cow<'_, [Vec<u8>]> {
        match self {
            Value::One(s) => std::borrow::Cow::Borrowed(std::slice::from_ref(s)),
            Value::Many(v) => std::borrow::Cow::Borrowed(v),
            Value::Output(o) => std::borrow::Cow::Owned(vec![trim_line_end(o).to_vec()]),
        }
    }

    /// The value as text (JSON records, URLs): bytes that are not UTF-8 become U+FFFD
    /// there, and only there.
    pub fn text(&self, sep: &str) -> String {
        String::from_utf8_lossy(&self.joined(sep.as_bytes())).into_owned()
    }
}

/// Without the final `\n` (or `\r\n`), as the shell's `$(...)` reads an output.
pub fn trim_line_end(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

impl Item {
    pub fn new(seq: u64, input: Vec<u8>) -> Item {
        Item {
            seq,
            inputs: Arc::new(vec![input.clone()]),
            args: Arc::new(vec![input.clone()]),
            value: Value::One(input),
            written: false,
        }
    }

    /// An input of several arguments (its `--state` key: the arguments joined by a tab).
    pub fn with_args(seq: u64, args: Vec<Vec<u8>>) -> Item {
        Item {
            seq,
            inputs: Arc::new(vec![args.join(&b'\t')]),
            args: Arc::new(args.clone()),
            value: Value::Many(args),
            written: false,
        }
    }

    /// The inputs as text, for JSON records.
    pub fn input_texts(&self) -> Vec<String> {
        self.inputs
            .iter()
            .map(|i| String::from_utf8_lossy(i).into_owned())
            .collect()
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

/// A command ready to run: direct (no shell needed: split into words) or through `sh -c`.
#[derive(Debug, Clone)]
pub enum Command {
    Direct(Template),
    Shell(Template),
}

impl Command {
    /// Runs the command directly when it has nothing a shell would interpret: one process
    /// per job instead of two.
    pub fn new(cmd: &str) -> Command {
        let t = Template::parse(cmd);
        let needs_shell = t.parts.iter().any(|p| match p {
            Part::Text(text) => text.iter().any(|c| {
                matches!(
                    c,
                    b'|' | b'&'
                        | b';'
                        | b'<'
                        | b'>'
                        | b'('
                        | b')'
                        | b'$'
                        | b'`'
                        | b'\\'
                        | b'"'
                        | b'\''
                        | b'*'
                        | b'?'
                        | b'['
                        | b']'
                        | b'#'
                        | b'~'
                        | b'='
                        | b'%'
                        | b'!'
                        | b'{'
                        | b'}'
                        | b'\n'
                )
            }),
            _ => false,
        });
        // A shell's own commands (`exit`, `cd`, `export`, ...) exist only in a shell.
        let first = cmd.split_whitespace().next().unwrap_or_default();
        if needs_shell || SHELL_BUILTINS.contains(&first) {
            Command::Shell(t)
        } else {
            Command::Direct(t)
        }
    }

    fn template(&self) -> &Template {
        match self {
            Command::Direct(t) | Command::Shell(t) => t,
        }
    }

    pub fn uses_item(&self) -> bool {
        self.template().uses_args()
    }

    pub fn uses_slot(&self) -> bool {
        self.template().parts.contains(&Part::Slot)
    }

    /// The program and its arguments for this item.
    pub fn argv(&self, item: &Item, slot: usize) -> Vec<Vec<u8>> {
        let args = item.value.args();
        match self {
            Command::Direct(t) => t.words(&args, item.seq, slot),
            Command::Shell(t) => vec![
                b"/bin/sh".to_vec(),
                b"-c".to_vec(),
                t.render(&args, item.seq, slot),
            ],
        }
    }
}

/// How a job's output reaches `flowline`'s own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputMode {
    /// A job's output in one piece when it ends (parallel's default).
    #[default]
    Grouped,
    /// Whole lines as they come, lines of different jobs interleaved (`--line-buffer`).
    Lines,
    /// The job writes to `flowline`'s stdout and stderr itself (`-u`).
    Ungrouped,
}

/// What the command-line options change about every job.
#[derive(Debug, Clone, Default)]
pub struct JobOpts {
    pub output: OutputMode,
    /// `-v`: the command line before the job's output.
    pub verbose: bool,
    /// `--dry-run`: print the command lines, run nothing.
    pub dry_run: bool,
    /// `--nice N`.
    pub nice: Option<i32>,
    /// `--timeout N%`: a job is killed after N% of the median run time of the jobs that
    /// succeeded so far (from 3 of them on).
    pub timeout_percent: Option<f64>,
    /// `--results NAME`: each job's output kept in files, in GNU parallel's layout.
    pub results: Option<Arc<crate::results::Results>>,
    /// `--tag` / `--tagstring`: put before each line of a job's output, with a tab.
    pub tag: Option<Template>,
    /// `--load` / `--memfree`: a job starts only while the machine has room.
    pub gate: Option<crate::gate::StartGate>,
}

impl JobOpts {
    /// The tag of an item's output lines, with its tab.
    pub fn tag_of(&self, item: &Item) -> Option<Vec<u8>> {
        let t = self.tag.as_ref()?;
        let mut v = t.render_plain(&item.args, item.seq, 0);
        v.push(b'\t');
        Some(v)
    }
}

/// `out` with `tag` before each of its lines.
pub fn tagged(out: &[u8], tag: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(out.len() + tag.len() * 4);
    for line in out.split_inclusive(|&b| b == b'\n') {
        v.extend_from_slice(tag);
        v.extend_from_slice(line);
    }
    v
}

/// Copies whole lines from `pipe` to `out` as they come (each line in one write, so that
/// lines of different jobs do not mix); what is left without a line end at the end is
/// written last, as it is.
async fn pass_lines(
    pipe: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    out: &mut impl Write,
    tag: Option<&[u8]>,
) {
    let mut write = |b: &[u8]| {
        let b = match tag {
            Some(t) if !b.is_empty() => std::borrow::Cow::Owned(tagged(b, t)),
            _ => std::borrow::Cow::Borrowed(b),
        };
        let _ = out.write_all(&b).and_then(|_| out.flush());
    };
    let mut chunk = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = std::mem::take(buf);
    loop {
        let n = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        if let Some(end) = memchr::memrchr(b'\n', &pending) {
            write(&pending[..=end]);
            pending.drain(..=end);
        }
    }
    write(&pending);
}

/// Commands that are the shell's own, with no program of that name to run directly.
const SHELL_BUILTINS: &[&str] = &[
    ".", ":", "alias", "bg", "break", "cd", "command", "continue", "eval", "exec", "exit",
    "export", "fc", "fg", "getopts", "hash", "jobs", "read", "readonly", "return", "set", "shift",
    "source", "times", "trap", "type", "ulimit", "umask", "unalias", "unset", "wait", "if", "for",
    "while", "until", "case", "function",
];

/// The lowest free job slot for `{%}` (1 to the number of workers), as parallel numbers
/// them.
#[derive(Default)]
pub struct Slots(Mutex<std::collections::BTreeSet<usize>>, Mutex<usize>);

impl Slots {
    pub fn take(&self) -> usize {
        if let Ok(mut free) = self.0.lock() {
            if let Some(s) = free.pop_first() {
                return s;
            }
        }
        let mut n = self.1.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        *n
    }

    pub fn give(&self, slot: usize) {
        if let Ok(mut free) = self.0.lock() {
            free.insert(slot);
        }
    }
}

/// A task ready to call.
pub struct TaskRt {
    pub spec: Task,
    pub command: Option<Command>,
    /// An `http` task's URL and body, parsed once.
    pub request: Option<(Template, Option<Template>)>,
    pub slots: Slots,
}

impl TaskRt {
    pub fn new(spec: Task) -> TaskRt {
        let (command, request) = match &spec.kind {
            TaskKind::Sh(cmd) => (Some(Command::new(cmd)), None),
            TaskKind::Http { url, body, .. } => (
                None,
                Some((Template::parse(url), body.as_deref().map(Template::parse))),
            ),
        };
        TaskRt {
            spec,
            command,
            request,
            slots: Slots::default(),
        }
    }
}

/// A job on a task of its own, ended (its process killed) if the call is dropped, as on
/// a cancel.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One call of `task` on `item`, as a stage makes it. Starting a process is a blocking
/// system call: on a task of its own it does not hold up the stage's driver (and its rate
/// timer); dropping the call kills the process.
pub async fn call_job(
    runner: &Arc<Runner>,
    task: &Arc<TaskRt>,
    item: &Item,
) -> Result<Vec<u8>, CallError> {
    if task.command.is_none() {
        return runner.call(task, item).await;
    }
    let (r, t, i) = (runner.clone(), task.clone(), item.clone());
    let at = (SystemTime::now(), std::time::Instant::now());
    let mut job = AbortOnDrop(tokio::spawn(async move { r.call_from(&t, &i, at).await }));
    (&mut job.0).await.unwrap_or_else(|e| {
        Err(CallError {
            message: format!("job task ended: {e}"),
            ..CallError::default()
        })
    })
}

/// What every call needs: the HTTP client (one pool for the run) and the joblog.
pub struct Runner {
    pub http: reqwest::Client,
    pub joblog: Option<Mutex<std::fs::File>>,
    /// The running processes, each in its own group.
    pub jobs: Jobs,
    pub opts: JobOpts,
    /// Run times of the jobs that succeeded, for `--timeout N%`.
    runtimes: Runtimes,
    /// Where a job's stderr goes instead of this process's stderr (a queue's worker sends
    /// it back with the result), with the job's input number.
    stderr_to: Option<StderrSink>,
}

/// Takes a job's stderr, with its input number.
pub type StderrSink = Arc<dyn Fn(u64, &[u8]) + Send + Sync>;

/// The last run times of successful jobs (a window of 101: the median of the recent jobs,
/// found in constant time per job).
#[derive(Default)]
struct Runtimes(Mutex<VecDeque<Duration>>);

impl Runtimes {
    fn record(&self, d: Duration) {
        if let Ok(mut v) = self.0.lock() {
            if v.len() == 101 {
                v.pop_front();
            }
            v.push_back(d);
        }
    }

    fn median(&self) -> Option<Duration> {
        let v = self.0.lock().ok()?;
        if v.len() < 3 {
            return None;
        }
        let mut s: Vec<Duration> = v.iter().copied().collect();
        s.sort();
        Some(s[s.len() / 2])
    }
}

impl Runner {
    pub fn new(
        pool: usize,
        joblog: Option<std::fs::File>,
        jobs: Jobs,
        opts: JobOpts,
    ) -> Result<Runner, String> {
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
        Ok(Runner {
            http,
            joblog,
            jobs,
            opts,
            runtimes: Runtimes::default(),
            stderr_to: None,
        })
    }

    /// Jobs' stderr goes to `sink` rather than to this process's stderr.
    pub fn stderr_to(mut self, sink: StderrSink) -> Runner {
        self.stderr_to = Some(sink);
        self
    }

    /// `--timeout N%` as a time, once 3 jobs have succeeded.
    fn relative_limit(&self) -> Option<Duration> {
        let p = self.opts.timeout_percent?;
        let m = self.runtimes.median()?;
        Some(m.mul_f64(p / 100.0))
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
                (TaskKind::Sh(_), Some(cmd)) => self.sh(task, cmd, item, &mut log).await,
                (TaskKind::Http { method, .. }, _) => self.http(task, method, item, &mut log).await,
                (TaskKind::Sh(_), None) => Err(CallError {
                    message: "internal: command not prepared".into(),
                    ..CallError::default()
                }),
            }
        };
        // `--load` / `--memfree`: the job waits for room before it starts (and before its
        // timeout counts).
        if let (Some(gate), TaskKind::Sh(_), false) =
            (&self.opts.gate, &task.spec.kind, self.opts.dry_run)
        {
            gate.wait().await;
        }
        let limit = match (task.spec.policies.timeout, self.relative_limit()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let result = match limit {
            Some(limit) => match tokio::time::timeout(limit, work).await {
                Ok(r) => r,
                // The job's process group is killed when its future is dropped.
                Err(_) => Err(CallError {
                    message: format!("timed out after {limit:?}"),
                    signal: Some(9),
                    ..CallError::default()
                }),
            },
            None => work.await,
        };
        if result.is_ok() && self.opts.timeout_percent.is_some() {
            self.runtimes.record(clock.elapsed());
        }
        if let (Some(results), Some(_)) = (&self.opts.results, &task.command) {
            let (stdout, stderr): (&[u8], &[u8]) = match &result {
                Ok(o) => (o, b""),
                Err(e) => (&e.stdout, e.stderr.as_bytes()),
            };
            results.keep(&crate::results::Kept {
                seq: item.seq,
                args: &item.args,
                stdout,
                stderr,
            });
        }
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
        task: &TaskRt,
        cmd: &Command,
        item: &Item,
        log: &mut LogLine,
    ) -> Result<Vec<u8>, CallError> {
        let slot = if cmd.uses_slot() {
            task.slots.take()
        } else {
            0
        };
        let r = self.sh_in_slot(cmd, item, slot, log).await;
        if slot > 0 {
            task.slots.give(slot);
        }
        r
    }

    async fn sh_in_slot(
        &self,
        cmd: &Command,
        item: &Item,
        slot: usize,
        log: &mut LogLine,
    ) -> Result<Vec<u8>, CallError> {
        use std::os::unix::ffi::OsStrExt;
        let mut argv = cmd.argv(item, slot);
        // The command as a shell would read it, with its values quoted (as parallel shows it).
        let shown = cmd.template().render(&item.value.args(), item.seq, slot);
        log.command = String::from_utf8_lossy(&shown).into_owned();
        let mut head = Vec::new();
        if self.opts.verbose || self.opts.dry_run {
            head.extend_from_slice(&shown);
            head.push(b'\n');
        }
        if self.opts.dry_run {
            return Ok(head);
        }
        if let Some(n) = self.opts.nice {
            let mut v = vec![b"nice".to_vec(), b"-n".to_vec(), n.to_string().into_bytes()];
            v.append(&mut argv);
            argv = v;
        }
        let stdin_data = if cmd.uses_item() {
            None
        } else {
            let mut s = item.value.joined(b"\n");
            s.push(b'\n');
            Some(s)
        };
        let Some((prog, args)) = argv.split_first() else {
            return Err(CallError {
                message: "empty command".into(),
                ..CallError::default()
            });
        };
        let prog_shown = String::from_utf8_lossy(prog).into_owned();
        let ungrouped = self.opts.output == OutputMode::Ungrouped;
        let mut command = tokio::process::Command::new(std::ffi::OsStr::from_bytes(prog));
        command
            .args(args.iter().map(|a| std::ffi::OsStr::from_bytes(a)))
            .stdin(if stdin_data.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(if ungrouped {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .stderr(if ungrouped {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .process_group(0)
            .kill_on_drop(true);
        if ungrouped && !head.is_empty() {
            let _ = std::io::stdout().lock().write_all(&head);
            head.clear();
        }
        let mut child = command.spawn().map_err(|e| {
            let message = format!("cannot start `{prog_shown}`: {e}");
            // What a shell would have said on the job's stderr.
            let _ = writeln!(std::io::stderr().lock(), "flowline: {message}");
            CallError {
                message,
                exit: Some(127),
                ..CallError::default()
            }
        })?;
        let group = child.id().map(|pid| self.jobs.started(pid, &log.command));
        let stdin = child.stdin.take();
        let feed = async {
            if let (Some(mut pipe), Some(data)) = (stdin, stdin_data.as_deref()) {
                // A command that does not read its stdin closes the pipe: not an error.
                let _ = pipe.write_all(data).await;
                log.sent = data.len();
            }
        };
        let line_buffered = self.opts.output == OutputMode::Lines;
        let tag = self.opts.tag_of(item);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let read_out = async {
            let mut buf = head;
            if let Some(mut pipe) = stdout {
                if line_buffered {
                    pass_lines(&mut pipe, &mut buf, &mut std::io::stdout(), tag.as_deref()).await;
                } else {
                    let _ = pipe.read_to_end(&mut buf).await;
                }
            }
            buf
        };
        let read_err = async {
            let mut buf = Vec::new();
            if let Some(mut pipe) = stderr {
                if line_buffered {
                    pass_lines(&mut pipe, &mut buf, &mut std::io::stderr(), tag.as_deref()).await;
                } else {
                    let _ = pipe.read_to_end(&mut buf).await;
                }
            }
            buf
        };
        let (_, out, err, status) = tokio::join!(feed, read_out, read_err, async {
            // The pipes are read to their end first (join polls them all).
            child.wait().await
        });
        if let Some(g) = group {
            g.reaped();
        }
        let status = status.map_err(|e| CallError {
            message: format!("waiting for `{prog_shown}`: {e}"),
            ..CallError::default()
        })?;
        log.received = out.len();
        // A job's stderr goes to stderr as one block, whether it failed or not.
        if !err.is_empty() {
            match &self.stderr_to {
                Some(sink) => sink(item.seq, &err),
                None => {
                    let _ = std::io::stderr().lock().write_all(&err);
                }
            }
        }
        if status.success() {
            return Ok(out);
        }
        use std::os::unix::process::ExitStatusExt;
        let (exit, signal) = (status.code(), status.signal());
        let message = match (exit, signal) {
            (Some(c), _) => format!("`{prog_shown}` exited with {c}"),
            (None, Some(s)) => format!("`{prog_shown}` killed by signal {s}"),
            _ => format!("`{prog_shown}` failed"),
        };
        Err(CallError {
            message,
            exit,
            signal,
            stderr: tail(&err, 4096),
            retry_after: None,
            stdout: out,
        })
    }

    async fn http(
        &self,
        task: &TaskRt,
        method: &str,
        item: &Item,
        log: &mut LogLine,
    ) -> Result<Vec<u8>, CallError> {
        let Some((url, body)) = &task.request else {
            return Err(CallError {
                message: "internal: request not prepared".into(),
                ..CallError::default()
            });
        };
        // GNU parallel's replacement strings, values as they are (no shell quoting); `{}`
        // joins several values by `,` in the URL and by lines in the body. Bytes that are
        // not UTF-8 become U+FFFD here, and only here.
        let args = item.value.args();
        let render = |t: &Template, sep: &[u8]| {
            String::from_utf8_lossy(&t.render_joined(&args, item.seq, 0, sep, <[u8]>::to_vec))
                .into_owned()
        };
        let url = render(url, b",");
        log.command = format!("{method} {url}");
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| CallError {
            message: format!("bad method: {e}"),
            ..CallError::default()
        })?;
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            let b = render(b, b"\n");
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
            args: Arc::new(vec![]),
            value: Value::Many(vec![b"a b".to_vec(), b"c".to_vec()]),
            written: false,
        };
        assert_eq!(
            Command::new("rm {}").argv(&item, 1),
            [&b"rm"[..], b"a b", b"c"]
        );
        assert_eq!(
            Command::new("echo {#}: {} > x").argv(&item, 1)[2],
            b"echo 3: 'a b' c > x"
        );
    }

    #[test]
    fn slots_are_the_lowest_free() {
        let s = Slots::default();
        assert_eq!((s.take(), s.take(), s.take()), (1, 2, 3));
        s.give(2);
        assert_eq!(s.take(), 2);
        assert_eq!(s.take(), 4);
    }
}
