//! From parsed stages to a checked plan: every stage known, every argument read and its
//! value in range, before anything runs. Errors name the stage, the argument and the value,
//! at the argument's position.

use std::path::PathBuf;
use std::time::Duration;

use crate::key::KeySpec;
use crate::parse::{Arg, Arm, ParseError, Pipe, Stage};

/// Where the items come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Lines of a file, or of stdin (`None`).
    Lines(Option<PathBuf>),
    /// Numbers from `start` to `end` inclusive, by `step`.
    Seq { start: i64, end: i64, step: i64 },
    /// The given words.
    Args(Vec<Vec<u8>>),
    /// Inputs of several arguments each (`:::` groups combined, `:::+` linked).
    Table(Vec<Vec<Vec<u8>>>),
    /// Rows of a SQLite query, paged by a key column.
    Sql {
        db: PathBuf,
        query: String,
        key: String,
    },
}

/// What a task does to an item.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskKind {
    /// A command; `{}` is the item, `{#}` its number; without `{}` the item goes to stdin.
    Sh(String),
    /// An HTTP request; `{}` in the URL and body is the item.
    Http {
        method: String,
        url: String,
        body: Option<String>,
    },
}

/// A retry policy: up to `retries` more attempts, exponential backoff from `min` to `max`
/// with full jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySpec {
    pub retries: u32,
    pub min: Duration,
    pub max: Duration,
}

/// The limits and resilience of a task (set by the policy stages in front of it).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policies {
    pub fork: Option<usize>,
    /// Calls per period, burst.
    pub rate: Option<(u64, Duration, u64)>,
    /// `rate(FILE)`: the file the rate is read from (again while running).
    pub rate_file: Option<std::path::PathBuf>,
    /// Shared bound on calls in flight (its index among the pipe's `inflight` stages, and n).
    pub inflight: Option<(usize, usize)>,
    pub timeout: Option<Duration>,
    pub retry: Option<RetrySpec>,
    /// Consecutive failures, cooldown.
    pub breaker: Option<(u32, Duration)>,
    pub adaptive: Option<(usize, usize)>,
    /// `key(TEMPLATE[, PER_KEY])`: in order per key, concurrent across keys.
    pub key: Option<KeySpec>,
}

/// A task stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Its name in the report (`sh`, `http`, `sh-2`, ...).
    pub name: String,
    pub kind: TaskKind,
    pub policies: Policies,
}

/// A stage of a chain.
// Built once per run and read by reference: the size of the task variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Step {
    Task(Task),
    Filter { re: regex::bytes::Regex, keep: bool },
    Dedup(usize),
    Batch(usize, Duration),
}

/// Where a chain ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Sink {
    Print,
    Jsonl(PathBuf),
    File(PathBuf),
    Discard,
}

/// A chain of steps and its sink (`None`: the default, which depends on the chain).
#[derive(Debug, Clone, Default)]
pub struct Chain {
    pub steps: Vec<Step>,
    pub sink: Option<Sink>,
}

/// The `error:` continuation.
#[derive(Debug, Clone, Default)]
pub struct ErrorArm {
    /// `retry(...)`: run the failed task (and the tasks after it) again.
    pub retry: Option<RetrySpec>,
    /// What follows the retry (recovered items), or the sink of the failures.
    pub chain: Chain,
}

/// A checked pipe.
#[derive(Debug, Clone)]
pub struct Plan {
    pub source: Source,
    /// The main chain (its sink is the success sink when there is no branch).
    pub main: Chain,
    /// After `branch`: the success continuation and the error continuation.
    pub success: Option<Chain>,
    pub error: Option<ErrorArm>,
    /// Whether a `branch` was written.
    pub branched: bool,
}

impl Plan {
    /// Every task of the main chain, in order.
    pub fn main_tasks(&self) -> impl Iterator<Item = &Task> {
        self.main.steps.iter().filter_map(|s| match s {
            Step::Task(t) => Some(t),
            _ => None,
        })
    }
}

/// GNU parallel's options that are policies of a task (`--timeout`, `--retries`,
/// `--delay`, `--key`) or a step before it (`-N`, `-n`, `-X`).
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub timeout: Option<Duration>,
    /// Retries after the first attempt.
    pub retries: Option<u32>,
    /// Time between job starts.
    pub delay: Option<Duration>,
    /// Inputs per job.
    pub args_per_job: Option<usize>,
    /// `--key TEMPLATE`.
    pub key: Option<KeySpec>,
}

impl Plan {
    /// The plan of a command given as GNU parallel takes it: `source | sh(cmd)`.
    pub fn command(source: Source, cmd: String) -> Plan {
        Plan {
            source,
            main: Chain {
                steps: vec![Step::Task(Task {
                    name: "sh".into(),
                    kind: TaskKind::Sh(cmd),
                    policies: Policies::default(),
                })],
                sink: None,
            },
            success: None,
            error: None,
            branched: false,
        }
    }

    /// Applies the options to the main chain's first task, where its own stages set
    /// nothing else.
    pub fn apply_options(&mut self, o: Options) {
        let Some(first) = self
            .main
            .steps
            .iter()
            .position(|s| matches!(s, Step::Task(_)))
        else {
            return;
        };
        if let Step::Task(t) = &mut self.main.steps[first] {
            let p = &mut t.policies;
            if p.timeout.is_none() {
                p.timeout = o.timeout;
            }
            if p.retry.is_none() {
                p.retry = o.retries.filter(|&n| n > 0).map(|retries| RetrySpec {
                    retries,
                    // parallel runs a failed job again at once.
                    min: Duration::from_millis(1),
                    max: Duration::from_millis(1),
                });
            }
            if p.rate.is_none() {
                p.rate = o.delay.map(|d| (1, d, 1));
            }
            if p.key.is_none() {
                p.key = o.key;
            }
        }
        if let Some(n) = o.args_per_job {
            self.main.steps.insert(first, Step::Batch(n, MAX_DURATION));
        }
    }
}

/// What a stage is: where in a pipe it may stand and which builder reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The first stage: where the inputs come from.
    Source,
    /// Runs a job or a request per item.
    Task,
    /// Shapes the tasks after it (or the one before it, when trailing).
    Policy,
    /// Acts on items between tasks.
    Op,
    /// The last stage of a chain: where results go.
    Sink,
    /// Splits on the result into labelled continuations.
    Branch,
}

/// Every stage name and its role: the one list the parser, the builders and the error
/// messages read, so that a name is either here or refused.
const STAGES: &[(&str, Role)] = &[
    ("lines", Role::Source),
    ("seq", Role::Source),
    ("args", Role::Source),
    ("sql", Role::Source),
    ("sh", Role::Task),
    ("http", Role::Task),
    ("fork", Role::Policy),
    ("rate", Role::Policy),
    ("inflight", Role::Policy),
    ("timeout", Role::Policy),
    ("retry", Role::Policy),
    ("breaker", Role::Policy),
    ("adaptive", Role::Policy),
    ("key", Role::Policy),
    ("filter", Role::Op),
    ("reject", Role::Op),
    ("dedup", Role::Op),
    ("batch", Role::Op),
    ("print", Role::Sink),
    ("jsonl", Role::Sink),
    ("file", Role::Sink),
    ("discard", Role::Sink),
    ("branch", Role::Branch),
];

/// The role of a stage name, `None` for a name that is no stage.
fn role(name: &str) -> Option<Role> {
    STAGES.iter().find(|(n, _)| *n == name).map(|&(_, r)| r)
}

/// Every stage name, for suggestions and help.
pub fn all_stage_names() -> impl Iterator<Item = &'static str> {
    STAGES.iter().map(|&(n, _)| n)
}

fn err(at: usize, msg: impl Into<String>) -> ParseError {
    ParseError::new(at, msg)
}

/// An unknown stage name: the error names it and lists the known ones (with the nearest
/// first, when one is close).
fn unknown(stage: &Stage) -> ParseError {
    let near = all_stage_names()
        .filter(|n| edit_distance(n, &stage.name) <= 2)
        .min_by_key(|n| edit_distance(n, &stage.name));
    let hint = match near {
        Some(n) => format!("; did you mean `{n}`?"),
        None => String::new(),
    };
    err(
        stage.span.start,
        format!(
            "unknown stage `{}`{hint}; stages are {}",
            stage.name,
            all_stage_names().collect::<Vec<_>>().join(", ")
        ),
    )
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().take(64).collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().take(64).enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let v = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
            cur.push(v);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Argument access with errors naming the stage and the argument.
struct Args<'a> {
    stage: &'a Stage,
}

impl<'a> Args<'a> {
    fn count(&self, min: usize, max: usize, usage: &str) -> Result<(), ParseError> {
        let n = self.stage.args.len();
        if n < min || n > max {
            let at = self
                .stage
                .args
                .get(max)
                .map_or(self.stage.span.start, |a| a.span.start);
            return Err(err(
                at,
                format!(
                    "`{}` takes {}, got {n} argument(s): usage `{usage}`",
                    self.stage.name,
                    if min == max {
                        format!("{min} argument(s)")
                    } else {
                        format!("{min} to {max} arguments")
                    }
                ),
            ));
        }
        Ok(())
    }

    fn get(&self, i: usize) -> Option<&'a Arg> {
        self.stage.args.get(i)
    }

    fn bad(&self, arg: &Arg, what: &str, why: &str) -> ParseError {
        err(
            arg.span.start,
            format!(
                "stage `{}`: {what} `{}` {why}",
                self.stage.name,
                arg.text.escape_debug()
            ),
        )
    }

    fn int(&self, arg: &Arg, what: &str, min: u64, max: u64) -> Result<u64, ParseError> {
        let v: u64 = arg
            .text
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| self.bad(arg, what, "is not a whole number"))?;
        if v < min || v > max {
            return Err(self.bad(arg, what, &format!("must be from {min} to {max}")));
        }
        Ok(v)
    }

    fn duration(&self, arg: &Arg, what: &str) -> Result<Duration, ParseError> {
        let d = parse_duration(&arg.text).map_err(|why| self.bad(arg, what, why))?;
        if d.is_zero() {
            return Err(self.bad(arg, what, "must be more than zero"));
        }
        if d > MAX_DURATION {
            return Err(self.bad(arg, what, "is more than 30 days"));
        }
        Ok(d)
    }

    fn duration_range(&self, arg: &Arg, what: &str) -> Result<(Duration, Duration), ParseError> {
        let (a, b) = arg
            .text
            .split_once("..")
            .ok_or_else(|| self.bad(arg, what, "is not a range like `200ms..10s`"))?;
        let part = |s: &str| {
            let d = parse_duration(s).map_err(|why| self.bad(arg, what, why))?;
            if d.is_zero() || d > MAX_DURATION {
                return Err(self.bad(arg, what, "must be within 0 and 30 days, both ends"));
            }
            Ok(d)
        };
        let (a, b) = (part(a)?, part(b)?);
        if a > b {
            return Err(self.bad(arg, what, "starts after it ends"));
        }
        Ok((a, b))
    }

    fn path(&self, arg: &Arg, what: &str) -> Result<PathBuf, ParseError> {
        if arg.text.is_empty() || arg.text.contains('\0') {
            return Err(self.bad(arg, what, "is not a usable path"));
        }
        Ok(PathBuf::from(&arg.text))
    }
}

/// Durations are at most this long: longer ones are surely a typo, and they stay far from
/// any overflow of the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// `250ms`, `1.5s`, `2m`, `1h`, `30` (seconds). Never panics: the number is checked for
/// being finite and in range before it becomes a `Duration`.
pub fn parse_duration(text: &str) -> Result<Duration, &'static str> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() || num.chars().filter(|&c| c == '.').count() > 1 {
        return Err("is not a duration like `250ms`, `5s`, `2m`");
    }
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err("has an unknown unit (use ms, s, m or h)"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| "is not a duration like `250ms`, `5s`, `2m`")?;
    let secs = v * scale;
    if !secs.is_finite() || !(0.0..=MAX_DURATION.as_secs_f64() * 2.0).contains(&secs) {
        return Err("is out of range");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Checks a parsed pipe and turns it into a plan. `default_source` is used when the first
/// stage is not a source (items from `:::` arguments, else stdin).
pub fn plan(pipe: &Pipe, default_source: Source) -> Result<Plan, ParseError> {
    let mut stages = pipe.stages.iter().peekable();
    let source = match stages.peek() {
        Some(s) if role(&s.name) == Some(Role::Source) => {
            let s = stages.next().expect("peeked");
            source(s)?
        }
        _ => default_source,
    };
    let mut names = Names::default();
    let mut inflights = 0;
    let rest: Vec<&Stage> = stages.collect();
    let (main, scope) = chain(
        &rest,
        Policies::default(),
        &mut names,
        &mut inflights,
        pipe.branch.is_none(),
    )?;
    let mut plan = Plan {
        source,
        main,
        success: None,
        error: None,
        branched: false,
    };
    if let Some((branch, arms)) = &pipe.branch {
        if !branch.args.is_empty() {
            return Err(err(
                branch.args[0].span.start,
                "`branch` takes no arguments: it splits on the result (`success:` / `error:`)",
            ));
        }
        if plan.main_tasks().next().is_none() {
            return Err(err(
                branch.span.start,
                "`branch` splits the results of a task (`sh` or `http`), and none comes before it",
            ));
        }
        plan.branched = true;
        for arm in arms {
            match arm.label.as_str() {
                "success" | "ok" => {
                    if plan.success.is_some() {
                        return Err(dup_label(arm));
                    }
                    let stages: Vec<&Stage> = arm.stages.iter().collect();
                    let (c, _) = chain(&stages, scope.clone(), &mut names, &mut inflights, true)?;
                    plan.success = Some(c);
                }
                "error" | "err" | "failed" | "fail" => {
                    if plan.error.is_some() {
                        return Err(dup_label(arm));
                    }
                    plan.error = Some(error_arm(arm, &scope, &mut names, &mut inflights)?);
                }
                other => {
                    return Err(err(
                        arm.span.start,
                        format!(
                            "unknown label `{other}:`; labels are `success:` (or `ok:`) and `error:`"
                        ),
                    ));
                }
            }
        }
    }
    Ok(plan)
}

fn dup_label(arm: &Arm) -> ParseError {
    err(
        arm.span.start,
        format!("label `{}:` appears twice", arm.label),
    )
}

fn error_arm(
    arm: &Arm,
    scope: &Policies,
    names: &mut Names,
    inflights: &mut usize,
) -> Result<ErrorArm, ParseError> {
    let mut stages: Vec<&Stage> = arm.stages.iter().collect();
    let mut out = ErrorArm::default();
    if stages.first().is_some_and(|s| s.name == "retry") {
        out.retry = Some(retry(stages[0])?);
        stages.remove(0);
        let (c, _) = chain(&stages, scope.clone(), names, inflights, true)?;
        out.chain = c;
    } else {
        // Without a retry the failures themselves end here: only a sink can take them.
        match stages.as_slice() {
            [s] if role(&s.name) == Some(Role::Sink) => out.chain.sink = Some(sink(s)?),
            _ => {
                let s = stages[0];
                if role(&s.name).is_none() {
                    return Err(unknown(s));
                }
                return Err(err(
                    s.span.start,
                    format!(
                        "`error:` takes `retry(..)` first (then any stages), or one sink for the failures (print, jsonl, file, discard); found `{}`",
                        s.name
                    ),
                ));
            }
        }
    }
    Ok(out)
}

#[derive(Default)]
struct Names(std::collections::HashMap<String, usize>);

impl Names {
    fn next(&mut self, base: &str) -> String {
        let n = self.0.entry(base.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            base.to_string()
        } else {
            format!("{base}-{n}")
        }
    }
}

/// A chain of stages; returns it and the policy scope at its end (continuations inherit it).
fn chain(
    stages: &[&Stage],
    mut scope: Policies,
    names: &mut Names,
    inflights: &mut usize,
    sink_allowed: bool,
) -> Result<(Chain, Policies), ParseError> {
    let mut out = Chain::default();
    // Policies written after the last task apply to it (`sh(..) | timeout(5s)`).
    let mut trailing: Vec<&Stage> = Vec::new();
    for (i, s) in stages.iter().enumerate() {
        let name = s.name.as_str();
        match role(name) {
            None => return Err(unknown(s)),
            Some(Role::Source) => {
                return Err(err(
                    s.span.start,
                    format!("`{name}` is a source: it can only be the first stage"),
                ));
            }
            Some(Role::Sink) => {
                if !sink_allowed {
                    return Err(err(
                        s.span.start,
                        format!(
                            "`{name}` is a sink, and the chain goes on to a `branch`: put sinks in the continuations"
                        ),
                    ));
                }
                if i + 1 != stages.len() {
                    return Err(err(
                        stages[i + 1].span.start,
                        format!("`{name}` is a sink: nothing can follow it"),
                    ));
                }
                out.sink = Some(sink(s)?);
            }
            Some(Role::Policy) => {
                policy(s, &mut scope, inflights)?;
                trailing.push(s);
            }
            Some(Role::Task) => {
                trailing.clear();
                out.steps.push(Step::Task(task(s, &scope, names)?));
            }
            Some(Role::Op) => {
                trailing.clear();
                out.steps.push(op(s)?);
            }
            Some(Role::Branch) => {
                return Err(err(
                    s.span.start,
                    "`branch` must be followed by labelled continuations",
                ));
            }
        }
    }
    // A key written where no task of the chain takes it (`key(..) | filter(..)`) would
    // order nothing, silently.
    let has_task = out.steps.iter().any(|s| matches!(s, Step::Task(_)));
    if let Some(k) = stages
        .iter()
        .find(|s| s.name == "key")
        .filter(|_| !has_task)
    {
        return Err(err(
            k.span.start,
            "`key` has no task to apply to: put it before or after `sh(..)` or `http(..)`",
        ));
    }
    if !trailing.is_empty() {
        let last = out.steps.iter_mut().rev().find_map(|s| match s {
            Step::Task(t) => Some(t),
            _ => None,
        });
        match last {
            Some(t) => {
                for s in trailing {
                    policy(s, &mut t.policies, inflights)?;
                }
            }
            None => {
                let s = trailing[0];
                return Err(err(
                    s.span.start,
                    format!(
                        "`{}` has no task to apply to: put it before or after `sh(..)` or `http(..)`",
                        s.name
                    ),
                ));
            }
        }
    }
    Ok((out, scope))
}

fn source(s: &Stage) -> Result<Source, ParseError> {
    let a = Args { stage: s };
    match s.name.as_str() {
        "lines" => {
            a.count(0, 1, "lines(FILE) or lines(-) for stdin")?;
            match a.get(0) {
                None => Ok(Source::Lines(None)),
                Some(arg) if arg.text == "-" => Ok(Source::Lines(None)),
                Some(arg) => Ok(Source::Lines(Some(a.path(arg, "file")?))),
            }
        }
        "seq" => {
            a.count(1, 2, "seq(1..100[, step]) or seq(N)")?;
            let arg = a.get(0).expect("counted");
            let num = |t: &str| -> Result<i64, ParseError> {
                t.trim()
                    .parse::<i64>()
                    .map_err(|_| a.bad(arg, "range", "is not `START..END` of whole numbers"))
            };
            let (start, end) = match arg.text.split_once("..") {
                Some((x, y)) => (num(x)?, num(y.trim_start_matches('='))?),
                None => (1, num(&arg.text)?),
            };
            let step = match a.get(1) {
                Some(st) => a.int(st, "step", 1, i64::MAX as u64)? as i64,
                None => 1,
            };
            if end < start {
                return Err(a.bad(arg, "range", "ends before it starts"));
            }
            Ok(Source::Seq { start, end, step })
        }
        "args" => Ok(Source::Args(
            s.args.iter().map(|x| x.text.clone().into_bytes()).collect(),
        )),
        "sql" => {
            a.count(3, 3, "sql(DB_FILE, \"SELECT ...\", KEY_COLUMN)")?;
            let db = a.path(a.get(0).expect("counted"), "database")?;
            let q = a.get(1).expect("counted");
            if !q
                .text
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("select")
            {
                return Err(a.bad(q, "query", "must be a SELECT"));
            }
            let key = a.get(2).expect("counted");
            if key.text.is_empty()
                || !key
                    .text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(a.bad(key, "key column", "must be a plain column name"));
            }
            Ok(Source::Sql {
                db,
                query: q.text.clone(),
                key: key.text.clone(),
            })
        }
        _ => Err(unknown(s)),
    }
}

fn retry(s: &Stage) -> Result<RetrySpec, ParseError> {
    let a = Args { stage: s };
    a.count(1, 2, "retry(N[, MIN..MAX])")?;
    let retries = a.int(a.get(0).expect("counted"), "retries", 1, 1000)? as u32;
    let (min, max) = match a.get(1) {
        Some(r) => a.duration_range(r, "backoff")?,
        None => (Duration::from_millis(100), Duration::from_secs(30)),
    };
    Ok(RetrySpec { retries, min, max })
}

fn policy(s: &Stage, p: &mut Policies, inflights: &mut usize) -> Result<(), ParseError> {
    let a = Args { stage: s };
    match s.name.as_str() {
        "fork" => {
            a.count(1, 1, "fork(N)")?;
            p.fork = Some(a.int(&s.args[0], "workers", 1, 65_536)? as usize);
        }
        "rate" => {
            a.count(1, 2, "rate(N/s[, BURST] or FILE)")?;
            let arg = &s.args[0];
            let file = std::path::Path::new(arg.text.trim());
            // `rate(FILE)`: the file holds `20/s[, BURST]`, read again while running.
            let (count, period, burst) = if a.get(1).is_none() && file.is_file() {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| a.bad(arg, "rate file", &e.to_string()))?;
                p.rate_file = Some(file.to_path_buf());
                crate::live::rate_file_value(text.trim())
                    .map_err(|why| a.bad(arg, "rate file", &format!("holds {why}")))?
            } else {
                let (count, period) = crate::live::rate_value(&arg.text)
                    .map_err(|(what, why)| a.bad(arg, what, &why))?;
                let burst = match a.get(1) {
                    Some(b) => a.int(b, "burst", 1, 1_000_000)?,
                    None => 1,
                };
                (count, period, burst)
            };
            p.rate = Some((count, period, burst));
        }
        "inflight" => {
            a.count(1, 1, "inflight(N)")?;
            let n = a.int(&s.args[0], "bound", 1, 1_000_000)? as usize;
            *inflights += 1;
            p.inflight = Some((*inflights, n));
        }
        "key" => {
            a.count(1, 2, "key(TEMPLATE[, PER_KEY])")?;
            let t = &s.args[0];
            if let Some(why) = crate::key::template_problem(&t.text) {
                return Err(a.bad(t, "template", why));
            }
            let per_key = match a.get(1) {
                Some(n) => a.int(n, "per_key", 1, crate::key::MAX_PER_KEY)? as usize,
                None => 1,
            };
            p.key = Some(KeySpec {
                template: t.text.clone(),
                per_key,
            });
        }
        "timeout" => {
            a.count(1, 1, "timeout(5s)")?;
            p.timeout = Some(a.duration(&s.args[0], "limit")?);
        }
        "retry" => p.retry = Some(retry(s)?),
        "breaker" => {
            a.count(1, 2, "breaker(FAILURES[, COOLDOWN])")?;
            let n = a.int(&s.args[0], "failures", 1, 1_000_000)? as u32;
            let cooldown = match a.get(1) {
                Some(c) => a.duration(c, "cooldown")?,
                None => Duration::from_secs(5),
            };
            p.breaker = Some((n, cooldown));
        }
        "adaptive" => {
            a.count(1, 1, "adaptive(MIN..MAX)")?;
            let arg = &s.args[0];
            let (x, y) = arg
                .text
                .split_once("..")
                .ok_or_else(|| a.bad(arg, "range", "is not like `1..64`"))?;
            let n = |t: &str| t.trim().trim_start_matches('=').parse::<usize>().ok();
            match (n(x), n(y)) {
                (Some(lo), Some(hi)) if 1 <= lo && lo <= hi && hi <= 65_536 => {
                    p.adaptive = Some((lo, hi));
                }
                _ => {
                    return Err(a.bad(
                        arg,
                        "range",
                        "must be `MIN..MAX` with 1 <= MIN <= MAX <= 65536",
                    ));
                }
            }
        }
        _ => return Err(unknown(s)),
    }
    Ok(())
}

fn task(s: &Stage, scope: &Policies, names: &mut Names) -> Result<Task, ParseError> {
    let a = Args { stage: s };
    let kind = match s.name.as_str() {
        "sh" => {
            a.count(1, 1, "sh(\"command {}\")")?;
            let cmd = &s.args[0];
            if cmd.text.trim().is_empty() {
                return Err(a.bad(cmd, "command", "is empty"));
            }
            if cmd.text.contains('\0') {
                return Err(a.bad(cmd, "command", "holds a NUL byte"));
            }
            TaskKind::Sh(cmd.text.clone())
        }
        "http" => {
            a.count(1, 3, "http(URL) or http(METHOD, URL[, BODY])")?;
            let (method, url, body) = match s.args.as_slice() {
                [u] => ("GET".to_string(), u, None),
                [m, u] => (m.text.to_ascii_uppercase(), u, None),
                [m, u, b] => (m.text.to_ascii_uppercase(), u, Some(b.text.clone())),
                _ => unreachable!("counted"),
            };
            if !matches!(
                method.as_str(),
                "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS"
            ) {
                return Err(a.bad(&s.args[0], "method", "is not an HTTP method"));
            }
            let probe = url.text.replace("{}", "x").replace("{#}", "1");
            if !(probe.starts_with("http://")
                || probe.starts_with("https://")
                || url.text.starts_with("{}"))
            {
                return Err(a.bad(
                    url,
                    "URL",
                    "must start with http:// or https:// (or be `{}`)",
                ));
            }
            TaskKind::Http {
                method,
                url: url.text.clone(),
                body,
            }
        }
        _ => return Err(unknown(s)),
    };
    Ok(Task {
        name: names.next(&s.name),
        kind,
        policies: scope.clone(),
    })
}

fn op(s: &Stage) -> Result<Step, ParseError> {
    let a = Args { stage: s };
    match s.name.as_str() {
        "filter" | "reject" => {
            a.count(1, 1, "filter(\"REGEX\")")?;
            let arg = &s.args[0];
            let re = regex::bytes::RegexBuilder::new(&arg.text)
                .size_limit(1 << 20)
                .dfa_size_limit(1 << 20)
                .build()
                .map_err(|e| {
                    let first = e.to_string();
                    let short = first.lines().last().unwrap_or("invalid").trim().to_string();
                    a.bad(arg, "regex", &format!("is not valid: {short}"))
                })?;
            Ok(Step::Filter {
                re,
                keep: s.name == "filter",
            })
        }
        "dedup" => {
            a.count(0, 1, "dedup or dedup(WINDOW_SIZE)")?;
            let n = match a.get(0) {
                Some(x) => a.int(x, "window", 1, 100_000_000)? as usize,
                None => 1_000_000,
            };
            Ok(Step::Dedup(n))
        }
        "batch" => {
            a.count(1, 2, "batch(N[, WAIT])")?;
            let n = a.int(&s.args[0], "size", 1, 100_000)? as usize;
            let wait = match a.get(1) {
                Some(w) => a.duration(w, "wait")?,
                None => Duration::from_secs(1),
            };
            Ok(Step::Batch(n, wait))
        }
        _ => Err(unknown(s)),
    }
}

fn sink(s: &Stage) -> Result<Sink, ParseError> {
    let a = Args { stage: s };
    match s.name.as_str() {
        "print" => {
            a.count(0, 0, "print")?;
            Ok(Sink::Print)
        }
        "discard" => {
            a.count(0, 0, "discard")?;
            Ok(Sink::Discard)
        }
        "jsonl" => {
            a.count(1, 1, "jsonl(FILE)")?;
            Ok(Sink::Jsonl(a.path(&s.args[0], "file")?))
        }
        "file" => {
            a.count(1, 1, "file(PATH)")?;
            Ok(Sink::File(a.path(&s.args[0], "path")?))
        }
        _ => Err(unknown(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;

    fn p(text: &str) -> Result<Plan, ParseError> {
        plan(&parse(text)?, Source::Lines(None))
    }

    #[test]
    fn policies_are_prefixes_and_trailing_ones_apply_to_the_last_task() {
        let plan = p("seq(1..10) | fork(8) | rate(20/s, 4) | sh(\"echo {}\") | timeout(5s) | http(GET, http://x/{})").unwrap();
        let tasks: Vec<_> = plan.main_tasks().collect();
        assert_eq!(tasks[0].policies.fork, Some(8));
        assert_eq!(
            tasks[0].policies.rate,
            Some((20, Duration::from_secs(1), 4))
        );
        assert_eq!(tasks[0].policies.timeout, None);
        assert_eq!(tasks[1].policies.timeout, Some(Duration::from_secs(5)));
        let plan = p("seq(3) | sh(\"x\") | timeout(5s) | retry(3, 10ms..1s)").unwrap();
        let t = plan.main_tasks().next().unwrap();
        assert_eq!(t.policies.timeout, Some(Duration::from_secs(5)));
        assert_eq!(t.policies.retry.unwrap().retries, 3);
    }

    #[test]
    fn durations_and_hostile_values() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in [
            "NaN",
            "inf",
            "1e999s",
            "-1s",
            "",
            "5x",
            "1..2s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        for (text, needle) in [
            ("seq(3) | fork(0) | sh(x)", "workers `0` must be from 1"),
            ("seq(3) | fork(99999999999999999999) | sh(x)", "workers"),
            ("seq(3) | rate(0/s) | sh(x)", "rate `0/s`"),
            ("seq(3) | rate(NaN/s) | sh(x)", "rate `NaN/s`"),
            ("seq(3) | rate(5/0s) | sh(x)", "rate period"),
            (
                "seq(3) | timeout(0s) | sh(x)",
                "limit `0s` must be more than zero",
            ),
            (
                "seq(3) | timeout(NaN) | sh(x)",
                "stage `timeout`: limit `NaN`",
            ),
            ("seq(3) | timeout(1e400) | sh(x)", "timeout"),
            ("seq(3) | retry(5, 10s..1s) | sh(x)", "starts after it ends"),
            ("seq(3) | adaptive(0..4) | sh(x)", "adaptive"),
            ("seq(3) | batch(0) | sh(x)", "size `0`"),
            ("seq(3) | breaker(3, NaN) | sh(x)", "cooldown"),
            ("seq(5..1) | sh(x)", "ends before it starts"),
            ("seq(3) | filter(\"(\") | print", "regex"),
        ] {
            let e = p(text).unwrap_err();
            assert!(e.message.contains(needle), "{text}: {}", e.message);
        }
    }

    #[test]
    fn an_unknown_stage_is_named_and_the_known_ones_listed() {
        for (text, name) in [
            ("seq(3) | frobnicate(x)", "frobnicate"),
            ("seq(3) | shh(x)", "shh"),
            ("frob | print", "frob"),
            ("seq(3) | sh(x) | branch | error:prnt", "prnt"),
        ] {
            let e = p(text).unwrap_err();
            assert!(
                e.message.contains(&format!("unknown stage `{name}`")),
                "{text}: {}",
                e.message
            );
            for (known, _) in STAGES {
                assert!(e.message.contains(known), "{text}: {known} not listed");
            }
        }
    }

    /// Each builder takes the names of its role and refuses every other name: none falls
    /// through to another stage (a misspelt policy read as `http`, say).
    #[test]
    fn every_builder_reads_exactly_the_names_of_its_role() {
        let stage = |name: &str| Stage {
            name: name.to_string(),
            span: crate::parse::Span { start: 0, end: 0 },
            args: Vec::new(),
        };
        let unknown_to = |role_of: Role, name: &str| -> bool {
            let s = stage(name);
            let e = match role_of {
                Role::Source => source(&s).err(),
                Role::Task => task(&s, &Policies::default(), &mut Names::default()).err(),
                Role::Policy => policy(&s, &mut Policies::default(), &mut 0).err(),
                Role::Op => op(&s).err(),
                Role::Sink => sink(&s).err(),
                Role::Branch => return name != "branch",
            };
            e.is_some_and(|e| e.message.starts_with("unknown stage"))
        };
        for &(name, r) in STAGES {
            for other in [
                Role::Source,
                Role::Task,
                Role::Policy,
                Role::Op,
                Role::Sink,
                Role::Branch,
            ] {
                assert_eq!(
                    unknown_to(other, name),
                    other != r,
                    "`{name}` ({r:?}) read by the {other:?} builder"
                );
            }
        }
    }

    #[test]
    fn misplaced_and_unknown_stages() {
        let e = p("seq(3) | shh(x)").unwrap_err();
        assert!(e.message.contains("did you mean `sh`"), "{}", e.message);
        assert_eq!(e.pos, 9);
        let e = p("seq(3) | print | sh(x)").unwrap_err();
        assert!(e.message.contains("nothing can follow"));
        let e = p("seq(3) | sh(x) | lines(f)").unwrap_err();
        assert!(e.message.contains("source"));
        let e = p("seq(3) | fork(3)").unwrap_err();
        assert!(e.message.contains("no task"));
        let e = p("seq(3) | sh(x) | branch | eror:print").unwrap_err();
        assert!(e.message.contains("unknown label"));
        let e = p("seq(3) | branch | error:print").unwrap_err();
        assert!(e.message.contains("none comes before"));
    }
}

/// The parser and the checks never panic, whatever the text: arbitrary strings, and
/// strings made of the grammar's own pieces (which get much further into the checks).
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::parse::parse;
    use proptest::prelude::*;

    const PIECES: &[&str] = &[
        "seq",
        "lines",
        "args",
        "sql",
        "sh",
        "http",
        "fork",
        "rate",
        "inflight",
        "timeout",
        "retry",
        "breaker",
        "adaptive",
        "key",
        "{1}",
        "filter",
        "reject",
        "dedup",
        "batch",
        "print",
        "jsonl",
        "file",
        "discard",
        "branch",
        "error:",
        "success:",
        "ok:",
        "(",
        ")",
        ",",
        "|",
        " ",
        "\"",
        "'",
        "\\",
        "{}",
        "{#}",
        "0",
        "1",
        "-1",
        "18446744073709551616",
        "NaN",
        "inf",
        "1e308",
        "..",
        "/s",
        "/0s",
        "ms",
        "5s",
        "200ms..10s",
        "0..0",
        "1..65537",
        "GET",
        "http://x/{}",
        "\u{0}",
        "é",
        "\n",
        "\t",
        ":",
        "[",
        "*",
        "(?",
        "x{99999999}",
    ];

    /// Checks one text: parse, plan and the rendering of any error.
    pub(crate) fn check(text: &str) {
        match parse(text).and_then(|p| plan(&p, Source::Lines(None))) {
            Ok(_) => {}
            Err(e) => {
                let r = e.render(text);
                assert!(r.contains('^'));
            }
        }
    }

    fn assemble(picks: &[usize]) -> String {
        picks.iter().map(|&i| PIECES[i % PIECES.len()]).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,80}") {
            check(&text);
        }

        #[test]
        fn grammar_pieces_never_panic(picks in proptest::collection::vec(0usize..1000, 0..40)) {
            check(&assemble(&picks));
        }
    }

    /// The long run: `cargo test --release -p flowline-cli -- --ignored fuzz_million`.
    /// Set FLOWLINE_FUZZ_CASES to change the count.
    #[test]
    #[ignore]
    fn fuzz_million() {
        let cases: u64 = std::env::var("FLOWLINE_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let start = std::time::Instant::now();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            // xorshift64*: deterministic, no dependency.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let mut oks = 0u64;
        for i in 0..cases {
            let len = (next() % 48) as usize;
            let text: String = if i % 4 == 0 {
                // Raw bytes-ish: any chars, including multi-byte and controls.
                (0..len)
                    .filter_map(|_| char::from_u32((next() % 0x800) as u32))
                    .collect()
            } else {
                let picks: Vec<usize> = (0..len).map(|_| next() as usize).collect();
                assemble(&picks)
            };
            if parse(&text)
                .and_then(|p| plan(&p, Source::Lines(None)))
                .is_ok()
            {
                oks += 1;
            }
            check(&text);
        }
        eprintln!(
            "fuzz: {cases} inputs ({oks} valid pipes) in {:.2?}, 0 panics",
            start.elapsed()
        );
    }
}
