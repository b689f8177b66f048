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
