//! Real clients against the service: events in over HTTP, out over websockets, in the
//! database once each.

mod support;

use std::collections::HashMap;

use futures_util::future::join_all;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_is_stored_once_and_reaches_every_client_in_order_per_account() {
    let siem = support::start(&["--accounts", "4"]).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(siem.ws().await);
    }
    // 4 accounts post concurrently, each its own events in sequence.
    let per_account = 150;
    let posts = (1..=4).map(|a| {
        let siem = &siem;
        async move {
            for i in 0..per_account {
                let status = siem
                    .post_event(&format!("key-{a}"), &format!("a{a}-{i}"), (i % 11) as u8)
                    .await;
                assert_eq!(status, 202);
            }
        }
    });
    join_all(posts).await;
    // The same id again: accepted, stored once, not shown twice.
    assert_eq!(siem.post_event("key-1", "a1-0", 1).await, 202);
    let total = 4 * per_account;
    for ws in &mut clients {
        let got = support::read_events(ws, total).await;
        let mut next: HashMap<String, usize> = HashMap::new();
        for e in &got {
            let id = e["id"].as_str().unwrap();
            let (acct, seq) = id.split_once('-').unwrap();
            let seq: usize = seq.parse().unwrap();
            let expected = next.entry(acct.to_string()).or_default();
            assert_eq!(
                seq, *expected,
                "account {acct}: out of order or repeated at {id}"
            );
            *expected += 1;
            assert_eq!(e["account"]["name"], format!("account {}", &acct[1..]));
            assert_eq!(e["status"], "stored");
        }
        assert!(next.values().all(|n| *n == per_account), "{next:?}");
    }
    let summary = siem.service.shutdown().await.unwrap();
    let c = flowline_siem::counts(&siem.db).unwrap();
    assert_eq!(c["events"], total as u64);
    assert!(summary.events.unwrap().is_balanced());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_bad_body_and_big_body_are_refused() {
    let siem = support::start(&["--body-limit", "1024"]).await;
    let good = r#"{"id":"x","kind":"k","severity":1}"#;
    assert_eq!(siem.post("nope", good).await.status(), 401);
    let no_key = siem
        .http
        .post(format!("{}/events", siem.base))
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    for (body, field) in [
        ("{not json", "body"),
        (r#"{"id":"x","kind":"k","severity":"high"}"#, "severity"),
        (r#"{"id":"x","kind":"k","severity":99}"#, "severity"),
        (r#"{"kind":"k","severity":1}"#, "id"),
        (r#"{"id":"x","kind":3,"severity":1}"#, "kind"),
    ] {
        let resp = siem.post("key-1", body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["field"], field, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().starts_with(field), "{v}");
    }
    let big = format!(
        r#"{{"id":"x","kind":"k","severity":1,"message":"{}"}}"#,
        "x".repeat(2000)
    );
    assert_eq!(siem.post("key-1", &big).await.status(), 413);
    siem.service.shutdown().await.unwrap();
    assert_eq!(flowline_siem::counts(&siem.db).unwrap()["events"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipeline_answers_429_with_retry_after_and_loses_nothing_accepted() {
    let siem = support::start(&["--queue", "2", "--batch", "4"]).await;
    // Another connection holds the database's write lock: the persist stage waits, the
    // pipeline fills up behind it.
    let blocker = rusqlite::Connection::open(&siem.db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut accepted = 0u64;
    let mut refused = None;
    for i in 0..20_000 {
        let resp = siem
            .post(
                "key-1",
                &format!(r#"{{"id":"o{i}","kind":"k","severity":1}}"#),
            )
            .await;
        match resp.status().as_u16() {
            202 => accepted += 1,
            429 => {
                refused = Some(resp);
                break;
            }
            s => panic!("unexpected {s}"),
        }
    }
    let refused = refused.expect("no 429 while the pipeline was blocked");
    assert_eq!(refused.headers()["retry-after"], "1");
    assert!(accepted > 0);
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    siem.service.shutdown().await.unwrap();
    assert_eq!(flowline_siem::counts(&siem.db).unwrap()["events"], accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_begins_events_are_refused() {
    let siem = support::start(&[]).await;
    assert_eq!(siem.post_event("key-1", "before", 1).await, 202);
    let addr = siem.service.addr();
    let http = siem.http.clone();
    siem.service.shutdown().await.unwrap();
    // The listener is gone once the drain is done: nothing is accepted any more.
    let after = http
        .post(format!("http://{addr}/events"))
        .header("x-api-key", "key-1")
        .body(r#"{"id":"after","kind":"k","severity":1}"#)
        .send()
        .await;
    assert!(after.is_err() || after.unwrap().status() == 503);
    assert_eq!(flowline_siem::counts(&siem.db).unwrap()["events"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_page_are_served() {
    let siem = support::start(&[]).await;
    assert_eq!(siem.post_event("key-1", "m1", 1).await, 202);
    let mut ws = siem.ws().await;
    assert_eq!(siem.post_event("key-1", "m2", 1).await, 202);
    support::read_events(&mut ws, 1).await;
    let page = siem
        .http
        .get(&siem.base)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("new WebSocket"));
    let text = siem.metrics().await;
    assert!(text.contains("siem_events_accepted_total"), "{text}");
    siem.service.shutdown().await.unwrap();
}
