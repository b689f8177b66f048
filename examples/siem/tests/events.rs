//! Real clients against the service: events in over HTTP, out over websockets, in the
//! database once each.

mod support;

use std::collections::HashMap;

use std::time::Duration;

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
    // A body of unknown length (chunked) is cut off at the limit too.
    let chunks =
        futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>("x".repeat(200))));
    let chunked = siem
        .http
        .post(format!("{}/events", siem.base))
        .header("x-api-key", "key-1")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(chunked.status(), 413);
    // Not JSON by its content type: 415, whatever the body.
    for ty in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = siem
            .http
            .post(format!("{}/events", siem.base))
            .header("x-api-key", "key-1")
            .body(good);
        if let Some(ty) = ty {
            req = req.header("content-type", ty);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 415, "{ty:?}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["field"], "content-type");
    }
    let ok_with_charset = siem
        .http
        .post(format!("{}/events", siem.base))
        .header("x-api-key", "key-1")
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(r#"{"id":"cs","kind":"k","severity":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok_with_charset.status(), 202);
    // Every refusal is counted by its status, 413 and 415 too.
    let text = siem.metrics().await;
    for (status, n) in [("413", 2), ("415", 3)] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("siem_events_rejected_total")
                    && l.contains(&format!("status=\"{status}\""))
            })
            .unwrap_or_else(|| panic!("no {status} count: {text}"));
        // The recorder is the process's: other tests of this binary may count too.
        let count: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= n, "{line}");
    }
    siem.service.shutdown().await.unwrap();
    assert_eq!(flowline_siem::counts(&siem.db).unwrap()["events"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipeline_answers_429_with_retry_after_and_every_202_is_stored() {
    let siem = std::sync::Arc::new(support::start(&["--queue", "2", "--batch", "4"]).await);
    // Another connection holds the database's write lock: the persist stage waits, the
    // requests wait for their commit, the pipeline fills up behind them.
    let blocker = rusqlite::Connection::open(&siem.db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let mut posts = Vec::new();
    let mut refused = None;
    for i in 0..5_000 {
        let (siem, done_tx) = (siem.clone(), done_tx.clone());
        posts.push(tokio::spawn(async move {
            let resp = siem
                .post(
                    "key-1",
                    &format!(r#"{{"id":"o{i}","kind":"k","severity":1}}"#),
                )
                .await;
            let status = resp.status().as_u16();
            let retry = resp.headers().get("retry-after").cloned();
            let _ = done_tx.send((status, retry));
            status
        }));
        // Paced by the answers: a request is answered now only if it was refused.
        tokio::select! {
            Some(answer) = done.recv() => {
                refused = Some(answer);
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
    }
    let (status, retry) = refused.expect("no request answered while the database was locked");
    assert_eq!(
        status, 429,
        "answered {status} while nothing could be committed"
    );
    assert_eq!(retry.unwrap(), "1");
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    let mut accepted = 0u64;
    for p in posts {
        match p.await.unwrap() {
            202 => accepted += 1,
            429 => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert!(accepted > 0);
    // Every 202 was answered after its commit: all of them are in the file now, before
    // any drain.
    assert_eq!(siem.counts()["events"], accepted);
    let siem = std::sync::Arc::into_inner(siem).unwrap();
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
        .header("content-type", "application/json")
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
    let get = |path: String| {
        let http = siem.http.clone();
        async move { http.get(path).send().await.unwrap() }
    };
    // Without credentials: the sign-in form, 401; with them, the page.
    let refused = get(siem.base.clone()).await;
    assert_eq!(refused.status(), 401);
    assert!(refused.text().await.unwrap().contains("Viewer token"));
    let page = get(format!("{}/?token={}", siem.base, support::TOKEN)).await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("new WebSocket"));
    let page = get(format!("{}/?key=key-1", siem.base)).await;
    assert_eq!(page.status(), 200);
    assert_eq!(
        get(format!("{}/?key=key-999", siem.base)).await.status(),
        401
    );
    assert_eq!(
        get(format!("{}/?token=wrong", siem.base)).await.status(),
        401
    );
    // `/metrics` takes the viewer token only (an account's key does not see the service's
    // counts).
    assert_eq!(get(format!("{}/metrics", siem.base)).await.status(), 401);
    assert_eq!(
        get(format!("{}/metrics?key=key-1", siem.base))
            .await
            .status(),
        401
    );
    let text = siem.metrics().await;
    assert!(text.contains("siem_events_accepted_total"), "{text}");
    siem.service.shutdown().await.unwrap();
}
