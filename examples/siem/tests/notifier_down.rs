//! The notifier down for a while: alerts are retried and held by the breaker, events go on,
//! nothing is lost, and the held alerts go out once it is back.

mod support;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_holds_alerts_without_stopping_events() {
    let siem = support::start(&[
        "--alert-threshold",
        "5",
        "--notifier-delay-ms",
        "0",
        "--alert-rate",
        "1000",
        "--breaker-cooldown-ms",
        "200",
    ])
    .await;
    let notifier = siem.service.fake_notifier().unwrap();
    notifier.set_down(true);
    let mut ws = siem.ws().await;
    let n = 200;
    for i in 0..n {
        // Every other event alerts.
        assert_eq!(
            siem.post_event("key-2", &format!("d{i}"), if i % 2 == 0 { 9 } else { 1 })
                .await,
            202
        );
    }
    // Events are stored and shown while the notifier is down.
    assert_eq!(support::read_events(&mut ws, n).await.len(), n);
    assert_eq!(siem.counts()["events"], n as u64);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let refused = notifier.refused();
    assert!(
        refused >= 5,
        "the notifier was called {refused} times while down"
    );
    assert_eq!(notifier.delivered(), 0);
    // The breaker holds the alerts: they neither went out nor failed.
    assert_eq!(siem.counts()["failed"], 0);
    // The breaker opened: flowline's gauge (brought up to date every second) says open
    // (2) or half-open (1) for the notify stage.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = siem.metrics().await;
        let state = text
            .lines()
            .find(|l| l.starts_with("flowline_breaker_state") && l.contains("stage=\"notify\""))
            .map(|l| l.rsplit(' ').next().unwrap().to_string());
        if matches!(state.as_deref(), Some("2") | Some("1")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "breaker state {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    notifier.set_down(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while siem.counts()["sent"] < (n / 2) as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alerts not sent after the outage: {:?}",
            siem.counts()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(notifier.delivered(), (n / 2) as u64);
    let c = siem.counts();
    assert_eq!(
        (c["sent"], c["failed"], c["pending"]),
        ((n / 2) as u64, 0, 0)
    );
    siem.service.shutdown().await.unwrap();
}

/// The URL of a port with nothing on it: bound, noted, closed.
fn nothing_listening() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_that_is_not_listening_stops_no_event_and_alerts_stay_pending() {
    let url = nothing_listening();
    let siem = support::start(&[
        "--alert-threshold",
        "5",
        "--notifier-url",
        &url,
        "--breaker-cooldown-ms",
        "100",
    ])
    .await;
    for i in 0..50 {
        assert_eq!(siem.post_event("key-3", &format!("u{i}"), 9).await, 202);
    }
    let db = siem.db.clone();
    let started = std::time::Instant::now();
    siem.service.shutdown().await.unwrap();
    // The drain does not wait for the notifier forever.
    assert!(started.elapsed() < Duration::from_secs(15));
    let c = flowline_siem::counts(&db).unwrap();
    assert_eq!(c["events"], 50);
    // Every alert is accounted for: held (pending, sent at the next start) or failed.
    assert_eq!(c["pending"] + c["failed"] + c["sent"], 50, "{c:?}");
    assert_eq!(c["sent"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_left_pending_are_sent_at_the_next_start() {
    let down = nothing_listening();
    // A lane of 4 that cannot drain: alerts find it full and stay pending at once.
    let siem = support::start(&[
        "--alert-threshold",
        "5",
        "--notifier-url",
        &down,
        "--alert-queue",
        "4",
        "--breaker-cooldown-ms",
        "100",
    ])
    .await;
    for i in 0..30 {
        assert_eq!(siem.post_event("key-2", &format!("p{i}"), 9).await, 202);
        // Below the threshold: no alert, and it must not become one at the next start.
        assert_eq!(siem.post_event("key-2", &format!("q{i}"), 1).await, 202);
    }
    let dir = siem.stop().await;
    let before = flowline_siem::counts(&dir.path().join("siem.db")).unwrap();
    assert_eq!(before["events"], 60);
    assert_eq!(before["sent"], 0);
    let pending = before["pending"];
    assert!(pending > 0, "{before:?}");
    assert_eq!(pending + before["failed"], 30, "{before:?}");

    // Started again with a notifier that answers (the service's own fake one).
    let siem = support::start_in(dir, &["--alert-threshold", "5"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while siem.counts()["sent"] < pending {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            siem.counts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let notifier = siem.service.fake_notifier().unwrap();
    assert_eq!(notifier.delivered(), pending);
    let dir = siem.stop().await;
    let after = flowline_siem::counts(&dir.path().join("siem.db")).unwrap();
    assert_eq!(after["events"], 60);
    assert_eq!(after["pending"], 0, "{after:?}");
    assert_eq!(after["sent"], pending);
    assert_eq!(after["failed"], before["failed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_beyond_the_lane_are_sent_while_running_once_each() {
    // A lane of 4; the notifier is down while 40 alerts come in, so most of them find the
    // lane full and wait in the database.
    let siem = support::start(&[
        "--alert-threshold",
        "5",
        "--notifier-delay-ms",
        "0",
        "--alert-rate",
        "1000",
        "--alert-queue",
        "4",
        "--breaker-cooldown-ms",
        "100",
    ])
    .await;
    let notifier = siem.service.fake_notifier().unwrap();
    notifier.set_down(true);
    for i in 0..40 {
        assert_eq!(siem.post_event("key-4", &format!("l{i}"), 9).await, 202);
    }
    assert_eq!(siem.counts()["sent"], 0);
    notifier.set_down(false);
    // Back up: every one goes out, without a restart.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while siem.counts()["sent"] + siem.counts()["failed"] < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alerts still pending while the notifier is up: {:?}",
            siem.counts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = siem.counts();
    assert_eq!(c["pending"], 0, "{c:?}");
    // Sent once each: the notifier took as many as were recorded sent.
    assert_eq!(notifier.delivered(), c["sent"]);
    assert!(c["sent"] > 4, "{c:?}");
    siem.service.shutdown().await.unwrap();
}

/// A notifier that takes connections and never answers: a call waits for its timeout.
fn hanging() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_new_events_get_503_with_retry_after_and_unsent_alerts_stay_pending() {
    let (_held, url) = hanging();
    let siem = support::start(&["--alert-threshold", "5", "--notifier-url", &url]).await;
    for i in 0..3 {
        assert_eq!(siem.post_event("key-1", &format!("h{i}"), 9).await, 202);
    }
    let (base, http, db) = (siem.base.clone(), siem.http.clone(), siem.db.clone());
    let stopping = tokio::spawn(siem.service.shutdown());
    // The drain waits for the alerts the notifier does not answer: the service is still
    // there, and says it is stopping.
    let mut answered_503 = 0;
    for i in 0.. {
        let resp = http
            .post(format!("{base}/events"))
            .header("x-api-key", "key-1")
            .header("content-type", "application/json")
            .body(format!(r#"{{"id":"d{i}","kind":"k","severity":1}}"#))
            .send()
            .await
            .expect("the listener closed during the drain");
        match resp.status().as_u16() {
            202 => assert_eq!(answered_503, 0, "a 202 after a 503"),
            503 => {
                assert_eq!(resp.headers()["retry-after"], "5");
                answered_503 += 1;
                if answered_503 == 5 {
                    break;
                }
            }
            s => panic!("answered {s} during the drain"),
        }
    }
    assert!(!stopping.is_finished());
    let summary = stopping.await.unwrap().unwrap();
    let c = flowline_siem::counts(&db).unwrap();
    assert_eq!((c["pending"], c["sent"], c["failed"]), (3, 0, 0), "{c:?}");
    assert_eq!(summary.alerts_pending, 3);
}
