//! `flowline`: GNU parallel for API jobs, as a pipe of flowline stages.
//!
//! ```sh
//! flowline 'lines(urls.txt) | fork(10) | rate(20/s) | sh("curl -fsS {}") | timeout(5s)
//!           | branch | error:retry(5, 200ms..10s) success:print'
//! ```

#![forbid(unsafe_code)]

mod compat;
mod exec;
mod gate;
mod input;
mod jobs;
mod key;
mod linefilter;
mod live;
mod parse;
mod queue;
mod results;
mod run;
mod spec;
mod state;
mod task_stage;
mod template;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

const RECIPES: &str = "\
Pipe: SOURCE | STAGE | ... | SINK, or ... | branch | error:... success:...
  sources  lines(FILE) lines(-)=stdin (the default)  seq(1..100[, step])  args(a, b)
           sql(DB, \"SELECT ...\", KEY_COLUMN)  ·  `::: a b c` after the pipe = args
  tasks    sh(\"cmd {}\")  ({} = the item, quoted where the shell needs it; {#} {%} {.} {/}
           {//} {/.} {1} {2.} ... as in parallel; without {} the item goes to stdin)
           http(URL) or http(METHOD, URL[, BODY])  ({}, {1}, {.}.. in URL/body)
  policies fork(N)  rate(N/s[, BURST])  inflight(N)  timeout(5s)  retry(N[, 200ms..10s])
           breaker(FAILURES[, COOLDOWN])  adaptive(MIN..MAX)
           key(TEMPLATE[, PER_KEY])  (in order per key: inputs whose TEMPLATE, e.g. {1},
           renders the same run one at a time (PER_KEY at most) in input order; other keys
           run beside them)
           They apply to every task after them; written after the last task, to it.
  ops      filter(\"REGEX\")  reject(\"REGEX\")  dedup[(WINDOW)]  batch(N[, WAIT])
  sinks    print (default)  jsonl(FILE)  file(PATH)  discard    (files are appended to)
  branch   splits task results: error:retry(N[, MIN..MAX]) re-runs the failed task;
           error:SINK takes the failures; success:... goes on. Failures that end nowhere
           go to the dead-letter file (--dead-letter).

GNU parallel's command line works as it is: flowline -j4 gzip -9 {} ::: *.log
  (:::, ::::, :::+, -a, --colsep, -0, -N/-n/-X, --halt, --timeout, --retries, --tag, -k,
  --joblog/--resume, --dry-run, --line-buffer, -u, -q, ...: see the options below)

Recipes (GNU parallel / xargs  =>  flowline pipe):
  parallel -j4 curl -fsS {} < urls.txt
      flowline 'fork(4) | sh(\"curl -fsS {}\")' < urls.txt
  xargs -P8 -n1 gzip < files.txt
      flowline 'lines(files.txt) | fork(8) | sh(\"gzip {}\") | discard'
  xargs -n100 rm < list.txt
      flowline 'lines(list.txt) | batch(100) | sh(\"rm {}\") | discard'
  parallel echo ::: a b c
      flowline 'sh(\"echo {}\")' ::: a b c
  seq 1 1000 | parallel -j16 curl -s http://api/users/{}
      flowline 'seq(1..1000) | fork(16) | http(http://api/users/{}) | jsonl(users.jsonl)'
  parallel --retries 3 --timeout 5 ...      (no backoff, no rate limit in parallel)
      flowline '... | retry(3, 200ms..10s) | timeout(5s) | rate(20/s) | sh(\"...\")'
  parallel --joblog log --resume ...         (keyed by sequence number)
      flowline --state run.db --joblog log '...'       (keyed by the input)
  parallel --retry-failed --joblog log
      flowline --state run.db --retry-failed '...'
  one account's updates in order, accounts in parallel (no equivalent in parallel):
      flowline --colsep '\\t' 'lines(events.tsv) | fork(16) | key({1}) | sh(\"apply {2}\")'
  parallel -k ... / parallel --bar ...
      flowline -k '...' / flowline --progress '...'
  stop hammering a dead service (no equivalent):
      flowline '... | breaker(5, 10s) | http(...)'   pauses the input while open

Several machines (parallel --sshlogin, without ssh): a Redis stream is the queue.
  flowline --queue redis://HOST[:PORT]/NAME --worker 'PIPE'    on each worker machine
  flowline --queue redis://HOST[:PORT]/NAME 'PIPE'             feeds the inputs, prints results
  The same PIPE everywhere; fork(N) is per worker, rate(..) and inflight(..) are shared;
  key(..) on the first task keeps each key's jobs in order across all the workers.
  Limits read from files (-j FILE, rate(FILE)) are not taken with --queue.
  At least once: a killed worker's jobs run again on the others after --lease (30s); the
  feeder prints each result once and exits as a local run would. Rerun a killed feeder
  with the same command to resume.

Exit status: the number of failed inputs (101 = more than 100), 130 after a stop, 255 for
a bad pipe or option. Each job runs in its own process group. The first Ctrl-C (SIGINT,
SIGTERM, SIGHUP) starts nothing new and lets the running jobs finish (parallel's SIGHUP);
a second one, or --grace, kills every job's group.
Check a pipe without running it: flowline check 'PIPE'.";

#[derive(Parser, Debug)]
#[command(
    name = "flowline",
    version,
    about = "Run a pipe of stages over lines, numbers or rows: GNU parallel for API jobs, with rate limits, retries, a breaker, resume and progress. Also takes GNU parallel's own command line: flowline [OPTIONS] COMMAND ::: ARGS.",
    after_help = RECIPES
)]
struct Cli {
    /// The pipe, e.g. 'seq(1..10) | fork(4) | sh("echo {}")'; or, as with GNU parallel, a
    /// command and its words (`flowline -j4 gzip -9 {}`); `check PIPE` checks a pipe.
    #[arg(trailing_var_arg = true, value_name = "PIPE | COMMAND")]
    words: Vec<std::ffi::OsString>,

    /// Jobs at a time, for a task with no fork(N) before it: N, N% of the CPUs, +N or -N
    /// CPUs, 0 (no limit), or a file holding one of these, read again when a job ends if it
    /// changed, or on SIGUSR1 (default: the number of CPUs).
    #[arg(short = 'j', long, visible_alias = "max-procs", value_name = "N")]
    jobs: Option<String>,

    /// Keep the output in input order (like parallel -k); by default results go out as
    /// they finish.
    #[arg(short = 'k', long)]
    keep_order: bool,

    /// Show progress on stderr: a bar with ETA when the number of inputs is known.
    #[arg(long, visible_alias = "bar")]
    progress: bool,

    /// Show the estimated time left on stderr (a progress bar, as --progress).
    #[arg(long)]
    eta: bool,

    /// SQLite file of done and failed inputs: a rerun skips the inputs done.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,

    /// With --state: run only the inputs that failed before.
    #[arg(long)]
    retry_failed: bool,

    /// Log each call in GNU parallel's joblog format.
    #[arg(long, value_name = "FILE")]
    joblog: Option<PathBuf>,

    /// With --joblog: skip the jobs the joblog has (by job number), as parallel --resume.
    #[arg(long)]
    resume: bool,

    /// With --joblog: skip the jobs the joblog has as succeeded; run the failed ones again.
    #[arg(long)]
    resume_failed: bool,

    /// Where failures that end nowhere are written (JSON lines).
    #[arg(long, value_name = "FILE", default_value = "flowline-failed.jsonl")]
    dead_letter: PathBuf,

    /// No report at the end.
    #[arg(long)]
    quiet: bool,

    /// After a first Ctrl-C / SIGTERM / SIGHUP, kill the running jobs if they have not
    /// finished within this time (like `5s`, `2m`); by default they may run until a second
    /// signal.
    #[arg(long, value_name = "DURATION", value_parser = parse_grace)]
    grace: Option<std::time::Duration>,

    /// Quote the command's words, so that the shell reads each as one word (parallel -q).
    #[arg(short = 'q', long)]
    quote: bool,

    /// Read the inputs from FILE (several: combined, as `::::`).
    #[arg(short = 'a', long = "arg-file", value_name = "FILE")]
    arg_file: Vec<std::ffi::OsString>,

    /// Inputs end with a NUL byte, not a newline.
    #[arg(short = '0', long = "null")]
    null: bool,

    /// Split each input into the arguments {1}, {2}, ... at this regex.
    #[arg(long, value_name = "REGEX")]
    colsep: Option<String>,

    /// N inputs per job: {1} to {N} (parallel -N).
    #[arg(short = 'N', value_name = "N")]
    max_replace_args: Option<usize>,

    /// At most N inputs per job, all in {} (parallel -n).
    #[arg(short = 'n', long = "max-args", value_name = "N")]
    max_args: Option<usize>,

    /// As many inputs per job as fit (parallel -X; -m likewise).
    #[arg(short = 'X', visible_short_alias = 'm')]
    xargs: bool,

    /// Stop when jobs fail or succeed: now|soon,fail|success=N|N% (parallel --halt).
    #[arg(long, visible_alias = "halt-on-error", value_name = "WHEN,WHAT=N")]
    halt: Option<String>,

    /// Print the commands, run nothing.
    #[arg(long)]
    dry_run: bool,

    /// Wait this long between job starts (seconds, or with a unit).
    #[arg(long, value_name = "DURATION")]
    delay: Option<String>,

    /// Kill a job after this long (seconds, or with a unit), or after N% of the median
    /// run time of the jobs that succeeded so far.
    #[arg(long, value_name = "DURATION|N%")]
    timeout: Option<String>,

    /// Run a failing job up to N times in all (parallel --retries).
    #[arg(long, value_name = "N")]
    retries: Option<u32>,

    /// In order per key: the jobs whose TEMPLATE (replacement strings as in the command,
    /// e.g. `{1}` with --colsep) renders the same run one at a time, in input order; jobs
    /// of other keys run beside them (the pipe's `key(TEMPLATE[, PER_KEY])`).
    #[arg(long, value_name = "TEMPLATE")]
    key: Option<String>,

    /// Put the arguments before each line of a job's output, and a tab.
    #[arg(long)]
    tag: bool,

    /// Put this (replacement strings allowed) before each line of output, and a tab.
    #[arg(long, value_name = "STR")]
    tagstring: Option<String>,

    /// Keep each job's output in files, as parallel: `NAME/1/<arg>/{stdout,stderr,seq}`,
    /// or, when NAME has replacement strings (`out/{1}`), in that file, `.err` and `.seq`.
    #[arg(long, value_name = "NAME")]
    results: Option<PathBuf>,

    /// Run the jobs in a random order.
    #[arg(long)]
    shuf: bool,

    /// Start a job only while fewer than this many processes run (N, N% of the CPUs, +N,
    /// -N), as parallel --load.
    #[arg(long, value_name = "MAX")]
    load: Option<String>,

    /// Start a job only while this much memory is free (bytes, or 512M, 2G, 1.5g), as
    /// parallel --memfree; a running job is never killed for it.
    #[arg(long, value_name = "SIZE")]
    memfree: Option<String>,

    /// Run the jobs with this niceness.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    nice: Option<i32>,

    /// Print each command before its output.
    #[arg(short = 'v')]
    verbose: bool,

    /// Do not print the commands (undoes -v).
    #[arg(long)]
    silent: bool,

    /// Pass a job's output on in whole lines as they come (lines of jobs interleave).
    #[arg(long)]
    line_buffer: bool,

    /// Let the jobs write to the output directly (their lines may mix).
    #[arg(short = 'u', long)]
    ungroup: bool,

    /// Spread the job over several machines through a Redis stream: without --worker,
    /// feed the inputs to the queue NAME and print the results the workers send back;
    /// with --worker, run the jobs of the queue.
    #[arg(long, value_name = "redis://HOST[:PORT]/NAME")]
    queue: Option<String>,

    /// With --queue: run the queue's jobs (on any number of machines, the same pipe).
    #[arg(long)]
    worker: bool,

    /// With --worker: how long a worker's jobs stay its own without a sign of life; a
    /// killed worker's jobs run on the others after this (default 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_grace)]
    lease: Option<std::time::Duration>,

    /// Accepted for GNU parallel compatibility; nothing to cite here.
    #[arg(long, hide = true)]
    will_cite: bool,
}

fn parse_grace(text: &str) -> Result<std::time::Duration, String> {
    spec::parse_duration(text).map_err(|why| format!("`{text}` {why}"))
}

/// The arguments with a `--` where the command starts, as parallel reads them: options
/// until the first word that is not one (or an option's value), then the command's words,
/// whatever they look like (`flowline -j2 grep -v x {}`: `-v` is grep's).
fn options_then_words(argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let takes_value = |a: &clap::Arg| a.get_action().takes_values();
    let long_takes = |name: &str| -> Option<bool> {
        cmd.get_arguments()
            .find(|a| {
                a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|v| v.contains(&name))
            })
            .map(takes_value)
    };
    let short_takes = |c: char| -> Option<bool> {
        cmd.get_arguments()
            .find(|a| {
                a.get_short() == Some(c)
                    || a.get_all_short_aliases().is_some_and(|v| v.contains(&c))
            })
            .map(takes_value)
    };
    let mut out = Vec::with_capacity(argv.len() + 1);
    let mut it = argv.into_iter();
    if let Some(prog) = it.next() {
        out.push(prog);
    }
    while let Some(a) = it.next() {
        let Some(text) = a.to_str().map(str::to_string) else {
            out.push("--".into());
            out.push(a);
            break;
        };
        if text == "--" {
            out.push(a);
            break;
        }
        if let Some(long) = text.strip_prefix("--") {
            out.push(a.clone());
            if !long.contains('=') && long_takes(long) == Some(true) {
                if let Some(v) = it.next() {
                    out.push(v);
                }
            }
            continue;
        }
        if text.len() > 1 && text.starts_with('-') {
            out.push(a.clone());
            // `-kj2`: flags, then one that takes the rest (or the next word) as its value.
            for (i, c) in text.char_indices().skip(1) {
                match short_takes(c) {
                    Some(true) => {
                        if i + c.len_utf8() == text.len() {
                            if let Some(v) = it.next() {
                                out.push(v);
                            }
                        }
                        break;
                    }
                    Some(false) => continue,
                    None => break,
                }
            }
            continue;
        }
        out.push("--".into());
        out.push(a);
        break;
    }
    out.extend(it);
    out
}

/// Exit status for a bad pipe or option (GNU parallel's "other error").
const BAD_USAGE: u8 = 255;

fn compile(text: &str, source: spec::Source) -> Result<spec::Plan, String> {
    parse::parse(text)
        .and_then(|p| spec::plan(&p, source))
        .map_err(|e| e.render(text))
}

/// Whether a single word is a pipe rather than a command: it starts with the name of a
/// stage flowline has, followed by `(`, `|` or nothing (a broken pipe still counts, so that
/// its error is shown).
fn is_pipe(text: &str) -> bool {
    let t = text.trim_start();
    let name_len = t
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(t.len());
    let (name, rest) = t.split_at(name_len);
    let rest = rest.trim_start();
    spec::all_stage_names().any(|k| k == name)
        && (rest.is_empty() || rest.starts_with('(') || rest.starts_with('|'))
}

fn describe(plan: &spec::Plan) -> String {
    use std::fmt::Write;
    let mut s = format!("source: {:?}\n", plan.source);
    let chain = |s: &mut String, label: &str, c: &spec::Chain| {
        for step in &c.steps {
            match step {
                spec::Step::Task(t) => {
                    let _ = writeln!(s, "{label}task {}: {:?}", t.name, t.kind);
                    let _ = writeln!(s, "{label}  policies: {:?}", t.policies);
                }
                other => {
                    let _ = writeln!(s, "{label}{other:?}");
                }
            }
        }
        let _ = writeln!(
            s,
            "{label}sink: {:?}",
            c.sink.clone().unwrap_or(spec::Sink::Print)
        );
    };
    chain(&mut s, "", &plan.main);
    if plan.branched {
        chain(
            &mut s,
            "success: ",
            &plan.success.clone().unwrap_or_default(),
        );
        match &plan.error {
            Some(e) => {
                if let Some(r) = &e.retry {
                    let _ = writeln!(s, "error: retry {r:?}");
                }
                chain(&mut s, "error: ", &e.chain);
            }
            None => s.push_str("error: dead-letter file\n"),
        }
    }
    s
}

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == jobs::GUARD_ARG)
    {
        jobs::guard_main();
        return ExitCode::SUCCESS;
    }
    // Input groups end the options: what follows a `:::` is an input, whatever it is.
    let (argv, groups) = compat::split_groups(std::env::args_os().collect());
    let cli = match Cli::try_parse_from(options_then_words(argv)) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(BAD_USAGE),
            };
        }
    };
    match setup(cli, groups) {
        Ok(Setup::Checked(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Setup::Run(plan, settings)) => execute(*plan, *settings),
        Ok(Setup::Queue {
            plan,
            settings,
            queue,
            worker,
        }) => block_on(async move {
            match worker {
                Some(lease) => queue::worker::run(*plan, *settings, queue, lease).await,
                None => queue::feeder::run(*plan, *settings, queue).await,
            }
        }),
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            ExitCode::from(BAD_USAGE)
        }
    }
}

enum Setup {
    Checked(String),
    Run(Box<spec::Plan>, Box<run::Settings>),
    /// A run through a queue: its feeder, or (with the lease) a worker.
    Queue {
        plan: Box<spec::Plan>,
        settings: Box<run::Settings>,
        queue: queue::Queue,
        worker: Option<std::time::Duration>,
    },
}

/// The plan and settings from the command line; every problem found, not just the first.
fn setup(cli: Cli, groups: Vec<compat::Group>) -> Result<Setup, Vec<String>> {
    let mut errors: Vec<String> = Vec::new();
    let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
    let jobs = match cli.jobs.as_deref().map(|j| compat::jobs(j, cpus)) {
        None => cpus,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            errors.push(format!("error: {e}"));
            1
        }
    };
    let delim = if cli.null { 0 } else { b'\n' };
    let colsep = match cli.colsep.as_deref().map(regex::bytes::Regex::new) {
        None => None,
        Some(Ok(re)) => Some(re),
        Some(Err(e)) => {
            errors.push(format!("error: --colsep: not a valid regex: {e}"));
            None
        }
    };
    let halt = match cli.halt.as_deref().map(compat::Halt::parse) {
        None => None,
        Some(Ok(h)) => h,
        Some(Err(e)) => {
            errors.push(format!("error: {e}"));
            None
        }
    };
    let timeout = match cli.timeout.as_deref().map(compat::timeout) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            errors.push(format!("error: {e}"));
            None
        }
    };
    let gate = gate::StartGate::parse(cli.load.as_deref(), cli.memfree.as_deref(), cpus)
        .unwrap_or_else(|e| {
            errors.extend(e);
            None
        });
    let delay = match cli.delay.as_deref().map(spec::parse_duration) {
        None => None,
        Some(Ok(d)) if !d.is_zero() => Some(d),
        Some(Ok(_)) => None,
        Some(Err(why)) => {
            errors.push(format!(
                "error: --delay `{}` {why}",
                cli.delay.as_deref().unwrap_or_default()
            ));
            None
        }
    };
    for (name, v) in [("-N", cli.max_replace_args), ("--max-args", cli.max_args)] {
        if v == Some(0) || v.is_some_and(|n| n > 100_000) {
            errors.push(format!(
                "error: {name} `{}` must be from 1 to 100000",
                v.unwrap_or_default()
            ));
        }
    }
    if cli.retries == Some(0) || cli.retries.is_some_and(|n| n > 1001) {
        errors.push(format!(
            "error: --retries `{}` must be from 1 to 1001",
            cli.retries.unwrap_or_default()
        ));
    }
    if (cli.resume || cli.resume_failed) && cli.joblog.is_none() {
        errors.push("error: --resume and --resume-failed need --joblog FILE".into());
    }
    let key = match cli.key.as_deref().map(key::option) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => {
            errors.push(e);
            None
        }
    };
    if cli.line_buffer && cli.ungroup {
        errors.push("error: --line-buffer and -u (--ungroup) exclude each other".into());
    }
    let queue = queue_options(&cli, !groups.is_empty(), &mut errors);
    if cli.words.first().is_some_and(|w| w == "check") && cli.words.len() == 2 {
        let text = cli.words[1].to_string_lossy().into_owned();
        return match compile(&text, spec::Source::Lines(None)) {
            Ok(plan) => Ok(Setup::Checked(format!("ok\n{}", describe(&plan)))),
            Err(e) => Err(vec![e]),
        };
    }

    // The inputs: `:::` groups and `-a` files, else stdin.
    let mut groups = groups;
    for f in &cli.arg_file {
        groups.insert(
            0,
            compat::Group {
                files: true,
                linked: false,
                values: vec![f.clone()],
            },
        );
    }
    let mut source = spec::Source::Lines(None);
    if !groups.is_empty() {
        match compat::table(&groups, delim) {
            Ok(mut rows) => {
                if rows.iter().all(|r| r.len() == 1) {
                    source =
                        spec::Source::Args(rows.iter_mut().map(|r| r.swap_remove(0)).collect());
                } else {
                    source = spec::Source::Table(rows);
                }
            }
            Err(e) => errors.push(format!("error: {e}")),
        }
    }

    let pipe_text = match cli.words.as_slice() {
        [one] => one.to_str().filter(|t| is_pipe(t)).map(str::to_string),
        _ => None,
    };
    let mut plan = match pipe_text {
        Some(text) => match compile(&text, source) {
            Ok(p) => Some(p),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        None if cli.words.is_empty() => {
            errors.push("error: no pipe or command given; try `flowline --help`".into());
            None
        }
        None => match compat::command_text(&cli.words, cli.quote) {
            Ok(cmd) => Some(spec::Plan::command(source, cmd)),
            Err(e) => {
                errors.push(format!("error: {e}"));
                None
            }
        },
    };
    if let (Some(k), Some(p)) = (&cli.key, &plan) {
        if p.main_tasks().next().is_none() {
            errors.push(format!(
                "error: --key `{}`: the pipe has no task (sh(..) or http(..)) to key",
                k.escape_debug()
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let Some(mut plan) = plan.take() else {
        return Err(vec!["error: nothing to run".into()]);
    };
    // `--key` first, so that the queue's checks see it.
    plan.apply_options(spec::Options {
        key,
        ..spec::Options::default()
    });
    if queue.is_some() {
        let problems = queue::check_plan(&plan);
        if !problems.is_empty() {
            return Err(problems);
        }
    }
    // Options that are policies of the first task, as its pipe stages would be.
    let per_job = cli
        .max_replace_args
        .or(cli.max_args)
        .or(cli.xargs.then_some(5000));
    plan.apply_options(spec::Options {
        timeout: match timeout {
            Some(compat::Timeout::Fixed(d)) => Some(d),
            _ => None,
        },
        retries: cli.retries.map(|n| n - 1),
        delay,
        args_per_job: per_job,
        key: None,
    });
    let job_opts = exec::JobOpts {
        output: if cli.ungroup {
            exec::OutputMode::Ungrouped
        } else if cli.line_buffer {
            exec::OutputMode::Lines
        } else {
            exec::OutputMode::Grouped
        },
        verbose: cli.verbose && !cli.silent,
        dry_run: cli.dry_run,
        nice: cli.nice,
        timeout_percent: match timeout {
            Some(compat::Timeout::Percent(p)) => Some(p),
            _ => None,
        },
        results: cli
            .results
            .as_deref()
            .map(|r| std::sync::Arc::new(results::Results::new(r))),
        gate,
        tag: match (&cli.tagstring, cli.tag) {
            (Some(t), _) => Some(template::Template::parse(t)),
            (None, true) => Some(template::Template::parse("{}")),
            (None, false) => None,
        },
    };
    let worker = cli.worker.then(|| cli.lease.unwrap_or(DEFAULT_LEASE));
    let jobs_file = cli
        .jobs
        .as_deref()
        .and_then(compat::jobs_file)
        .map(|p| (p.to_path_buf(), cpus));
    let settings = Box::new(run::Settings {
        jobs,
        jobs_file,
        keep_order: cli.keep_order,
        progress: cli.progress || cli.eta,
        state: cli.state,
        retry_failed: cli.retry_failed,
        joblog: cli.joblog,
        resume: if cli.resume_failed {
            run::Resume::Failed
        } else if cli.resume {
            run::Resume::Done
        } else {
            run::Resume::No
        },
        dead_letter: cli.dead_letter,
        quiet: cli.quiet,
        grace: cli.grace,
        delim,
        colsep,
        job_opts,
        halt,
        shuffle: cli.shuf,
    });
    Ok(match queue {
        Some(queue) => Setup::Queue {
            plan: Box::new(plan),
            settings,
            queue,
            worker,
        },
        None => Setup::Run(Box::new(plan), settings),
    })
}

/// How long a worker's jobs stay its own without a sign of life (`--lease`).
const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// The queue of `--queue`, with every problem of the queue options added to `errors`:
/// the URL, `--worker` or `--lease` without what they need, and the options a run
/// through a queue does not take.
fn queue_options(cli: &Cli, inputs: bool, errors: &mut Vec<String>) -> Option<queue::Queue> {
    let q = match &cli.queue {
        Some(url) => match queue::Queue::parse(url) {
            Ok(q) => Some(q),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        None => None,
    };
    if cli.queue.is_none() {
        if cli.worker {
            errors.push("error: --worker needs --queue redis://HOST[:PORT]/NAME".into());
        }
        if cli.lease.is_some() {
            errors.push("error: --lease needs --queue redis://HOST[:PORT]/NAME --worker".into());
        }
        return None;
    }
    if let Some(lease) = cli.lease {
        if !cli.worker {
            errors.push("error: --lease is a worker's option: give it with --worker".into());
        }
        let range = std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(86_400);
        if !range.contains(&lease) {
            errors.push(format!(
                "error: --lease `{lease:?}` must be from 100ms to 24h"
            ));
        }
    }
    if cli.worker && (inputs || !cli.arg_file.is_empty()) {
        errors.push(
            "error: --worker takes no inputs (`:::`, `::::`, -a): the feeder, the same command without --worker, gives them"
                .into(),
        );
    }
    let unsupported = [
        ("--state", cli.state.is_some()),
        ("--retry-failed", cli.retry_failed),
        ("--joblog", cli.joblog.is_some()),
        ("--resume", cli.resume),
        ("--resume-failed", cli.resume_failed),
        ("--halt", cli.halt.is_some()),
        ("--shuf", cli.shuf),
        ("--progress/--bar/--eta", cli.progress || cli.eta),
        ("-u (--ungroup)", cli.ungroup),
        ("--line-buffer", cli.line_buffer),
        (
            "-N/-n/-X",
            cli.max_replace_args.is_some() || cli.max_args.is_some() || cli.xargs,
        ),
        ("--dry-run", cli.dry_run),
        ("--results", cli.results.is_some()),
    ];
    if let Some(file) = cli.jobs.as_deref().and_then(compat::jobs_file) {
        errors.push(format!(
            "error: -j `{}`: a -j read from a file is not supported with --queue (a worker reads its options once); give -j N",
            file.display()
        ));
    }
    for (flag, _) in unsupported.iter().filter(|(_, given)| *given) {
        errors.push(format!(
            "error: {flag} is not supported with --queue (the queue keeps the run's state in Redis)"
        ));
    }
    q
}

fn execute(plan: spec::Plan, settings: run::Settings) -> ExitCode {
    let plain = settings.state.is_none()
        && !settings.progress
        && settings.joblog.is_none()
        && settings.delim == b'\n'
        && settings.colsep.is_none()
        && !settings.shuffle;
    if let Some(lf) = linefilter::LineFilter::of(&plan).filter(|_| plain) {
        return match lf.run() {
            Ok(c) => {
                if !settings.quiet {
                    eprintln!("flowline: {} lines, {} kept", c.lines, c.kept);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(BAD_USAGE)
            }
        };
    }
    block_on(run::run(plan, settings))
}

/// Runs a run to its end on a runtime of its own; its exit status.
fn block_on(run: impl std::future::Future<Output = Result<run::Outcome, String>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(BAD_USAGE);
        }
    };
    match rt.block_on(run) {
        Ok(o) => ExitCode::from(o.exit_code()),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(BAD_USAGE)
        }
    }
}
