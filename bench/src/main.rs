mod batch;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("batch") => batch::run(),
        other => eprintln!("unknown suite {other:?}; suites: batch"),
    }
}
