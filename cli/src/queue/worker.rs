//! A worker: reads the queue's inputs through the consumer group, runs the pipe's tasks
//! with their policies, and writes each input's result to the results stream; the entry
//! is acknowledged only once its result is written (the stream source acknowledges an
//! entry when its item has ended, and the item ends in the results stream's sink).
//!
//! A job's stderr goes back with its result (the feeder writes it out as one block). A job
//! that fails (after its retries) is a result too: the failure, its exit code and stderr,
//! for the feeder's dead-letter file. `rate(..)` and `inflight(..)` are shared by
//! every worker of the queue ([`RedisRate`], [`RedisInflight`]). A worker killed with
//! SIGKILL leaves its entries pending; the other workers take them over after `--lease`
//! (at least once: a job in flight on the killed worker runs again elsewhere). A worker
//! joins the queue's unfinished run (waiting for one if there is none) and ends when the
//! feeder has marked that run finished or another run has taken the queue, letting its
//! running jobs finish.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use flowline_redis::{
    RedisInflight, RedisRate, RedisStream, StreamEntry, StreamOptions, StreamSink,
};

use super::feeder::{args_of, item_of};
use super::{GROUP, Queue};
use crate::exec::{Fail, Failed, Item, Runner, TaskRt, Value};
use crate::jobs::Jobs;
use crate::run::{Outcome, Settings, objects};
use crate::spec::{Plan, Step, Task, TaskKind};
use crate::task_stage::{Gate, Policies, run_job, task_stage};

/// An input on its way through the worker's tasks.
#[derive(Clone, Debug)]
struct Job {
    item: Item,
    end: End,
}

/// Where an input stands.
#[derive(Clone, Debug)]
enum End {
    /// Going on to the next step.
    Open,
    /// Dropped by a filter: done, nothing to write out.
    Skipped,
    Failed(Box<Fail>),
}

/// The job of a stream entry; an entry without a position (not the feeder's) is skipped,
/// and its result (position 0) ignored by the feeder.
fn job_of(e: &StreamEntry) -> Job {
    let fields: HashMap<String, Vec<u8>> = e.fields().iter().cloned().collect();
    let seq = fields
        .get("seq")
        .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u64>().ok());
    match seq {
        Some(seq) => Job {
            item: item_of(seq, args_of(&fields)),
            end: End::Open,
        },
        None => Job {
            item: Item::new(0, Vec::new()),
            end: End::Skipped,
        },
    }
}

/// The fields of a job's result, as the feeder reads them; `stderr`: what its jobs wrote
/// there.
fn result_fields(job: &Job, stderr: Vec<u8>) -> Vec<(String, Vec<u8>)> {
    let mut f = vec![
        ("seq".to_string(), job.item.seq.to_string().into_bytes()),
        ("errout".to_string(), stderr),
    ];
    for (i, a) in job.item.args.iter().enumerate() {
        f.push((format!("a{i}"), a.clone()));
    }
    let mut put = |k: &str, v: Vec<u8>| f.push((k.to_string(), v));
    match &job.end {
        End::Open => {
            put("k", b"ok".to_vec());
            match &job.item.value {
                Value::Output(out) => {
                    put("v", b"out".to_vec());
                    put("out", out.clone());
                }
                other => {
                    put("v", b"one".to_vec());
                    put("out", other.joined(b"\n"));
                }
            }
        }
        End::Skipped => put("k", b"skip".to_vec()),
        End::Failed(fail) => {
            put("k", b"fail".to_vec());
            put("stage", fail.stage.clone().into_bytes());
            put("err", fail.error.message.clone().into_bytes());
            if let Some(x) = fail.error.exit {
                put("exit", x.to_string().into_bytes());
            }
            if let Some(s) = fail.error.signal {
                put("signal", s.to_string().into_bytes());
            }
            put("stderr", fail.error.stderr.clone().into_bytes());
            put("attempts", fail.attempts.to_string().into_bytes());
            put("out", fail.error.stdout.clone());
        }
    }
    f
}

/// This worker's name in the consumer group: the host and the process.
fn consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// The limits shared by the workers, one per `inflight(..)` stage of the pipe.
struct Shared {
    client: redis::Client,
    queue: Queue,
    inflights: HashMap<usize, RedisInflight>,
}

/// A task of the pipe as a stage of the worker.
fn task_step(
    p: Pipeline<Job>,
    t: &Task,
    step: usize,
    runner: &Arc<Runner>,
    jobs: usize,
    shared: &mut Shared,
) -> Pipeline<Job> {
    let rt = Arc::new(TaskRt::new(t.clone()));
    let runner = runner.clone();
    let call = move |job: Job| {
        let (runner, rt) = (runner.clone(), rt.clone());
        async move {
            if !matches!(job.end, End::Open) {
                return Ok(job);
            }
            let item = run_job(&runner, &rt, job.item, step).await?;
            Ok(Job {
                item,
                end: End::Open,
            })
        }
    };
    let rate = t.policies.rate.map(|(n, per, burst)| {
        let name = shared.queue.limit_name(&format!("{}.rate", t.name));
        Gate::SharedRate(RedisRate::per(&shared.client, &name, n, per).burst(burst))
    });
    let inflight = t.policies.inflight.map(|(id, n)| {
        let name = shared.queue.limit_name(&format!("inflight{id}"));
        let client = shared.client.clone();
        let bound = shared
            .inflights
            .entry(id)
            .or_insert_with(|| RedisInflight::new(&client, &name, n))
            .clone();
        Gate::SharedInflight(bound)
    });
    let policies = Policies {
        rate,
        inflight,
        breaker: objects(t).breaker,
        committed: None,
    };
    let stage = task_stage(p, t, jobs, false, policies, call);
    stage.results().map(|r| match r {
        Ok(job) => job,
        Err(f) => {
            let fail = match &f.error {
                flowline::ItemError::User(e) => e.downcast_ref::<Failed>().map(|x| {
                    let mut fail = (*x.0).clone();
                    fail.attempts = f.attempts;
                    fail
                }),
                _ => None,
            };
            let fail = fail.unwrap_or_else(|| Fail {
                item: f.input.item.clone(),
                step: 0,
                stage: f.stage.to_string(),
                error: crate::exec::CallError {
                    message: f.error.to_string(),
                    ..Default::default()
                },
                attempts: f.attempts,
            });
            Job {
                item: f.input.item,
                end: End::Failed(Box::new(fail)),
            }
        }
    })
}

/// Runs a worker until the feeder has marked the run finished (or a signal).
pub async fn run(
    plan: Plan,
    settings: Settings,
    queue: Queue,
    lease: Duration,
) -> Result<Outcome, String> {
    let consumer = consumer_name();
    let signals = super::stop_signals()?;
    let queue = match attach(&queue, &signals).await? {
        Attached::Run(q) => q,
        Attached::Missed => {
            if !settings.quiet {
                eprintln!(
                    "flowline: worker {consumer}: a run of queue `{}` finished before this worker joined it",
                    queue.name
                );
            }
            return Ok(Outcome {
                failures: 0,
                interrupted: false,
                halted_by: None,
            });
        }
        Attached::Signalled => {
            return Ok(Outcome {
                failures: 0,
                interrupted: true,
                halted_by: None,
            });
        }
    };
    let reads = plan
        .main_tasks()
        .map(|t| t.policies.fork.unwrap_or(settings.jobs))
        .max()
        .unwrap_or(settings.jobs)
        .clamp(1, 10_000);
    let opts = StreamOptions::new()
        // The entries the stream gives up on (delivered too often: a job that kills its
        // worker) go where the feeder reads them, so they end as failures there.
        .dead_letter_stream(queue.key("dead"))
        .min_idle(lease)
        .block(Duration::from_millis(200))
        .batch(reads);
    let source = RedisStream::new(&queue.server, &queue.key("jobs"), GROUP, &consumer, opts)
        .map_err(|e| format!("--queue: {e}"))?;

    let client = redis::Client::open(queue.server.as_str()).map_err(|e| e.to_string())?;
    let runs_processes = plan.main_tasks().any(|t| matches!(t.kind, TaskKind::Sh(_)));
    // Each job's stderr goes back with its result, for the feeder to write out.
    let stderr: Arc<Mutex<HashMap<u64, Vec<u8>>>> = Arc::default();
    let keep = stderr.clone();
    let runner = Arc::new(
        Runner::new(
            reads,
            None,
            if runs_processes {
                Jobs::new()
            } else {
                Jobs::none()
            },
            settings.job_opts.clone(),
        )?
        .stderr_to(Arc::new(move |seq, err| {
            let mut m = keep.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(seq).or_default().extend_from_slice(err);
        })),
    );
    let mut shared = Shared {
        client,
        queue: queue.clone(),
        inflights: HashMap::new(),
    };
    let mut p = source.pipeline().map(|e| job_of(&e));
    for (i, step) in plan.main.steps.iter().enumerate() {
        p = match step {
            Step::Task(t) => task_step(p, t, i, &runner, settings.jobs, &mut shared),
            Step::Filter { re, keep } => {
                let (re, keep) = (re.clone(), *keep);
                p.map(move |mut job: Job| {
                    let pass = job.item.value.args().iter().any(|t| re.is_match(t)) == keep;
                    if matches!(job.end, End::Open) && !pass {
                        job.end = End::Skipped;
                    }
                    job
                })
            }
            // Refused before the run (`check_plan`).
            Step::Dedup(_) | Step::Batch(..) => p,
        };
    }

    let sink = StreamSink::new(&queue.server, &queue.key("results"), move |job: &Job| {
        let err = stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job.item.seq);
        result_fields(job, err.unwrap_or_default())
    })
    .map_err(|e| format!("--queue: {e}"))?;
    let (finished_tx, finished) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(watch_finished(queue.clone(), finished_tx));
    let usr1 = crate::run::on_sigusr1(Some(runner.clone()), || {});
    let signalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let stop = {
        let signalled = signalled.clone();
        move || {
            let (mut finished, signalled, signals) =
                (finished.clone(), signalled.clone(), signals.clone());
            // The first stop comes with the end of the run or a signal; a second (which
            // cancels, killing the running jobs) only with a signal.
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                tokio::select! {
                    _ = finished.wait_for(|f| *f), if first => {}
                    () = signals.recv() => {
                        signalled.store(true, Ordering::SeqCst);
                    }
                }
                Ok(())
            }
        }
    };
    let result = p.into_sink(sink).stop_on_signal(stop).await;
    watcher.abort();
    if let Some(u) = usr1 {
        u.abort();
    }
    let interrupted = signalled.load(Ordering::SeqCst);
    match result {
        Ok((written, report)) => {
            if !settings.quiet {
                eprintln!(
                    "flowline: worker {consumer}: {written} results written to queue `{}`{}",
                    queue.name,
                    if interrupted { "; stopped" } else { "" }
                );
            }
            Ok(Outcome {
                failures: report.failures,
                interrupted,
                halted_by: None,
            })
        }
        Err(flowline::Error::Cancelled { .. }) => Ok(Outcome {
            failures: 0,
            interrupted: true,
            halted_by: None,
        }),
        Err(e) => Err(format!("queue `{}`: {e}", queue.name)),
    }
}

/// What a worker found when it looked for a run to join.
enum Attached {
    /// The queue, with the keys of the unfinished run it joins.
    Run(Queue),
    /// A run began and finished while the worker looked (its inputs were run by others).
    Missed,
    /// A signal came first.
    Signalled,
}

/// Waits for a run of the queue that has not finished. A run that had finished when the
/// worker started (its keys not yet expired) is not joined: the worker waits for the next.
/// Another run seen finished means the worker came up during a run too short to join: it
/// ends, as it would have with that run. Redis being down is waited out.
async fn attach(queue: &Queue, signals: &flowline::UnixSignals) -> Result<Attached, String> {
    let conn = super::connect(&queue.server)?;
    let wait = async {
        // The finished run (or none) seen first.
        let mut before: Option<Option<String>> = None;
        let mut polls = 0u32;
        loop {
            match super::run_state(&conn, queue).await {
                Ok((Some(run), false)) => return Attached::Run(queue.with_run(&run)),
                Ok((run, true)) => {
                    if *before.get_or_insert_with(|| run.clone()) != run {
                        return Attached::Missed;
                    }
                }
                Ok((None, false)) => {
                    before.get_or_insert(None);
                }
                Err(_) => {}
            }
            // Soon after the feeder starts the run: a worker that reads the first inputs
            // as they come spreads them best (and an input that kills its worker then
            // takes fewer others with it). A worker that has waited a while waits
            // at a slower pace.
            polls += 1;
            let pause = if polls < 200 { 10 } else { 200 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    };
    tokio::select! {
        a = wait => Ok(a),
        () = signals.recv() => Ok(Attached::Signalled),
    }
}

/// Watches the queue's run: its end comes when the feeder has marked it finished (every
/// input has ended), or when another run has taken the queue's NAME. Redis being down
/// only delays the news.
async fn watch_finished(queue: Queue, tx: tokio::sync::watch::Sender<bool>) {
    let Ok(conn) = super::connect(&queue.server) else {
        return;
    };
    loop {
        if let Ok((run, finished)) = super::run_state(&conn, &queue).await {
            if finished || run.as_deref() != Some(queue.run.as_str()) {
                let _ = tx.send(true);
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
