//! Correlation rules end to end over HTTP: events posted with their own times, the rules'
//! windows close as event time passes, a match is stored as an event with its alert, shown on
//! the websocket, counted in `/metrics` and `/api/rules`, and its alert sent.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

const BRUTE: &str = "name=brute_force kind=login_failed by=account count=5 within=1m severity=8";
const SPRAY: &str =
    "name=address_on_many_accounts by=source distinct=account count=10 within=5m severity=7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_match_by_event_time_and_alert_over_http() {
    let siem = support::start(&[
        "--accounts",
        "12",
        "--notifier-delay-ms",
        "0",
        "--rule",
        BRUTE,
        "--rule",
        SPRAY,
        "--rule-lateness-ms",
        "0",
    ])
    .await;
    let mut ws = siem.ws().await;
    // Ten minutes ago, on a minute: the events say when they happened, not when they came.
    let now = flowline_siem_now_ms();
    let t0 = (now - 600_000) / 60_000 * 60_000;
    let post = |key: String, id: String, kind: &'static str, t: i64, source: Option<&str>| {
        let source = source.map_or(String::new(), |s| format!(r#","source":"{s}""#));
        let body = format!(r#"{{"id":"{id}","kind":"{kind}","severity":2,"time":{t}{source}}}"#);
        let siem = &siem;
        async move { siem.post(&key, &body).await.status().as_u16() }
    };
    // Account 1: five failed logins within 4 s. Account 2: four, then the fifth 2 minutes on.
    for i in 0..5 {
        assert_eq!(
            post(
                "key-1".into(),
                format!("a{i}"),
                "login_failed",
                t0 + i * 1000,
                None
            )
            .await,
            202
        );
    }
    for i in 0..4 {
        assert_eq!(
            post(
                "key-2".into(),
                format!("b{i}"),
                "login_failed",
                t0 + i * 1000,
                None
            )
            .await,
            202
        );
    }
    // 10.1.1.1 on ten accounts (twice on some); 10.2.2.2 on nine.
    for a in 1..=10 {
        for rep in 0..2 {
            let id = format!("s{a}-{rep}");
            assert_eq!(
                post(
                    format!("key-{a}"),
                    id,
                    "port_scan",
                    t0 + 10_000 + a * 100 + rep,
                    Some("10.1.1.1")
                )
                .await,
                202
            );
        }
    }
    for a in 1..=9 {
        assert_eq!(
            post(
                format!("key-{a}"),
                format!("n{a}"),
                "port_scan",
                t0 + 10_000 + a,
                Some("10.2.2.2")
            )
            .await,
            202
        );
    }
    assert_eq!(
        post(
            "key-2".into(),
            "b4".into(),
            "login_failed",
            t0 + 120_000,
            None
        )
        .await,
        202
    );
    // Event time moves on (an event 20 minutes later, for each rule): the windows close.
    assert_eq!(
        post(
            "key-12".into(),
            "tick-1".into(),
            "login_failed",
            t0 + 1_200_000,
            None
        )
        .await,
        202
    );
    assert_eq!(
        post(
            "key-12".into(),
            "tick-2".into(),
            "port_scan",
            t0 + 1_200_000,
            Some("10.9.9.9")
        )
        .await,
        202
    );

    // The matches, live.
    let mut raised = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while raised.len() < 2 {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("rule events seen: {raised:?}"))
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["rule"].is_string() {
                raised.push(v);
            }
        }
    }
    raised.sort_by_key(|v| v["rule"].as_str().unwrap().to_string());
    assert_eq!(raised[0]["rule"], "address_on_many_accounts");
    assert_eq!(raised[0]["source"], "10.1.1.1");
    assert_eq!(raised[0]["severity"], 7);
    assert!(
        raised[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("10 different accounts")
    );
    assert_eq!(raised[1]["rule"], "brute_force");
    assert_eq!(raised[1]["account"]["id"], 1);
    assert_eq!(raised[1]["severity"], 8);
    assert_eq!(raised[1]["id"], format!("rule:brute_force:1:{t0}"));
    assert_eq!(raised[1]["time_ms"], t0 + 4000);

    // Counted once each, in /api/rules and /metrics.
    let rules = siem.get_json("/api/rules").await;
    let matches: Vec<(String, u64)> = rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["matches"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        matches,
        vec![
            ("brute_force".into(), 1),
            ("address_on_many_accounts".into(), 1)
        ]
    );
    let text = siem.metrics().await;
    for rule in ["brute_force", "address_on_many_accounts"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("siem_rule_matches_total")
                    && l.contains(&format!("rule=\"{rule}\""))
                    && !l.ends_with(" 0")),
            "{rule}: {text}"
        );
    }
    // Their alerts go out like any other, marked with the rule.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let alerts = siem.get_json("/api/alerts").await;
        let by_rule: Vec<_> = alerts
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["rule"].is_string())
            .map(|a| {
                (
                    a["rule"].as_str().unwrap().to_string(),
                    a["status"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        if by_rule.len() == 2 && by_rule.iter().all(|(_, s)| s == "sent") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{by_rule:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    siem.service.shutdown().await.unwrap();
}

fn flowline_siem_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
