//! The page in headless Chromium: posting an event makes it appear in the page's DOM.
//! Driven through the DevTools protocol (a websocket), with no browser-driver crate.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(String::from)
}

/// The browser process, killed when dropped.
struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cdp {
    ws: support::Ws,
    next: u64,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.ws
            .send(Message::Text(
                json!({"id": id, "method": method, "params": params})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("DevTools answered nothing in 20 s")
                .expect("DevTools closed")
                .unwrap();
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["id"] == id {
                    return v;
                }
            }
        }
    }

    async fn eval(&mut self, expr: &str) -> Value {
        let v = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        v["result"]["result"]["value"].clone()
    }

    /// Evaluates `expr` until it is `want`, for at most 20 s.
    async fn wait_for(&mut self, expr: &str, want: Value) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.eval(expr).await;
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{expr}: {got} after 20 s, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posted_event_appears_on_the_page() {
    let Some(bin) = chromium() else {
        // `scripts/test` installs it; CI must run this test.
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is missing and CI is set"
        );
        println!("skipped: no chromium binary (scripts/test installs Debian's `chromium`)");
        return;
    };
    let siem = support::start(&[]).await;
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            &format!("--user-data-dir={}", profile.path().display()),
            "about:blank",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _browser = Browser(child);
    // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
    let browser_ws = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        let found = lines.by_ref().map_while(Result::ok).find_map(|l| {
            l.split_once("DevTools listening on ")
                .map(|(_, u)| u.trim().to_string())
        });
        // Keep draining, so that the browser never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        found
    })
    .await
    .unwrap()
    .expect("chromium printed no DevTools address");
    let port = browser_ws
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let page_ws = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "page")
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .expect("no page target")
        .to_string();
    let (ws, _) = tokio_tungstenite::connect_async(page_ws).await.unwrap();
    let mut cdp = Cdp { ws, next: 0 };
    cdp.call(
        "Page.navigate",
        json!({"url": format!("{}/?token={}", siem.base, support::TOKEN)}),
    )
    .await;
    cdp.wait_for(
        "document.body ? document.body.dataset.ws : null",
        json!("open"),
    )
    .await;

    let status = siem
        .post(
            "key-1",
            r#"{"id":"chrome-1","kind":"port_scan","severity":9,"message":"hello from the test"}"#,
        )
        .await
        .status();
    assert_eq!(status, 202);
    cdp.wait_for(
        "(document.getElementById('event-chrome-1') || {innerText: ''}).innerText.includes('hello from the test')",
        json!(true),
    )
    .await;
    let row = cdp
        .eval("document.getElementById('event-chrome-1').innerText")
        .await;
    assert!(row.as_str().unwrap().contains("account 1"), "{row}");
    drop(cdp);
    siem.service.shutdown().await.unwrap();
}
