//! The real binary under signals: SIGTERM under load stores every event answered 202 and
//! exits; SIGTERM right after start drains too; SIGKILL under load loses no event answered
//! 202 (it was committed before the answer); a drain that cannot send alerts says so.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_stores_every_accepted_event() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("siem.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowline-siem"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--queue",
            "256",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .to_string();

    let accepted = Arc::new(AtomicU64::new(0));
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for c in 0..16 {
        let (http, base, accepted) = (http.clone(), base.clone(), accepted.clone());
        clients.push(tokio::spawn(async move {
            let mut other = 0u64;
            for i in 0.. {
                let resp = http
                    .post(format!("{base}/events"))
                    .header("x-api-key", format!("key-{}", c % 4 + 1))
                    .header("content-type", "application/json")
                    .body(format!(
                        r#"{{"id":"t{c}-{i}","kind":"k","severity":{}}}"#,
                        i % 11
                    ))
                    .send()
                    .await;
                match resp.map(|r| r.status().as_u16()) {
                    Ok(202) => {
                        accepted.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(429) => tokio::time::sleep(Duration::from_millis(5)).await,
                    // 503 once the drain began, then connection refused: done.
                    Ok(503) | Err(_) => break,
                    Ok(s) => other = u64::from(s),
                }
            }
            other
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = accepted.load(Ordering::SeqCst);
    assert!(before > 100, "only {before} accepted before SIGTERM");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    for c in clients {
        assert_eq!(c.await.unwrap(), 0, "an unexpected status");
    }
    let stored = flowline_siem::counts(&db).unwrap()["events"];
    assert_eq!(stored, accepted.load(Ordering::SeqCst));
}

/// Starts the binary with `args` (stderr captured); the child and its base URL.
fn spawn(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowline-siem"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .to_string();
    (child, base)
}

fn signal(child: &Child, sig: &str) {
    let sent = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Waits for the child; its exit status and everything it wrote to stderr.
async fn finish(mut child: Child) -> (std::process::ExitStatus, String) {
    tokio::task::spawn_blocking(move || {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (child.wait().unwrap(), err)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_start_drains_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("siem.db");
    for i in 0..20 {
        let (child, _) = spawn(&["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()]);
        // The moment it says it listens.
        signal(&child, "-TERM");
        let (status, err) = finish(child).await;
        assert!(status.success(), "start {i}: {status}; stderr: {err}");
        assert!(err.contains("shutting down"), "start {i}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_event_answered_202() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("siem.db");
    let (child, base) = spawn(&["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()]);
    let accepted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (enough_tx, enough) = tokio::sync::oneshot::channel::<()>();
    let enough_tx = Arc::new(std::sync::Mutex::new(Some(enough_tx)));
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for c in 0..16 {
        let (http, base, accepted, enough_tx) = (
            http.clone(),
            base.clone(),
            accepted.clone(),
            enough_tx.clone(),
        );
        clients.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("k{c}-{i}");
                let resp = http
                    .post(format!("{base}/events"))
                    .header("x-api-key", format!("key-{}", c % 4 + 1))
                    .header("content-type", "application/json")
                    .body(format!(
                        r#"{{"id":"{id}","kind":"k","severity":{}}}"#,
                        i % 11
                    ))
                    .send()
                    .await;
                match resp.map(|r| r.status().as_u16()) {
                    Ok(202) => {
                        let mut a = accepted.lock().unwrap();
                        a.push(id);
                        if a.len() >= 2_000 {
                            if let Some(tx) = enough_tx.lock().unwrap().take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                    Ok(429) => tokio::task::yield_now().await,
                    Ok(s) => panic!("unexpected {s}"),
                    // Killed: this request was never answered, so it was not accepted.
                    Err(_) => break,
                }
            }
        }));
    }
    enough.await.unwrap();
    // Killed mid-load: requests are in flight, batches being committed.
    signal(&child, "-KILL");
    let (status, _) = finish(child).await;
    assert!(!status.success());
    for c in clients {
        c.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut stmt = conn.prepare("SELECT 1 FROM events WHERE id = ?1").unwrap();
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !stmt.exists([id.as_str()]).unwrap())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered 202 are not stored: {:?}",
        missing.len(),
        accepted.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(accepted.len() >= 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_cannot_send_alerts_leaves_them_pending_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("siem.db");
    // A notifier that takes the connection and never answers.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", held.local_addr().unwrap());
    let (child, base) = spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
        "--notifier-url",
        &url,
        "--alert-threshold",
        "5",
    ]);
    let http = reqwest::Client::new();
    for i in 0..3 {
        let resp = http
            .post(format!("{base}/events"))
            .header("x-api-key", "key-1")
            .header("content-type", "application/json")
            .body(format!(r#"{{"id":"p{i}","kind":"k","severity":9}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
    }
    signal(&child, "-TERM");
    let (status, err) = finish(child).await;
    assert!(status.success(), "{status}: {err}");
    assert!(
        err.contains("3 alerts could not be sent during the drain") && err.contains("pending"),
        "{err}"
    );
    assert_eq!(flowline_siem::counts(&db).unwrap()["pending"], 3);
}

#[test]
fn long_help_is_the_options_not_the_library_docs() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowline-siem"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        help.contains("--viewer-token") && help.contains("--rule"),
        "{help}"
    );
    for rust in ["```", "use clap", "unwrap()", "try_parse_from"] {
        assert!(!help.contains(rust), "{rust} in --help:\n{help}");
    }
}
