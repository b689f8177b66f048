mod flow;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("flow") => flow::run(&args[2..]),
        other => eprintln!("unknown suite {other:?}; suites: flow"),
    }
}
