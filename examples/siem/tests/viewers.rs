//! Viewers authenticate: the viewer token sees every account, an account's key sees that
//! account only (live and history), no credential sees nothing.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::{self, Message};

fn refused_status(r: Result<support::Ws, tungstenite::Error>) -> u16 {
    match r {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("refused otherwise: {e}"),
        Ok(_) => panic!("the websocket was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_without_a_credential_is_refused_401() {
    let siem = support::start(&[]).await;
    assert_eq!(refused_status(siem.ws_with("").await), 401);
    assert_eq!(refused_status(siem.ws_with("token=wrong").await), 401);
    assert_eq!(refused_status(siem.ws_with("key=key-999").await), 401);
    assert_eq!(refused_status(siem.ws_with("key=").await), 401);
    let long = "k".repeat(10_000);
    assert_eq!(
        refused_status(siem.ws_with(&format!("key={long}")).await),
        401
    );
    assert!(siem.ws_with("key=key-1").await.is_ok());
    for path in ["/api/events", "/api/alerts", "/api/rules"] {
        let resp = siem
            .http
            .get(format!("{}{path}", siem.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{path}");
    }
    siem.service.shutdown().await.unwrap();
}

/// Reads from `ws` until the event `last` and an alert's outcome have arrived; every
/// message read.
async fn read_until(ws: &mut support::Ws, last: &str) -> Vec<serde_json::Value> {
    let mut got: Vec<serde_json::Value> = Vec::new();
    let mut seen_last = false;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .unwrap_or_else(|_| panic!("{last} not seen in 30 s; got {got:?}"))
            .expect("websocket ended")
            .unwrap();
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            seen_last |= v["id"] == last;
            got.push(v);
            if seen_last && got.iter().any(|v| v.get("outcome").is_some()) {
                return got;
            }
        }
    }
}

/// The account a hub message belongs to: an event's account id, or an alert's.
fn account_of(v: &serde_json::Value) -> i64 {
    if let Some(a) = v.get("outcome") {
        a["account_id"].as_i64().unwrap()
    } else {
        v["account"]["id"].as_i64().unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_key_never_receives_another_accounts_events_or_alerts() {
    let siem = support::start(&["--alert-threshold", "5", "--notifier-delay-ms", "0"]).await;
    let mut a = siem.ws_with("key=key-1").await.unwrap();
    let mut b = siem.ws_with("key=key-2").await.unwrap();
    let mut all = siem.ws().await;
    for i in 0..60 {
        let key = if i % 2 == 0 { "key-1" } else { "key-2" };
        // Every third alerts: its outcome goes out on the websocket too.
        let severity = if i % 3 == 0 { 9 } else { 1 };
        assert_eq!(siem.post_event(key, &format!("v{i}"), severity).await, 202);
    }
    // Wait for the alerts' outcomes, so that they were on the hub before the markers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while siem.counts()["sent"] < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            siem.counts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A last event from each account marks the end of its events.
    assert_eq!(siem.post_event("key-1", "end-1", 1).await, 202);
    assert_eq!(siem.post_event("key-2", "end-2", 1).await, 202);
    let got_a = read_until(&mut a, "end-1").await;
    let got_b = read_until(&mut b, "end-2").await;
    assert!(got_a.iter().all(|v| account_of(v) == 1), "{got_a:?}");
    assert!(got_b.iter().all(|v| account_of(v) == 2), "{got_b:?}");
    let events_a = got_a.iter().filter(|v| v.get("outcome").is_none()).count();
    assert_eq!(events_a, 31);
    // The viewer token sees both accounts.
    let got_all = read_until(&mut all, "end-2").await;
    assert!(got_all.iter().any(|v| account_of(v) == 1));
    assert!(got_all.iter().any(|v| account_of(v) == 2));
    // History too: an account's key reads its own rows only.
    for (key, account) in [("key-1", 1), ("key-2", 2)] {
        for path in ["/api/events", "/api/alerts"] {
            let rows: Vec<serde_json::Value> = siem
                .http
                .get(format!("{}{path}?key={key}&limit=1000", siem.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert!(!rows.is_empty(), "{path} {key}");
            for r in &rows {
                let id = r
                    .get("account_id")
                    .and_then(|v| v.as_i64())
                    .unwrap_or_else(|| r["account"]["id"].as_i64().unwrap());
                assert_eq!(id, account, "{path} {key}: {r}");
            }
        }
    }
    siem.service.shutdown().await.unwrap();
}
