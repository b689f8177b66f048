//! `flowline-bench <suite>`: runs one benchmark suite, one JSON line per case.

mod source;

fn main() {
    let suite = std::env::args().nth(1).unwrap_or_default();
    match suite.as_str() {
        "source" => source::run(),
        other => {
            eprintln!("unknown suite {other:?}; suites: source");
            std::process::exit(2);
        }
    }
}
