mod topology;

fn main() {
    let suite = std::env::args().nth(1).unwrap_or_default();
    match suite.as_str() {
        "topology" => topology::run(),
        other => eprintln!("unknown suite `{other}`"),
    }
}
