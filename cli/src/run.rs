//! A checked plan, built into one flowline graph and run.
//!
//! - The main chain is `source | steps`; each task is a flowline async stage with its
//!   policies (`workers`, `rate_limit`, `retry`, `circuit_breaker` pausing the source,
//!   `adaptive`, a shared `inflight`), so flowline's retry and breaker see every failure.
//! - A failure of the main chain goes to flowline's dead-letter target, a callback here.
//!   With an `error:` continuation the callback hands it to the continuation's source (a
//!   queue); otherwise it is written to the dead-letter file. Nothing is dropped.
//! - The continuation's queue closes once every input the source produced has left the
//!   main chain (delivered to the branch, dropped by a filter, or failed): counted per
//!   input, so that the run ends by itself.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use flowline::prelude::*;
use flowline::{Committed, Failure, ProgressOptions, SignalStep};
use tokio::sync::mpsc;

use crate::compat::Halt;
use crate::exec::{CallError, Fail, Failed, Item, Runner, TaskRt, Value};
use crate::input::{Reader, joblog_seqs, open_source, shuffled};
use crate::jobs::Jobs;
use crate::spec::{Plan, RetrySpec, Sink, Source, Step, Task, TaskKind};
use crate::state::{State, StateStore};
use crate::task_stage::{Gate, Policies, run_job, task_stage};

/// SIGUSR1, as GNU parallel takes it: the commands of `runner`'s running jobs on stderr,
/// then `also`, and the run goes on. To be called before anything could send it: the
/// signal's default action ends the process (a feeder, which runs no job, takes it too).
/// The task answering it, to abort at the end of the run.
pub(crate) fn on_sigusr1(
    runner: Option<Arc<Runner>>,
    also: impl Fn() + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let mut usr1 =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok()?;
    Some(tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            if let Some(runner) = &runner {
                let mut err = std::io::stderr().lock();
                for command in runner.jobs.commands() {
                    let _ = writeln!(err, "flowline: {command}");
                }
            }
            also();
        }
    }))
}

/// Command-line settings of a run.
pub struct Settings {
    pub jobs: usize,
    /// `-j FILE`: the file, read again as jobs end, and the CPUs its value counts from.
    pub jobs_file: Option<(PathBuf, usize)>,
    pub keep_order: bool,
    pub progress: bool,
    pub state: Option<PathBuf>,
    pub retry_failed: bool,
    pub joblog: Option<PathBuf>,
    pub dead_letter: PathBuf,
    pub quiet: bool,
    /// The byte that ends an input record (`\n`; NUL with `-0`).
    pub delim: u8,
    /// `--colsep`: splits each input into the arguments `{1}`, `{2}`, ...
    pub colsep: Option<regex::bytes::Regex>,
    pub job_opts: crate::exec::JobOpts,
    pub resume: Resume,
    pub halt: Option<Halt>,
    /// `--shuf`: the inputs in a random order (read them all first).
    pub shuffle: bool,
    /// After a first stop signal, how long the running jobs may take before they are
    /// killed (`None`: until a second signal).
    pub grace: Option<std::time::Duration>,
}

/// How a run ended.
pub struct Outcome {
    pub failures: u64,
    pub interrupted: bool,
    /// `--halt ...,fail=1` ended the run: the failing job's exit code.
    pub halted_by: Option<i32>,
}

impl Outcome {
    /// parallel's exit status: a halting job's own code, 130 after a stop, else the number of
    /// failures (101 for more than 100).
    pub fn exit_code(&self) -> u8 {
        match self.halted_by {
            Some(code) => code.clamp(0, 255) as u8,
            None if self.interrupted => 130,
            None => self.failures.min(101) as u8,
        }
    }
}

/// `--resume` / `--resume-failed`: which jobs of the joblog are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    No,
    /// Every job the joblog has.
    Done,
    /// The jobs the joblog has as succeeded.
    Failed,
}

/// A line-oriented output: stdout, a file opened for appending (written unbuffered, one
/// whole line per write, so `--state` never marks done an output still in a buffer), or
/// nothing.
pub(crate) enum Out {
    Stdout,
    File(Mutex<std::fs::File>),
    Discard,
}

impl Out {
    fn open(path: &Path) -> Result<Out, String> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(|f| Out::File(Mutex::new(f)))
            .map_err(|e| format!("cannot open {} for writing: {e}", path.display()))
    }

    fn line(&self, mut s: Vec<u8>) {
        s.push(b'\n');
        match self {
            Out::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&s);
            }
            Out::File(f) => {
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(&s);
                }
            }
            Out::Discard => {}
        }
    }

    /// Bytes as they are, in one write (flushed: `--state` may mark the input done next).
    fn bytes(&self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        match self {
            Out::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(b).and_then(|_| out.flush());
            }
            Out::File(f) => {
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(b);
                }
            }
            Out::Discard => {}
        }
    }
}

/// A sink's writer: used by the sink stage, and by a chain's last task to write its job's
/// output the moment the job ends.
pub(crate) struct Emit {
    out: Out,
    jsonl: bool,
    tag: Option<crate::exec::JobOpts>,
}

impl Emit {
    pub(crate) fn open(sink: &Option<Sink>, opts: &crate::exec::JobOpts) -> Result<Emit, String> {
        Ok(Emit {
            tag: opts.tag.is_some().then(|| opts.clone()),
            out: match sink {
                None | Some(Sink::Print) => Out::Stdout,
                Some(Sink::Discard) => Out::Discard,
                Some(Sink::File(path)) | Some(Sink::Jsonl(path)) => Out::open(path)?,
            },
            jsonl: matches!(sink, Some(Sink::Jsonl(_))),
        })
    }

    /// Whether a job's output is written as its bytes (not as a JSON record).
    pub(crate) fn takes_bytes(&self) -> bool {
        !self.jsonl
    }

    /// A job's output, exactly as the job wrote it.
    pub(crate) fn bytes(&self, b: &[u8]) {
        self.out.bytes(b);
    }

    /// An item: a JSON record, or its text as a line.
    pub(crate) fn item(&self, item: &Item) {
        if matches!(self.out, Out::Discard) {
            return;
        }
        let line = if self.jsonl {
            let mut v = serde_json::json!({ "seq": item.seq, "output": item.value.text("\n") });
            if let Some(o) = v.as_object_mut() {
                let mut inputs = item.input_texts();
                if inputs.len() == 1 {
                    o.insert("input".into(), inputs.swap_remove(0).into());
                } else {
                    o.insert("inputs".into(), inputs.into());
                }
            }
            v.to_string().into_bytes()
        } else if let Value::Output(out) = &item.value {
            // A job's output, exactly as it was written (with --tag, each line tagged).
            match self.tag.as_ref().and_then(|o| o.tag_of(item)) {
                Some(t) => self.out.bytes(&crate::exec::tagged(out, &t)),
                None => self.out.bytes(out),
            }
            return;
        } else {
            item.value.joined(b"\n")
        };
        self.out.line(line);
    }
}

/// The dead-letter file (`--dead-letter`): the library's JSON-lines dead letters, with
/// what a job's failure adds (its position, exit code or signal, stderr and inputs).
pub(crate) struct DeadFile(flowline::DeadLetterFile);

impl DeadFile {
    pub(crate) fn new(path: PathBuf) -> DeadFile {
        DeadFile(flowline::DeadLetterFile::new(path))
    }

    pub(crate) fn write(&self, fail: &Fail) {
        if let Err(e) = self.0.write(&failure_of(fail), fail_fields(fail)) {
            // The record still reaches the user, on stderr.
            eprintln!(
                "flowline: cannot write the dead-letter file {}: {e}; failure: {}",
                self.0.path().display(),
                fail_json(fail)
            );
        }
    }

    /// How many failures were written (or reported on stderr when the file could not be).
    pub(crate) fn written(&self) -> u64 {
        self.0.written()
    }
}

/// A job's failure as the library's.
fn failure_of(f: &Fail) -> Failure {
    Failure::new(
        f.stage.as_str(),
        flowline::ItemError::user(f.error.message.clone()),
        f.attempts,
    )
}

/// What a job's failure adds to the library's dead-letter line.
fn fail_fields(f: &Fail) -> serde_json::Map<String, serde_json::Value> {
    let mut o = serde_json::Map::new();
    o.insert("seq".into(), f.item.seq.into());
    o.insert("exit".into(), f.error.exit.into());
    o.insert("signal".into(), f.error.signal.into());
    o.insert("stderr".into(), f.error.stderr.clone().into());
    let mut inputs = f.item.input_texts();
    if inputs.len() == 1 {
        o.insert("input".into(), inputs.swap_remove(0).into());
    } else {
        o.insert("inputs".into(), inputs.into());
    }
    o
}

/// The dead-letter line of a job's failure.
fn fail_json(f: &Fail) -> serde_json::Value {
    flowline::DeadLetterFile::line(&failure_of(f), fail_fields(f))
}

/// What the closures of the graph share.
struct Ctx {
    runner: Arc<Runner>,
    /// `--state`: the idempotency store.
    state: Option<StateStore>,
    /// Inputs `--state` skipped as done in an earlier run (counted in `emitted` too).
    skipped_done: AtomicU64,
    dead: DeadFile,
    failures: AtomicU64,
    /// Inputs produced by the source, and inputs that have left the main chain.
    emitted: AtomicU64,
    left: AtomicU64,
    source_done: AtomicBool,
    /// The `error:` continuation's queue; `None` once closed (or without one).
    err_tx: Mutex<Option<mpsc::UnboundedSender<Fail>>>,
    /// Names of the main chain's tasks and their step index.
    main_steps: HashMap<String, usize>,
    /// A stop came: no task starts a job any more.
    stopping: AtomicBool,
    /// `--halt`, what it counts, and where it says to stop (`true`: now).
    halt: Option<Halt>,
    succeeded: AtomicU64,
    halt_tx: mpsc::UnboundedSender<bool>,
    halted_by: Mutex<Option<i32>>,
    /// Inputs that ended done or failed; the others the source produced were left
    /// unfinished by a stop.
    finished: AtomicU64,
    /// `-j FILE` and `rate(FILE)`: read again as jobs end.
    live: crate::live::LiveFiles,
}

impl Ctx {
    /// Counts a job's end against `--halt`; the first time the limit is reached, tells the
    /// signal task to stop (soon) or cancel (now).
    fn check_halt(&self, success: bool, exit: Option<i32>) {
        let Some(h) = &self.halt else { return };
        let (hits, done) = if success {
            let s = self.succeeded.fetch_add(1, Relaxed) + 1;
            (s, s + self.failures.load(Relaxed))
        } else {
            let f = self.failures.load(Relaxed);
            (f, f + self.succeeded.load(Relaxed))
        };
        if success != h.on_success || !h.reached(hits, done) {
            return;
        }
        if let Ok(mut g) = self.halted_by.lock() {
            if g.is_some() || self.stopping.load(Relaxed) {
                return;
            }
            // parallel exits with the failing job's code when one failure halts, else with
            // the number of failures (success: 0).
            *g = Some(match (success, h.limit) {
                (false, crate::compat::Limit::Count(1)) => exit.unwrap_or(1),
                (false, _) => hits.min(101) as i32,
                (true, _) => 0,
            });
        }
        let _ = self.halt_tx.send(h.now);
    }

    fn leave_main(&self, n: usize) {
        self.left.fetch_add(n as u64, Relaxed);
        self.maybe_close();
    }

    fn maybe_close(&self) {
        if self.source_done.load(Relaxed) && self.left.load(Relaxed) >= self.emitted.load(Relaxed) {
            if let Ok(mut g) = self.err_tx.lock() {
                g.take();
            }
        }
    }

    /// Counts an item done (`--state` records it as its ticket ends).
    fn done(&self, item: &Item) {
        self.finished.fetch_add(item.inputs.len() as u64, Relaxed);
        self.check_halt(true, None);
    }

    /// A failure that ends here: counted, recorded, written.
    fn final_failure(&self, fail: &Fail, out: Option<&Out>) {
        self.failures.fetch_add(1, Relaxed);
        self.check_halt(
            false,
            fail.error.exit.or(fail.error.signal.map(|s| 128 + s)),
        );
        self.finished
            .fetch_add(fail.item.inputs.len() as u64, Relaxed);
        match out {
            Some(o) => o.line(fail_json(fail).to_string().into_bytes()),
            None => self.dead.write(fail),
        }
    }

    /// flowline's dead-letter callback.
    fn on_failure(&self, f: &Failure) {
        let fail = fail_of(f, &self.main_steps);
        let in_main = self.main_steps.contains_key(&*f.stage);
        if in_main {
            let routed = match self.err_tx.lock() {
                Ok(g) => match g.as_ref() {
                    Some(tx) => tx.send(fail.clone()).is_ok(),
                    None => false,
                },
                Err(_) => false,
            };
            if !routed {
                self.final_failure(&fail, None);
            }
            self.leave_main(fail.item.inputs.len());
        } else {
            self.final_failure(&fail, None);
        }
    }
}

/// The failure flowline reports, with the item and the details of the call.
fn fail_of(f: &Failure, steps: &HashMap<String, usize>) -> Fail {
    if let flowline::ItemError::User(e) = &f.error {
        if let Some(Failed(b)) = e.downcast_ref::<Failed>() {
            let mut fail = (**b).clone();
            fail.attempts = f.attempts;
            return fail;
        }
    }
    let item = f
        .input
        .as_ref()
        .and_then(|i| i.downcast_ref::<Item>().cloned())
        .or_else(|| {
            f.input
                .as_ref()
                .and_then(|i| i.downcast_ref::<Fail>().map(|x| x.item.clone()))
        })
        .unwrap_or_else(|| Item::new(0, b"<input not kept>".to_vec()));
    Fail {
        item,
        step: steps.get(&*f.stage).copied().unwrap_or(0),
        stage: f.stage.to_string(),
        error: CallError {
            message: f.error.to_string(),
            ..CallError::default()
        },
        attempts: f.attempts,
    }
}

pub(crate) fn retry_policy(r: &RetrySpec) -> Retry {
    Retry::exponential(r.min)
        .max_delay(r.max)
        .max_attempts(r.retries.saturating_add(1))
        .jitter()
        .delay_hint(|e| match e {
            flowline::ItemError::User(err) => err
                .downcast_ref::<Failed>()
                .and_then(|f| f.0.error.retry_after),
            _ => None,
        })
}

/// The flowline objects of a task's policies, built once so that the error continuation
/// shares them (its calls count against the same rate and breaker).
#[derive(Clone, Default)]
pub(crate) struct Objects {
    pub(crate) rate: Option<Rate>,
    pub(crate) breaker: Option<Breaker>,
}

pub(crate) fn objects(t: &Task) -> Objects {
    let p = &t.policies;
    Objects {
        rate: p.rate.map(|(n, per, burst)| Rate::per(n, per).burst(burst)),
        breaker: p.breaker.map(|(n, cooldown)| {
            Breaker::consecutive_failures(n)
                .cooldown(cooldown)
                .on_open(OnOpen::Pause)
        }),
    }
}

struct Builder {
    ctx: Arc<Ctx>,
    settings_jobs: usize,
    keep_order: bool,
    inflights: HashMap<usize, Inflight>,
    /// The main chain's sink, when its last step may write to it directly.
    last: Option<Arc<Emit>>,
    /// `--state`: the commits' barrier, which every job waits for before it starts.
    committed: Option<Committed>,
}

impl Builder {
    fn inflight(&mut self, id: usize, n: usize) -> Inflight {
        self.inflights
            .entry(id)
            .or_insert_with(|| Inflight::new(n))
            .clone()
    }

    fn task(
        &mut self,
        p: Pipeline<Item>,
        t: &Task,
        rt: Arc<TaskRt>,
        step: usize,
        objs: &Objects,
        last: Option<&Arc<Emit>>,
    ) -> Pipeline<Item> {
        let ctx = self.ctx.clone();
        let last = last.cloned();
        let policies = Policies {
            rate: objs.rate.clone().map(Gate::Rate),
            inflight: t
                .policies
                .inflight
                .map(|(id, n)| Gate::Inflight(self.inflight(id, n))),
            breaker: objs.breaker.clone(),
            committed: self.committed.clone(),
        };
        // With `--state`, a written item ends in this stage, so that its commit is waited
        // for before any worker starts another job; without, it passes the sink by (and the
        // stage keeps its fast path).
        let ends_here = last.is_some() && self.committed.is_some();
        let call = move |item: Item| {
            let (ctx, rt, last) = (ctx.clone(), rt.clone(), last.clone());
            async move {
                let result = run_job(&ctx.runner, &rt, item, step).await;
                ctx.live.job_ended();
                let Some(emit) = &last else {
                    return result;
                };
                match result {
                    // The chain ends here: the output is written, and with `--state` the
                    // item ends in this stage (`done_if`), committed before any worker
                    // starts another job.
                    Ok(item) => {
                        emit.item(&item);
                        ctx.done(&item);
                        if ends_here {
                            // Not seen by the chain's end, which counts the others.
                            ctx.leave_main(item.inputs.len());
                        }
                        Ok(Item {
                            written: true,
                            ..item
                        })
                    }
                    Err(failed) => {
                        if emit.takes_bytes() {
                            emit.bytes(&failed.0.error.stdout);
                        }
                        Err(failed)
                    }
                }
            }
        };
        let mut stage =
            task_stage(p, t, self.settings_jobs, self.keep_order, policies, call).keep_input();
        if ends_here {
            stage = stage.done_if(|item| item.written);
        }
        if let Some(k) = &t.policies.key {
            stage = stage.key_by(k.key_fn()).per_key(k.per_key);
        }
        stage.into_pipeline()
    }

    /// The steps of a chain; `main` marks the main chain (whose drops leave it).
    fn steps(
        &mut self,
        mut p: Pipeline<Item>,
        steps: &[Step],
        main: bool,
        tasks: &[Option<(Arc<TaskRt>, Objects)>],
    ) -> Pipeline<Item> {
        for (i, step) in steps.iter().enumerate() {
            p = match step {
                Step::Task(t) => {
                    let (rt, objs) = match tasks.get(i).and_then(Option::as_ref) {
                        Some((rt, o)) if main => (rt.clone(), o.clone()),
                        _ => {
                            let o = objects(t);
                            (Arc::new(TaskRt::new(t.clone())), o)
                        }
                    };
                    let last = match &self.last {
                        Some(emit) if main && i + 1 == steps.len() => Some(emit.clone()),
                        _ => None,
                    };
                    self.task(p, t, rt, i, &objs, last.as_ref())
                }
                Step::Filter { re, keep } => {
                    let (re, keep, ctx) = (re.clone(), *keep, self.ctx.clone());
                    p.filter(move |item| {
                        let pass = item.value.args().iter().any(|t| re.is_match(t)) == keep;
                        if !pass {
                            ctx.done(item);
                            if main {
                                ctx.leave_main(item.inputs.len());
                            }
                        }
                        pass
                    })
                }
                Step::Dedup(window) => {
                    // A duplicate is done as its first was.
                    let ctx = self.ctx.clone();
                    p.dedup_by(
                        |item: &Item| item.value.joined(b"\n"),
                        Window::last(*window),
                    )
                    .on_duplicate(move |item| {
                        ctx.done(&item);
                        if main {
                            ctx.leave_main(item.inputs.len());
                        }
                    })
                    .into_pipeline()
                }
                Step::Batch(n, wait) => p.batch(*n, *wait).map(|items: Vec<Item>| {
                    let seq = items.first().map_or(0, |i| i.seq);
                    let mut inputs = Vec::new();
                    let mut values = Vec::new();
                    let mut args = Vec::new();
                    for it in items {
                        inputs.extend(it.inputs.iter().cloned());
                        args.extend(it.args.iter().cloned());
                        values.extend(it.value.args().iter().cloned());
                    }
                    Item {
                        seq,
                        inputs: Arc::new(inputs),
                        args: Arc::new(args),
                        value: Value::Many(values),
                        written: false,
                    }
                }),
            };
        }
        p
    }

    /// Ends `p` in `sink` (recording each item done).
    fn sink(&self, g: Graph, p: Pipeline<Item>, sink: &Option<Sink>) -> Result<Graph, String> {
        let emit = Arc::new(Emit::open(sink, &self.ctx.runner.opts)?);
        self.sink_to(g, p, emit)
    }

    /// Ends `p` in `emit`; items a final task already wrote pass by.
    fn sink_to(&self, g: Graph, p: Pipeline<Item>, emit: Arc<Emit>) -> Result<Graph, String> {
        let ctx = self.ctx.clone();
        Ok(g.for_each(p, move |item: Item| {
            if !item.written {
                emit.item(&item);
                ctx.done(&item);
            }
            std::future::ready(())
        }))
    }

    /// Ends the failures in `sink`: each one counted, recorded and written.
    fn fail_sink(&self, g: Graph, p: Pipeline<Fail>, sink: &Sink) -> Result<Graph, String> {
        let out = Arc::new(match sink {
            Sink::Print => Out::Stdout,
            Sink::Discard => Out::Discard,
            Sink::File(path) | Sink::Jsonl(path) => Out::open(path)?,
        });
        let as_inputs = matches!(sink, Sink::File(_) | Sink::Print);
        let ctx = self.ctx.clone();
        Ok(g.for_each(p, move |fail: Fail| {
            if as_inputs {
                // The inputs alone, one per line: ready to be fed to another run.
                ctx.failures.fetch_add(1, Relaxed);
                ctx.finished
                    .fetch_add(fail.item.inputs.len() as u64, Relaxed);
                for i in fail.item.inputs.iter() {
                    out.line(i.clone());
                }
            } else {
                ctx.final_failure(&fail, Some(&out));
            }
            std::future::ready(())
        }))
    }
}

/// Runs a plan to the end (or to Ctrl-C).
pub async fn run(plan: Plan, settings: Settings) -> Result<Outcome, String> {
    let inputs = Inputs::open(&plan, &settings).await?;
    let (err_tx, err_rx) = mpsc::unbounded_channel::<Fail>();
    let (halt_tx, halt_rx) = mpsc::unbounded_channel::<bool>();
    let ctx = Ctx::new(
        &plan,
        &settings,
        inputs.state,
        inputs.joblog,
        err_tx,
        halt_tx,
    )?;
    let stop_source = Arc::new(AtomicBool::new(false));
    let skipped = Arc::new(AtomicU64::new(0));
    let (src, committed) = source(
        &ctx,
        &settings,
        inputs.reader,
        inputs.total,
        inputs.skip_seqs,
        (stop_source.clone(), skipped.clone()),
    );
    let graph = graph(&plan, &settings, &ctx, (src, committed), err_rx)?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let graph = stop_on_signals(
        graph,
        &ctx,
        stop_source,
        halt_rx,
        settings.grace,
        interrupted.clone(),
    )?;
    let on_fail = ctx.clone();
    let handle = graph
        .dead_letter(DeadLetter::callback(move |f| on_fail.on_failure(f)))
        .spawn();
    ctx.live.started(handle.control());
    // SIGUSR1 also reads the limit files at once.
    let reread = {
        let ctx = ctx.clone();
        on_sigusr1(Some(ctx.runner.clone()), move || ctx.live.reread())
    };
    let result = handle.join().await;
    if let Some(r) = reread {
        r.abort();
    }
    skipped.fetch_add(ctx.skipped_done.load(Relaxed), Relaxed);
    finish(&ctx, &settings, result, &skipped, interrupted.load(Relaxed))
}

/// What a run starts from: the source opened, the jobs an earlier run did (by job number
/// with `--joblog --resume`; by input, `--state` skips them as they come), the state file
/// and the joblog.
struct Inputs {
    reader: Reader,
    /// How many inputs the source holds, when that is cheap to know.
    total: Option<u64>,
    skip_seqs: HashSet<u64>,
    state: Option<StateStore>,
    joblog: Option<std::fs::File>,
}

impl Inputs {
    async fn open(plan: &Plan, settings: &Settings) -> Result<Inputs, String> {
        // The state file says what failed (and, as inputs come, what is done).
        let (state, failed_before) = match &settings.state {
            Some(path) => {
                let State { store, failed } = State::open(path)?;
                (Some(store), failed)
            }
            None => {
                if settings.retry_failed {
                    return Err("--retry-failed needs --state FILE".into());
                }
                (None, Vec::new())
            }
        };
        let source = if settings.retry_failed {
            Source::Args(failed_before)
        } else {
            plan.source.clone()
        };
        let (reader, total) = open_source(&source, settings.progress, settings.delim).await?;
        let skip_seqs = match (&settings.joblog, settings.resume) {
            (Some(path), Resume::Done | Resume::Failed) => {
                joblog_seqs(path, settings.resume == Resume::Failed)
            }
            _ => HashSet::new(),
        };
        let joblog = match &settings.joblog {
            Some(path) => {
                let mut o = std::fs::OpenOptions::new();
                // A resumed run adds to the joblog, as parallel does.
                if settings.resume == Resume::No {
                    o.write(true).create(true).truncate(true);
                } else {
                    o.append(true).create(true);
                }
                Some(
                    o.open(path)
                        .map_err(|e| format!("--joblog {}: {e}", path.display()))?,
                )
            }
            None => None,
        };
        let (reader, total) = if settings.shuffle {
            shuffled(reader).await?
        } else {
            (reader, total)
        };
        Ok(Inputs {
            reader,
            total,
            skip_seqs,
            state,
            joblog,
        })
    }
}

impl Ctx {
    fn new(
        plan: &Plan,
        settings: &Settings,
        state: Option<StateStore>,
        joblog: Option<std::fs::File>,
        err_tx: mpsc::UnboundedSender<Fail>,
        halt_tx: mpsc::UnboundedSender<bool>,
    ) -> Result<Arc<Ctx>, String> {
        let max_workers = plan
            .main_tasks()
            .map(|t| t.policies.fork.unwrap_or(settings.jobs))
            .max()
            .unwrap_or(settings.jobs);
        let main_steps: HashMap<String, usize> = plan
            .main
            .steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Step::Task(t) => Some((t.name.clone(), i)),
                _ => None,
            })
            .collect();
        let runs_processes = plan.main_tasks().any(|t| matches!(t.kind, TaskKind::Sh(_)));
        let mut live = crate::live::LiveFiles::default();
        if let Some((path, cpus)) = &settings.jobs_file {
            let from_jobs = plan.main_tasks().filter(|t| t.policies.fork.is_none());
            live.jobs(
                path.clone(),
                *cpus,
                from_jobs.map(|t| t.name.clone()).collect(),
            );
        }
        for t in plan.main_tasks() {
            if let Some(path) = &t.policies.rate_file {
                live.rate(path.clone(), t.name.clone());
            }
        }
        let jobs = if runs_processes {
            Jobs::new()
        } else {
            Jobs::none()
        };
        Ok(Arc::new(Ctx {
            runner: Arc::new(Runner::new(
                max_workers,
                joblog,
                jobs,
                settings.job_opts.clone(),
            )?),
            state,
            skipped_done: AtomicU64::new(0),
            dead: DeadFile::new(settings.dead_letter.clone()),
            failures: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            left: AtomicU64::new(0),
            source_done: AtomicBool::new(false),
            err_tx: Mutex::new(plan.error.is_some().then_some(err_tx)),
            main_steps,
            stopping: AtomicBool::new(false),
            halt: settings.halt,
            succeeded: AtomicU64::new(0),
            halt_tx,
            halted_by: Mutex::new(None),
            live,
            finished: AtomicU64::new(0),
        }))
    }
}

/// The source as a pipeline: skips the jobs `--resume` says were done (counted in
/// `skipped`), counts what it produces, and ends when `stop` is set (a stop signal: nothing
/// new is read). With `--state`, then the idempotent stage over the state file, which skips
/// the inputs done in an earlier run; its commits' barrier is returned for the tasks.
fn source(
    ctx: &Arc<Ctx>,
    settings: &Settings,
    reader: Reader,
    total: Option<u64>,
    skip_seqs: HashSet<u64>,
    (stop, skipped): (Arc<AtomicBool>, Arc<AtomicU64>),
) -> (Pipeline<Item>, Option<Committed>) {
    let reader = Arc::new(tokio::sync::Mutex::new(reader));
    let skip_seqs = Arc::new(skip_seqs);
    let colsep = settings.colsep.clone();
    let seq = Arc::new(AtomicU64::new(0));
    let source_ctx = ctx.clone();
    let src = Pipeline::try_from_fn(move || {
        let colsep = colsep.clone();
        let skip_seqs = skip_seqs.clone();
        let (ctx, skipped, reader, seq, stop) = (
            source_ctx.clone(),
            skipped.clone(),
            reader.clone(),
            seq.clone(),
            stop.clone(),
        );
        async move {
            let mut r = reader.lock().await;
            loop {
                if stop.load(Relaxed) {
                    ctx.source_done.store(true, Relaxed);
                    ctx.maybe_close();
                    return Ok(None);
                }
                let next = r.next_args(colsep.as_ref()).await;
                let n = seq.fetch_add(1, Relaxed) + 1;
                match next {
                    Ok(Some(mut args)) => {
                        let item = if args.len() == 1 {
                            Item::new(n, args.swap_remove(0))
                        } else {
                            Item::with_args(n, args)
                        };
                        if skip_seqs.contains(&n) {
                            skipped.fetch_add(1, Relaxed);
                            continue;
                        }
                        ctx.emitted.fetch_add(1, Relaxed);
                        return Ok(Some(item));
                    }
                    Ok(None) => {
                        ctx.source_done.store(true, Relaxed);
                        ctx.maybe_close();
                        return Ok(None);
                    }
                    Err(e) => {
                        ctx.source_done.store(true, Relaxed);
                        ctx.maybe_close();
                        return Err(e);
                    }
                }
            }
        }
    });
    let src = if settings.progress {
        let mut opts = ProgressOptions::new();
        if let Some(t) = total {
            opts = opts.total(t);
        }
        src.progress_with(opts)
    } else {
        src
    };
    match &ctx.state {
        Some(store) => {
            let skipping = ctx.clone();
            let stage = src
                .idempotent(store.clone(), |item: &Item| {
                    crate::state::key(&item.inputs[0])
                })
                // A duplicate input waits for its first, however long that job takes.
                .busy_wait(std::time::Duration::MAX)
                .on_skip(move |item| {
                    skipping.skipped_done.fetch_add(1, Relaxed);
                    skipping.leave_main(item.inputs.len());
                });
            let committed = stage.committed();
            (stage.into_pipeline(), Some(committed))
        }
        None => (src, None),
    }
}

/// The whole graph: the main chain from `src`, then its sink, or the branch's two arms (the
/// failures of the main chain arrive on `err_rx`).
fn graph(
    plan: &Plan,
    settings: &Settings,
    ctx: &Arc<Ctx>,
    (src, committed): (Pipeline<Item>, Option<Committed>),
    err_rx: mpsc::UnboundedReceiver<Fail>,
) -> Result<Graph, String> {
    // The main chain, its tasks built once (the error continuation reuses them).
    let tasks: Vec<Option<(Arc<TaskRt>, Objects)>> = plan
        .main
        .steps
        .iter()
        .map(|s| match s {
            Step::Task(t) => Some((Arc::new(TaskRt::new(t.clone())), objects(t))),
            _ => None,
        })
        .collect();
    let mut b = Builder {
        ctx: ctx.clone(),
        settings_jobs: settings.jobs,
        keep_order: settings.keep_order,
        inflights: HashMap::new(),
        last: None,
        committed,
    };
    // Without a branch and in finishing order, the last task writes each output itself the
    // moment its job ends, and records the input done before its worker takes the next.
    // Not when several jobs of a key run at once: a key's later job may end first, and
    // only the stage's output holds it back for the earlier one.
    let several_per_key = match plan.main.steps.last() {
        Some(Step::Task(t)) => t.policies.key.as_ref().is_some_and(|k| k.per_key > 1),
        _ => false,
    };
    let direct = !plan.branched && !settings.keep_order && !several_per_key;
    let main_emit = Arc::new(Emit::open(&plan.main.sink, &settings.job_opts)?);
    if direct {
        b.last = Some(main_emit.clone());
    }
    let main = b.steps(src, &plan.main.steps, true, &tasks);
    b.last = None;
    let main = {
        let ctx = ctx.clone();
        main.inspect(move |item| ctx.leave_main(item.inputs.len()))
    };

    let mut graph = Graph::new();
    if !plan.branched {
        return b.sink_to(graph, main, main_emit);
    }
    let success = plan.success.clone().unwrap_or_default();
    let mut ok_path = main;
    if let Some(arm) = &plan.error {
        let rx = Arc::new(tokio::sync::Mutex::new(err_rx));
        let failures = Pipeline::from_fn(move || {
            let rx = rx.clone();
            async move { rx.lock().await.recv().await }
        });
        match &arm.retry {
            None => {
                let sink = arm.chain.sink.clone().unwrap_or(Sink::Print);
                graph = b.fail_sink(graph, failures, &sink)?;
            }
            Some(r) => {
                let recovered = retry_arm(&mut b, failures, r, plan, &tasks, settings.jobs);
                if arm.chain.steps.is_empty() && arm.chain.sink.is_none() {
                    ok_path = ok_path.merge_with(recovered);
                } else {
                    let p = b.steps(recovered, &arm.chain.steps, false, &[]);
                    graph = b.sink(graph, p, &arm.chain.sink)?;
                }
            }
        }
    }
    let p = b.steps(ok_path, &success.steps, false, &[]);
    b.sink(graph, p, &success.sink)
}

/// Why the run stops, as the signal hook sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// SIGINT, SIGTERM or SIGHUP.
    Signal,
    /// `--halt ...` (or a state file that cannot be written): stop soon.
    Halt,
    /// `--halt now,...`: kill the running jobs and cancel at once.
    HaltNow,
}

/// flowline's stop on a signal, for the CLI: the first SIGINT, SIGTERM or SIGHUP (or
/// `--halt`) starts nothing new, lets the running jobs finish and reports what was left; a
/// second one (or the end of `--grace`, or `--halt now`) kills every running job's group
/// before the run is cancelled.
fn stop_on_signals(
    graph: Graph,
    ctx: &Arc<Ctx>,
    stop_source: Arc<AtomicBool>,
    halt_rx: mpsc::UnboundedReceiver<bool>,
    grace: Option<std::time::Duration>,
    interrupted: Arc<AtomicBool>,
) -> Result<Graph, String> {
    // Listening from now on: a signal that comes before the run starts is not missed.
    let signals = crate::queue::stop_signals()?;
    let halt_rx = Arc::new(tokio::sync::Mutex::new(halt_rx));
    let cause: Arc<Mutex<Option<Cause>>> = Arc::default();
    let heard = cause.clone();
    let signal = move || {
        let (signals, halt_rx, cause) = (signals.clone(), halt_rx.clone(), heard.clone());
        async move {
            let mut halt_rx = halt_rx.lock().await;
            let before = *cause.lock().unwrap_or_else(|p| p.into_inner());
            match before {
                // `--halt now`: the cancel follows the stop at once.
                Some(Cause::HaltNow) => {}
                // After the stop, only a signal (or `--grace`) kills.
                Some(_) => signals.recv().await,
                None => {
                    let first = tokio::select! {
                        () = signals.recv() => Cause::Signal,
                        Some(now) = halt_rx.recv() => if now { Cause::HaltNow } else { Cause::Halt },
                    };
                    *cause.lock().unwrap_or_else(|p| p.into_inner()) = Some(first);
                }
            }
            Ok(())
        }
    };
    let ctx = ctx.clone();
    let hook = move |step: SignalStep| {
        let cause = cause
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(Cause::Signal);
        match step {
            SignalStep::Stop => {
                interrupted.store(cause == Cause::Signal, Relaxed);
                ctx.stopping.store(true, Relaxed);
                stop_source.store(true, Relaxed);
                if cause == Cause::HaltNow {
                    let killed = ctx.runner.jobs.kill_all();
                    eprintln!("flowline: --halt now: killed {killed} running job(s)");
                } else {
                    eprintln!(
                        "\nflowline: stopping: starting nothing new, waiting for {} running job(s) (again to kill them)",
                        ctx.runner.jobs.running()
                    );
                }
            }
            _ => {
                let killed = ctx.runner.jobs.kill_all();
                if cause != Cause::HaltNow {
                    eprintln!(
                        "\nflowline: cancelling: killed {killed} running job(s) and their process groups"
                    );
                }
            }
        }
    };
    let graph = graph.stop_on_signal(signal).on_signal(hook);
    Ok(match grace {
        Some(grace) => graph.signal_grace(grace),
        None => graph,
    })
}

/// After the graph ended: everything recorded and flushed, the report and the summary line
/// printed, and how the run ended.
fn finish(
    ctx: &Ctx,
    settings: &Settings,
    result: Result<flowline::Report, flowline::Error>,
    skipped: &AtomicU64,
    interrupted: bool,
) -> Result<Outcome, String> {
    // Failures still queued for a continuation that stopped pulling end in the dead-letter
    // file: never lost.
    if let Ok(mut g) = ctx.err_tx.lock() {
        g.take();
    }
    if let (Some(s), Err(e @ flowline::Error::Outage { .. })) = (&ctx.state, &result) {
        // The state file could not be written past the outage policy (locked too long), or
        // cannot be at all (read-only, full, not a database): what ended since is not
        // recorded, and the run stopped.
        if e.to_string().contains("idempotency store") {
            return Err(format!("{}: cannot record progress: {e}", s.what()));
        }
    }
    if let Some(j) = &ctx.runner.joblog {
        if let Ok(mut f) = j.lock() {
            let _ = f.flush();
        }
    }
    let report = match &result {
        Ok(r) => Some(r.clone()),
        Err(e) => e.report().cloned(),
    };
    if !settings.quiet {
        if let Some(r) = &report {
            eprintln!("{r}");
        }
    }
    let cancelled = matches!(result, Err(flowline::Error::Cancelled { .. }));
    if let Err(e) = &result {
        if !cancelled {
            return Err(format!("{e}"));
        }
    }
    let failures = ctx.failures.load(Relaxed);
    let dead = ctx.dead.written();
    if !settings.quiet {
        let skipped = skipped.load(Relaxed);
        let mut line = format!(
            "flowline: {} inputs, {failures} failed",
            ctx.emitted.load(Relaxed)
        );
        let unfinished = ctx
            .emitted
            .load(Relaxed)
            .saturating_sub(ctx.finished.load(Relaxed));
        if interrupted || cancelled {
            line.push_str(&format!(
                ", {unfinished} left unfinished (not started; a rerun with --state runs them)"
            ));
        }
        if skipped > 0 {
            line.push_str(&format!(", {skipped} skipped (done in an earlier run)"));
        }
        if let Some(r) = &report {
            line.push_str(&key_waits(r));
        }
        if dead > 0 {
            line.push_str(&format!(
                "; failures written to {}",
                settings.dead_letter.display()
            ));
        }
        eprintln!("{line}");
    }
    let halted_by = ctx.halted_by.lock().ok().and_then(|g| *g);
    Ok(Outcome {
        failures,
        interrupted: (interrupted || cancelled) && halted_by.is_none(),
        halted_by,
    })
}

/// For the summary line: how many inputs waited behind an earlier one of their key, per
/// keyed stage that had any (`, 12 waited for their key in sh`).
fn key_waits(r: &flowline::Report) -> String {
    r.stages
        .iter()
        .filter(|s| s.key_waits > 0)
        .map(|s| format!(", {} waited for their key in {}", s.key_waits, s.name))
        .collect()
}

/// `error:retry(..)`: runs the failed task, and the steps of the main chain after it,
/// again, with flowline's retry; shares the main tasks' rate limit and breaker.
fn retry_arm(
    b: &mut Builder,
    failures: Pipeline<Fail>,
    r: &RetrySpec,
    plan: &Plan,
    tasks: &[Option<(Arc<TaskRt>, Objects)>],
    jobs: usize,
) -> Pipeline<Item> {
    let steps = Arc::new(plan.main.steps.clone());
    let tasks_rt: Arc<Vec<Option<Arc<TaskRt>>>> = Arc::new(
        tasks
            .iter()
            .map(|t| t.as_ref().map(|(rt, _)| rt.clone()))
            .collect(),
    );
    let ctx = b.ctx.clone();
    let workers = plan
        .main_tasks()
        .last()
        .and_then(|t| t.policies.fork)
        .unwrap_or(jobs);
    // With `--state`, a failure taken up again is tracked anew: done once it ends done,
    // failed again if it fails again (the main chain marked it failed as it left).
    let (failures, committed) = match &b.ctx.state {
        Some(store) => {
            let stage = failures
                .idempotent(store.clone(), |f: &Fail| {
                    crate::state::key_of(&f.item.inputs)
                })
                // The main chain's mark of the failure may not be written yet.
                .busy_wait(std::time::Duration::MAX);
            let committed = stage.committed();
            (stage.into_pipeline(), Some(committed))
        }
        None => (failures, None),
    };
    let mut stage = failures
        .try_map_async("error:retry", move |fail: Fail| {
            let (ctx, steps, tasks) = (ctx.clone(), steps.clone(), tasks_rt.clone());
            async move {
                let mut item = fail.item;
                for i in fail.step..steps.len() {
                    match (&steps[i], tasks.get(i).and_then(Option::as_ref)) {
                        (Step::Task(t), Some(rt)) => match ctx.runner.call(rt, &item).await {
                            Ok(v) => item.value = crate::task_stage::output_value(rt, v),
                            Err(error) => {
                                return Err(Failed(Box::new(Fail {
                                    item,
                                    step: i,
                                    stage: t.name.clone(),
                                    error,
                                    attempts: 1,
                                })));
                            }
                        },
                        (Step::Filter { re, keep }, _)
                            if item.value.args().iter().any(|t| re.is_match(t)) != *keep =>
                        {
                            ctx.done(&item);
                            return Ok(None);
                        }
                        // A single item is not batched or deduplicated again.
                        _ => {}
                    }
                }
                Ok(Some(item))
            }
        })
        .workers(workers)
        .keep_input()
        .unordered()
        .retry(retry_policy(r));
    let objs = tasks.iter().flatten().map(|(_, o)| o);
    if let Some(rate) = objs.clone().find_map(|o| o.rate.clone()) {
        stage = stage.rate_limit(rate);
    }
    if let Some(br) = objs.clone().find_map(|o| o.breaker.clone()) {
        stage = stage.circuit_breaker(br);
    }
    if let Some(c) = committed {
        stage = stage.limit(c);
    }
    stage.filter_map(|x| x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Policies, TaskKind};
    use std::time::Duration;

    fn task(p: Policies) -> Task {
        Task {
            name: "t".into(),
            kind: TaskKind::Sh("true".into()),
            policies: p,
        }
    }

    /// `rate(4/s)` as built for a task: 9 calls take 2 s on the paused clock.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn rate_stage_paces_calls() {
        let o = objects(&task(Policies {
            rate: Some((4, Duration::from_secs(1), 1)),
            ..Policies::default()
        }));
        let t = tokio::time::Instant::now();
        let out = Pipeline::from_iter(0..9u32)
            .map_async("t", |x| async move { x })
            .workers(8)
            .rate_limit(o.rate.unwrap())
            .collect()
            .await
            .unwrap();
        assert_eq!(out.len(), 9);
        assert_eq!(t.elapsed(), Duration::from_secs(2));
    }

    /// `retry(3, 100ms..100ms)`: 4 attempts, then the failure, on the paused clock.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn retry_stage_backs_off_and_gives_up() {
        let r = RetrySpec {
            retries: 3,
            min: Duration::from_millis(100),
            max: Duration::from_millis(100),
        };
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let t = tokio::time::Instant::now();
        let report = Pipeline::from_iter([1u32])
            .try_map_async("t", move |_| {
                c.fetch_add(1, Relaxed);
                async { Err::<u32, _>("down") }
            })
            .retry(retry_policy(&r))
            .run()
            .await
            .unwrap();
        assert_eq!(calls.load(Relaxed), 4);
        assert_eq!(report.failure_sample[0].attempts, 4);
        // Full jitter: each wait is at most the 100 ms cap.
        assert!(t.elapsed() <= Duration::from_millis(300));
    }

    /// A `Retry-After` from the server replaces the backoff.
    #[test]
    fn retry_reads_retry_after() {
        let r = retry_policy(&RetrySpec {
            retries: 1,
            min: Duration::from_millis(1),
            max: Duration::from_millis(1),
        });
        let err = flowline::ItemError::user(Failed(Box::new(Fail {
            item: Item::new(1, "x".into()),
            step: 0,
            stage: "http".into(),
            error: CallError {
                retry_after: Some(Duration::from_secs(3)),
                ..CallError::default()
            },
            attempts: 1,
        })));
        assert_eq!(r.hint_of(&err), Some(Duration::from_secs(3)));
    }
}
