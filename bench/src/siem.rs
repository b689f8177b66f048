//! The SIEM service (examples/siem) under load, flowline's pipeline against the naive
//! handler that does everything inline per request.
//!
//! `siem_events`: 64 connections post events for `FLOWLINE_BENCH_SIEM_SECS` seconds (10 by
//! default) while 3 websocket clients listen. Throughput is events delivered to the clients
//! over the time to the last delivery; latency is from the POST being sent to the event's
//! arrival at a websocket client; `lost` counts events answered 202 but not stored, or not
//! delivered to some client, summed over the rounds. Same database settings for both (WAL, synchronous=NORMAL),
//! same fake notifier (20 ms per notification, 1 event in 100 alerts).
//! Three alternating rounds (flowline, naive, flowline, ...; `FLOWLINE_BENCH_SIEM_REPS=n`
//! for n): `ratio` is the median of the rounds' ratios, each round's flowline run against
//! the naive run right after it (this VM's speed drifts by more than the margin over the
//! minutes a run takes; `round_ratios` lists them all); `flowline`/`baseline` and the
//! latency fields are each side's median round by throughput.
//! `FLOWLINE_BENCH_SIEM_REPORT=1` prints the events pipeline's report of each flowline run.
//! Both services answer 202 once the event's row is committed, and run without correlation
//! rules (the naive one has none).
//!
//! The floors, measured in the same rounds under the same load (bench/src/siem_floor.rs):
//! `floor_events_per_s`, a bare service doing only what any implementation must (parse and
//! validate, group commit to the same table with the same settings, broadcast, 202), and
//! `floor_http_only_events_per_s`, the same without the database. `floor_ratio` and
//! `floor_http_only_ratio` are the floors' own ratios to the naive service, computed as
//! `ratio` is (median of the rounds); below 3, `goal_above_floor` /
//! `goal_above_http_only_floor` say so: no organisation of the work reaches the goal on
//! this machine then (above the HTTP-only floor, not even without a database).
//!
//! `lost_on_kill`: each service once more, in a child process of this binary, under the
//! same load for `FLOWLINE_BENCH_SIEM_KILL_SECS` (3 by default), then SIGKILLed; the events
//! answered 202 that are not in the database afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio_tungstenite::tungstenite::Message;

use crate::siem_floor::{self, Floor};
use crate::util::{emit, runtime};

const CONNECTIONS: usize = 64;
const WS_CLIENTS: usize = 3;
const TOKEN: &str = "bench-viewer-token-0123456789";

pub fn run(case: Option<&str>) {
    match case {
        None | Some("siem_events") => siem_events(),
        Some(other) => {
            eprintln!("unknown case `{other}`; cases: siem_events");
            std::process::exit(2);
        }
    }
}

struct Outcome {
    events_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    lost: u64,
    accepted: u64,
    refused_429: u64,
    alerts_sent: u64,
}

fn siem_events() {
    let secs: u64 = std::env::var("FLOWLINE_BENCH_SIEM_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let reps: usize = std::env::var("FLOWLINE_BENCH_SIEM_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rt = runtime();
    let (mut f, mut n) = (Vec::new(), Vec::new());
    let (mut floor, mut floor_http) = (Vec::new(), Vec::new());
    let run_for = Duration::from_secs(secs);
    for _ in 0..reps.max(1) {
        f.push(rt.block_on(load(Side::Flowline, run_for)));
        n.push(rt.block_on(load(Side::Naive, run_for)));
        floor.push(rt.block_on(load(Side::Floor(Floor::Stored), run_for)));
        floor_http.push(rt.block_on(load(Side::Floor(Floor::HttpOnly), run_for)));
    }
    // Each floor against the naive run of its own round, as the ratio is: how many times
    // the naive service's rate the floor itself reaches here.
    let per_round = |floor: &[Outcome]| -> Vec<f64> {
        floor
            .iter()
            .zip(&n)
            .map(|(fl, n)| fl.events_per_s / n.events_per_s)
            .collect()
    };
    let (mut floor_ratios, mut floor_http_ratios) = (per_round(&floor), per_round(&floor_http));
    let floor_rates =
        |v: &[Outcome]| -> Vec<f64> { v.iter().map(|o| o.events_per_s.round()).collect() };
    let (floor_runs, floor_http_runs) = (floor_rates(&floor), floor_rates(&floor_http));
    let (floor_lost, floor_http_lost) = (
        floor.iter().map(|o| o.lost).sum::<u64>(),
        floor_http.iter().map(|o| o.lost).sum::<u64>(),
    );
    let mut ratios: Vec<f64> = f
        .iter()
        .zip(&n)
        .map(|(f, n)| f.events_per_s / n.events_per_s)
        .collect();
    let round_ratios: Vec<f64> = ratios.iter().copied().map(crate::util::round3).collect();
    let ratio = crate::util::quantile(&mut ratios, 0.5);
    // The median run of each by throughput.
    let pick = |v: &mut Vec<Outcome>| {
        v.sort_by(|a, b| a.events_per_s.total_cmp(&b.events_per_s));
        v.remove(v.len() / 2)
    };
    // Lost events are counted over every round, not only the median one.
    let lost = |v: &[Outcome]| v.iter().map(|o| o.lost).sum::<u64>() as f64;
    let (f_lost, n_lost) = (lost(&f), lost(&n));
    let (f, n) = (pick(&mut f), pick(&mut n));
    let (floor, floor_http) = (pick(&mut floor), pick(&mut floor_http));
    let goal = 3.0 * n.events_per_s;
    let round_floor_ratios: Vec<f64> = floor_ratios
        .iter()
        .copied()
        .map(crate::util::round3)
        .collect();
    let round_floor_http_ratios: Vec<f64> = floor_http_ratios
        .iter()
        .copied()
        .map(crate::util::round3)
        .collect();
    let floor_ratio = crate::util::quantile(&mut floor_ratios, 0.5);
    let floor_http_ratio = crate::util::quantile(&mut floor_http_ratios, 0.5);
    let kill_secs: u64 = std::env::var("FLOWLINE_BENCH_SIEM_KILL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let kill_f = rt.block_on(kill_round(false, Duration::from_secs(kill_secs)));
    let kill_n = rt.block_on(kill_round(true, Duration::from_secs(kill_secs)));
    let both = |a: f64, b: f64| serde_json::json!({ "flowline": a, "naive": b });
    let both_floor = |a: f64, b: f64| serde_json::json!({ "stored": a, "http_only": b });
    emit(
        "siem",
        "siem_events",
        f.events_per_s,
        n.events_per_s,
        "events/s",
        serde_json::json!({
            "events_per_s": both(f.events_per_s.round(), n.events_per_s.round()),
            "p50_ms": both(f.p50_ms, n.p50_ms),
            "p99_ms": both(f.p99_ms, n.p99_ms),
            "lost": both(f_lost, n_lost),
            "lost_on_kill": both(kill_f.0 as f64, kill_n.0 as f64),
            "accepted_before_kill": both(kill_f.1 as f64, kill_n.1 as f64),
            "accepted": both(f.accepted as f64, n.accepted as f64),
            "refused_429": both(f.refused_429 as f64, n.refused_429 as f64),
            "alerts_sent": both(f.alerts_sent as f64, n.alerts_sent as f64),
            "ratio": crate::util::round3(ratio),
            "round_ratios": round_ratios,
            "rounds": reps.max(1),
            "secs": secs,
            "connections": CONNECTIONS,
            "ws_clients": WS_CLIENTS,
            "goal_ratio": 3.0,
            "goal_events_per_s": goal.round(),
            "floor_events_per_s": floor.events_per_s.round(),
            "floor_http_only_events_per_s": floor_http.events_per_s.round(),
            "floor_runs": floor_runs,
            "floor_http_only_runs": floor_http_runs,
            "floor_p50_ms": both_floor(floor.p50_ms, floor_http.p50_ms),
            "floor_p99_ms": both_floor(floor.p99_ms, floor_http.p99_ms),
            "floor_lost": both_floor(floor_lost as f64, floor_http_lost as f64),
            "flowline_of_floor": crate::util::round3(f.events_per_s / floor.events_per_s),
            // The floors' own ratios to the naive service (median of the rounds, each
            // against its round's naive run): below 3, the goal is beyond what this machine
            // does with no work but what every implementation must do.
            "floor_ratio": crate::util::round3(floor_ratio),
            "floor_http_only_ratio": crate::util::round3(floor_http_ratio),
            "round_floor_ratios": round_floor_ratios,
            "round_floor_http_only_ratios": round_floor_http_ratios,
            "goal_above_floor": floor_ratio < 3.0,
            "goal_above_http_only_floor": floor_http_ratio < 3.0,
        }),
    );
}

/// The service's options for a run over `db`.
fn service_args(db: &std::path::Path, naive: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().expect("utf-8 path"),
        "--alert-threshold",
        "9",
        "--notifier-delay-ms",
        "20",
        "--alert-rate",
        "1000",
        "--accounts",
        "64",
        "--viewer-token",
        TOKEN,
        "--no-default-rules",
    ]
    .map(String::from)
    .to_vec();
    if naive {
        args.push("--naive".into());
    }
    args
}

/// The kill round's child process: the service with `args`, its address on the first line
/// of stdout, until it is killed.
pub fn child(args: &[String]) {
    let rt = runtime();
    rt.block_on(async {
        let cfg =
            flowline_siem::Config::from_args(args.iter().map(String::as_str)).expect("options");
        let service = flowline_siem::Service::start(cfg)
            .await
            .expect("service starts");
        println!("{}", service.addr());
        std::future::pending::<()>().await;
    });
}

/// SIGKILLs the service (in a child process) after `run_for` under load; the events
/// answered 202 that are not stored after it, and how many were answered 202.
async fn kill_round(naive: bool, run_for: Duration) -> (u64, u64) {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("siem.db");
    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .arg("--siem-child")
        .args(service_args(&db, naive))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("child starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("child's address");
    let addr: std::net::SocketAddr = line.trim().parse().expect("an address");
    let start = Instant::now();
    let mut posters = Vec::new();
    for c in 0..CONNECTIONS {
        posters.push(tokio::spawn(async move {
            let mut conn = Http1::connect(addr).await;
            let key = format!("key-{}", c + 1);
            let mut accepted = Vec::new();
            for seq in 1u64.. {
                let id = format!("k{c}-{seq}");
                let body = format!(
                    r#"{{"id":"{id}","kind":"login_failed","severity":{},"message":"m"}}"#,
                    seq % 10
                );
                match conn.try_post(&key, &body).await {
                    Ok(202) => accepted.push(id),
                    Ok(429) => tokio::time::sleep(Duration::from_millis(2)).await,
                    Ok(s) => panic!("unexpected status {s}"),
                    // The service is gone: this request was not answered.
                    Err(_) => break,
                }
            }
            accepted
        }));
    }
    tokio::time::sleep_until((start + run_for).into()).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("child reaped");
    let mut accepted = Vec::new();
    for p in posters {
        accepted.append(&mut p.await.expect("poster"));
    }
    let conn = rusqlite::Connection::open(&db).expect("database");
    let mut stmt = conn
        .prepare("SELECT 1 FROM events WHERE id = ?1")
        .expect("query");
    let lost = accepted
        .iter()
        .filter(|id| !stmt.exists([id.as_str()]).expect("query"))
        .count() as u64;
    (lost, accepted.len() as u64)
}

/// What a round runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Flowline,
    Naive,
    Floor(Floor),
}

/// The service under load, either kind.
enum Server {
    Siem(Box<flowline_siem::Service>),
    Floor(siem_floor::Running),
}

async fn load(side: Side, run_for: Duration) -> Outcome {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("siem.db");
    let service = match side {
        Side::Flowline | Side::Naive => {
            let args = service_args(&db, side == Side::Naive);
            let cfg =
                flowline_siem::Config::from_args(args.iter().map(String::as_str)).expect("options");
            Server::Siem(Box::new(
                flowline_siem::Service::start(cfg)
                    .await
                    .expect("service starts"),
            ))
        }
        Side::Floor(floor) => {
            Server::Floor(siem_floor::Running::start(floor, &db, 64, TOKEN).await)
        }
    };
    let addr = match &service {
        Server::Siem(s) => s.addr(),
        Server::Floor(f) => f.addr(),
    };
    let start = Instant::now();

    let mut listeners = Vec::new();
    for _ in 0..WS_CLIENTS {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={TOKEN}"))
            .await
            .expect("websocket");
        listeners.push(tokio::spawn(async move {
            let (mut got, mut lat_us, mut last) = (0u64, Vec::new(), Duration::ZERO);
            while let Some(Ok(msg)) = ws.next().await {
                // Alerts' outcomes come on the same socket: not events.
                if let Message::Text(t) = msg
                    && !t.starts_with(r#"{"outcome""#)
                {
                    let now = start.elapsed();
                    // The id ends `-<µs since start when posted>"`: read it without
                    // parsing the whole event (the listeners must not be the bottleneck).
                    let sent: u64 = t
                        .split_once(r#""id":""#)
                        .and_then(|(_, rest)| rest.split_once('"'))
                        .and_then(|(id, _)| id.rsplit('-').next())
                        .and_then(|s| s.parse().ok())
                        .expect("bench id");
                    lat_us.push(now.as_micros() as u64 - sent);
                    got += 1;
                    last = now;
                }
            }
            (got, lat_us, last)
        }));
    }

    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut posters = Vec::new();
    for c in 0..CONNECTIONS {
        let (accepted, refused) = (accepted.clone(), refused.clone());
        posters.push(tokio::spawn(async move {
            let mut conn = Http1::connect(addr).await;
            let key = format!("key-{}", c + 1);
            let mut seq = 0u64;
            while start.elapsed() < run_for {
                seq += 1;
                let severity = if seq % 100 == 0 { 9 } else { seq % 8 };
                let body = format!(
                    r#"{{"id":"c{c}-{seq}-{}","kind":"login_failed","severity":{severity},"message":"user admin from 10.0.0.{}"}}"#,
                    start.elapsed().as_micros(),
                    seq % 255
                );
                match conn.post(&key, &body).await {
                    202 => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    429 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    s => panic!("unexpected status {s}"),
                }
            }
        }));
    }
    for p in posters {
        p.await.expect("poster");
    }
    match service {
        Server::Siem(service) => {
            let summary = service.shutdown().await.expect("shutdown");
            if std::env::var_os("FLOWLINE_BENCH_SIEM_REPORT").is_some() {
                if let Some(r) = summary.events {
                    eprintln!("{r}");
                }
            }
        }
        Server::Floor(floor) => floor.shutdown().await,
    }
    let mut delivered_min = u64::MAX;
    let mut lat = Vec::new();
    let mut last = Duration::ZERO;
    for l in listeners {
        let (got, mut lat_us, l_last) = l.await.expect("listener");
        delivered_min = delivered_min.min(got);
        lat.append(&mut lat_us);
        last = last.max(l_last);
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(f64::NAN, |us| *us as f64 / 1000.0)
    };
    let (stored, alerts_sent) = if side == Side::Floor(Floor::HttpOnly) {
        // Nothing is stored: what was answered 202 must have been delivered.
        (u64::MAX, 0)
    } else {
        let counts = flowline_siem::counts(&db).expect("counts");
        (counts["events"], counts["sent"])
    };
    let accepted = accepted.load(Ordering::Relaxed);
    Outcome {
        events_per_s: delivered_min as f64 / last.as_secs_f64(),
        p50_ms: (pct(0.5) * 100.0).round() / 100.0,
        p99_ms: (pct(0.99) * 100.0).round() / 100.0,
        lost: accepted.saturating_sub(stored.min(delivered_min)),
        accepted,
        refused_429: refused.load(Ordering::Relaxed),
        alerts_sent,
    }
}

/// A minimal HTTP/1.1 keep-alive client for the load: one request at a time on one
/// connection, the request written whole, the answer read up to its `Content-Length`.
/// Hand-written so that the load generator costs little CPU next to the service under test
/// (a general client such as reqwest costs about as much per request as the server).
struct Http1 {
    stream: tokio::io::BufStream<tokio::net::TcpStream>,
    addr: std::net::SocketAddr,
    head: String,
}

impl Http1 {
    async fn connect(addr: std::net::SocketAddr) -> Http1 {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Http1 {
            stream: tokio::io::BufStream::new(stream),
            addr,
            head: String::new(),
        }
    }

    /// Posts `body` to `/events`; the status.
    async fn post(&mut self, key: &str, body: &str) -> u16 {
        self.try_post(key, body).await.expect("the service answers")
    }

    /// Posts `body` to `/events`; the status, or the error of a connection that broke.
    async fn try_post(&mut self, key: &str, body: &str) -> std::io::Result<u16> {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
        let req = format!(
            "POST /events HTTP/1.1\r\nhost: {}\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.stream.write_all(req.as_bytes()).await?;
        self.stream.flush().await?;
        let (mut status, mut len) = (0u16, 0usize);
        loop {
            self.head.clear();
            let n = self.stream.read_line(&mut self.head).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = self.head.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(rest) = line.strip_prefix("HTTP/1.1 ") {
                status = rest[..3].parse().expect("status");
            } else if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    len = value.trim().parse().expect("content-length");
                }
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).await?;
        Ok(status)
    }
}
