//! flowline-bench: runs flowline and a hand-written baseline side by side in one process and
//! prints one JSON object per case:
//! `{"suite","case","flowline","baseline","unit","ratio", ...case fields}`.
//!
//! ```sh
//! cargo run --release -p flowline-bench -- core            # every case of a suite
//! cargo run --release -p flowline-bench -- core hops8      # one case
//! cargo run --release -p flowline-bench -- source progress_overhead
//! cargo run --release -p flowline-bench -- source cursor_pg    # starts its own PostgreSQL
//! cargo run --release -p flowline-bench -- batch batch
//! cargo run --release -p flowline-bench -- flow 3          # flow, 3 s per rate case
//! cargo run --release -p flowline-bench -- flow adaptive   # cases named adaptive*
//! cargo run --release -p flowline-bench -- scale redis_rate3  # 3 processes, one RedisRate
//! cargo run --release -p flowline-bench -- cli             # the flowline command vs xargs / parallel / curl
//! cargo run --release -p flowline-bench -- siem            # the SIEM service vs its naive version
//! cargo run --release -p flowline-bench -- faults          # servers failing around a job
//! cargo run --release -p flowline-bench -- faults redis_kill
//! cargo run --release -p flowline-bench -- faults pg_stop5  # a run through a server fault vs none
//! cargo run --release -p flowline-bench -- window          # event-time windows vs hand-written loops
//! cargo run --release -p flowline-bench -- keyed           # key_by vs the critical path, partition, no keys
//! ```
//!
//! With `FLOWLINE_BENCH_REPS=1` set, the cases that alternate print every repetition's time
//! (milliseconds) to stderr, so the spread behind a median can be read.

mod batch;
mod cli;
mod core;
mod faults_redis;
mod faults_sql;
mod flow;
mod keyed;
#[path = "../../testsuite/tests/support/pg.rs"]
#[allow(dead_code)]
mod pg_server;
mod scale;
mod scale_rate;
mod siem;
mod siem_floor;
mod source;
mod source_pg;
mod topology;
mod util;
mod window;

/// Suite `faults`: one entry per server's file; each runs its own cases (all of them for
/// no case) and leaves the others' cases alone.
const FAULTS: &[fn(Option<&str>)] = &[faults_redis::run, faults_sql::run];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--rss-child") {
        core::rss_child(args.get(1).map(String::as_str).unwrap_or("flowline"));
        return;
    }
    if args.first().map(String::as_str) == Some("--rate-child") && args.len() == 3 {
        scale_rate::child(&args[1], &args[2]);
        return;
    }
    if args.first().map(String::as_str) == Some("--faults-redis-worker") {
        faults_redis::worker(&args[1..]);
        return;
    }
    if args.first().map(String::as_str) == Some("--siem-child") {
        siem::child(&args[1..]);
        return;
    }
    if args.first().map(String::as_str) == Some("--scale-worker") {
        scale::worker(&args[1..]);
        return;
    }
    let suite = args.first().map(String::as_str).unwrap_or("core");
    let case = args.get(1).map(String::as_str);
    match suite {
        "core" => core::run(case),
        "source" => source::run(case),
        "batch" => batch::run(case),
        "flow" => flow::run(&args[1..]),
        "topology" => topology::run(case),
        "cli" => cli::run(case),
        "scale" => scale::run(case),
        "siem" => siem::run(case),
        "faults" => FAULTS.iter().for_each(|run| run(case)),
        "window" => window::run(case),
        "keyed" => keyed::run(case),
        other => {
            eprintln!(
                "unknown suite `{other}`; suites: core, source, batch, flow, topology, cli, scale, siem, faults, window, keyed"
            );
            std::process::exit(2);
        }
    }
}
