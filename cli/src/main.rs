//! `flowline`: GNU parallel for API jobs, as a pipe of flowline stages.
//!
//! ```sh
//! flowline 'lines(urls.txt) | fork(10) | rate(20/s) | sh("curl -fsS {}") | timeout(5s)
//!           | branch | error:retry(5, 200ms..10s) success:print'
//! ```

#![forbid(unsafe_code)]

mod exec;
mod jobs;
mod parse;
mod run;
mod spec;
mod state;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

const RECIPES: &str = "\
Pipe: SOURCE | STAGE | ... | SINK, or ... | branch | error:... success:...
  sources  lines(FILE) lines(-)=stdin (the default)  seq(1..100[, step])  args(a, b)
           sql(DB, \"SELECT ...\", KEY_COLUMN)  ·  `::: a b c` after the pipe = args
  tasks    sh(\"cmd {}\")  ({} = the item, shell-quoted; {#} = its number; without {} the
           item goes to stdin)   http(URL) or http(METHOD, URL[, BODY])  ({} in URL/body)
  policies fork(N)  rate(N/s[, BURST])  inflight(N)  timeout(5s)  retry(N[, 200ms..10s])
           breaker(FAILURES[, COOLDOWN])  adaptive(MIN..MAX)
           They apply to every task after them; written after the last task, to it.
  ops      filter(\"REGEX\")  reject(\"REGEX\")  dedup[(WINDOW)]  batch(N[, WAIT])
  sinks    print (default)  jsonl(FILE)  file(PATH)  discard    (files are appended to)
  branch   splits task results: error:retry(N[, MIN..MAX]) re-runs the failed task;
           error:SINK takes the failures; success:... goes on. Failures that end nowhere
           go to the dead-letter file (--dead-letter).

Recipes (GNU parallel / xargs  =>  flowline):
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
  parallel -k ... / parallel --bar ...
      flowline -k '...' / flowline --progress '...'
  stop hammering a dead service (no equivalent):
      flowline '... | breaker(5, 10s) | http(...)'   pauses the input while open

Exit status: the number of failed inputs (101 = more than 100), 130 when interrupted,
255 for a bad pipe or option. Ctrl-C stops gracefully with a report; a second one cancels.
Check a pipe without running it: flowline check 'PIPE'.";

#[derive(Parser, Debug)]
#[command(
    name = "flowline",
    version,
    about = "Run a pipe of stages over lines, numbers or rows: GNU parallel for API jobs, with rate limits, retries, a breaker, resume and progress.",
    after_help = RECIPES,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,

    /// The pipe, e.g. 'seq(1..10) | fork(4) | sh("echo {}")'.
    pipe: Option<String>,

    /// Workers of a task with no fork(N) before it (default: the number of CPUs).
    #[arg(short = 'j', long)]
    jobs: Option<usize>,

    /// Keep the output in input order (like parallel -k); by default results go out as
    /// they finish.
    #[arg(short = 'k', long)]
    keep_order: bool,

    /// Show progress on stderr: a bar with ETA when the number of inputs is known.
    #[arg(long)]
    progress: bool,

    /// SQLite file of done and failed inputs: a rerun skips the inputs done.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,

    /// With --state: run only the inputs that failed before.
    #[arg(long)]
    retry_failed: bool,

    /// Log each call in GNU parallel's joblog format.
    #[arg(long, value_name = "FILE")]
    joblog: Option<PathBuf>,

    /// Where failures that end nowhere are written (JSON lines).
    #[arg(long, value_name = "FILE", default_value = "flowline-failed.jsonl")]
    dead_letter: PathBuf,

    /// No report at the end.
    #[arg(short, long)]
    quiet: bool,

    /// After a first Ctrl-C / SIGTERM / SIGHUP, kill the running jobs if they have not
    /// finished within this time (like `5s`, `2m`); by default they may run until a second
    /// signal.
    #[arg(long, value_name = "DURATION", value_parser = parse_grace)]
    grace: Option<std::time::Duration>,
}

fn parse_grace(text: &str) -> Result<std::time::Duration, String> {
    spec::parse_duration(text).map_err(|why| format!("`{text}` {why}"))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check a pipe without running it, and show what each task will do.
    Check {
        /// The pipe.
        pipe: String,
    },
}

/// Exit status for a bad pipe or option (GNU parallel's "other error").
const BAD_USAGE: u8 = 255;

fn compile(text: &str, args: Option<Vec<String>>) -> Result<spec::Plan, String> {
    let default_source = match args {
        Some(args) => spec::Source::Args(args),
        None => spec::Source::Lines(None),
    };
    parse::parse(text)
        .and_then(|p| spec::plan(&p, default_source))
        .map_err(|e| e.render(text))
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
    // `::: a b c` ends the options: what follows are inputs, whatever they look like.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let inputs = argv.iter().position(|a| a == ":::").map(|i| {
        let rest = argv.split_off(i);
        rest[1..]
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    });
    let cli = Cli::parse_from(argv);
    if let Some(Cmd::Check { pipe }) = &cli.command {
        return match compile(pipe, None) {
            Ok(plan) => {
                print!("ok\n{}", describe(&plan));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(BAD_USAGE)
            }
        };
    }
    let Some(text) = cli.pipe.as_deref() else {
        eprintln!("error: no pipe given; try `flowline --help`");
        return ExitCode::from(BAD_USAGE);
    };
    let plan = match compile(text, inputs) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(BAD_USAGE);
        }
    };
    let jobs = match cli.jobs {
        Some(0) | Some(65_537..) => {
            eprintln!("error: --jobs must be from 1 to 65536");
            return ExitCode::from(BAD_USAGE);
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(4, |n| n.get()),
    };
    let settings = run::Settings {
        jobs,
        keep_order: cli.keep_order,
        progress: cli.progress,
        state: cli.state,
        retry_failed: cli.retry_failed,
        joblog: cli.joblog,
        dead_letter: cli.dead_letter,
        quiet: cli.quiet,
        grace: cli.grace,
    };
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
    match rt.block_on(run::run(plan, settings)) {
        Ok(o) if o.interrupted => ExitCode::from(130),
        Ok(o) => ExitCode::from(o.failures.min(101) as u8),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(BAD_USAGE)
        }
    }
}
