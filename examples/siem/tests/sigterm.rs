//! SIGTERM under load, against the real binary: every event answered 202 is in the database
//! when the process has exited.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
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
