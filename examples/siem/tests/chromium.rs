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

/// Chromium with its DevTools on a free port, and a session on its first page.
async fn open_browser(bin: String, profile: &std::path::Path) -> (Browser, Cdp) {
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            &format!("--user-data-dir={}", profile.display()),
            "about:blank",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let browser = Browser(child);
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
    (browser, Cdp { ws, next: 0 })
}

impl Cdp {
    /// Sets the viewport, waits for the layout, and saves a PNG screenshot to `path`; the
    /// page's width as laid out.
    async fn screenshot(
        &mut self,
        width: u32,
        height: u32,
        mobile: bool,
        path: &std::path::Path,
    ) -> u64 {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
        // Two frames: the new size laid out and painted.
        self.eval(
            "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(1))))",
        )
        .await;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let data = shot["result"]["data"].as_str().expect("screenshot data");
        let png = base64_decode(data);
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, &png).unwrap();
        self.eval("document.documentElement.scrollWidth")
            .await
            .as_u64()
            .unwrap()
    }
}

/// Standard base64 (the screenshot's encoding), decoded.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn skip_without_chromium() -> Option<String> {
    let bin = chromium();
    if bin.is_none() {
        // `scripts/test` installs it; CI must run this test.
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is missing and CI is set"
        );
        println!("skipped: no chromium binary (scripts/test installs Debian's `chromium`)");
    }
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_history_filters_pauses_alerts_and_rule_matches() {
    let Some(bin) = skip_without_chromium() else {
        return;
    };
    let siem = support::start(&[
        "--accounts",
        "4",
        "--alert-threshold",
        "8",
        "--notifier-delay-ms",
        "0",
        "--rule",
        "name=brute_force kind=login_failed by=account count=5 within=1m severity=8",
    ])
    .await;
    // History: in the database before the page is opened.
    for (i, (key, kind, sev)) in [
        ("key-1", "port_scan", 2),
        ("key-2", "malware", 9),
        ("key-1", "login_ok", 1),
        ("key-2", "port_scan", 6),
    ]
    .into_iter()
    .enumerate()
    {
        let body = format!(
            r#"{{"id":"h{i}","kind":"{kind}","severity":{sev},"message":"before the page <b>{i}</b>"}}"#
        );
        assert_eq!(siem.post(key, &body).await.status(), 202);
    }
    let profile = tempfile::tempdir().unwrap();
    let (_browser, mut cdp) = open_browser(bin, profile.path()).await;
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
    cdp.call(
        "Page.navigate",
        json!({"url": format!("{}/?token={}", siem.base, support::TOKEN)}),
    )
    .await;
    cdp.wait_for(
        "document.body && document.body.dataset.history",
        json!("loaded"),
    )
    .await;
    cdp.wait_for("document.body.dataset.ws", json!("open"))
        .await;
    // History on load, newest first; outside input shown as text, not markup.
    let ids = "[...document.querySelectorAll('#events tr')].map(r => r.id)";
    assert_eq!(
        cdp.eval(ids).await,
        json!(["event-h3", "event-h2", "event-h1", "event-h0"])
    );
    assert_eq!(
        cdp.eval("document.querySelector('#event-h0 td.msg').textContent")
            .await,
        json!("before the page <b>0</b>")
    );
    // The history's alert is in the pane, raised by its severity.
    let why = cdp
        .eval("document.querySelector('#alert-h1 .why').textContent")
        .await;
    assert!(why.as_str().unwrap().starts_with("severity 9"), "{why}");

    // A filter: account 2, severity 5 and up.
    cdp.eval(
        "document.getElementById('filter-account').value = '2';
         document.getElementById('filter-severity').value = '5';
         document.getElementById('filter').dispatchEvent(new Event('change')); 1",
    )
    .await;
    assert_eq!(cdp.eval(ids).await, json!(["event-h3", "event-h1"]));
    // A live event that fails the filter is not shown; one that passes is.
    assert_eq!(siem.post_event("key-1", "live-1", 9).await, 202);
    assert_eq!(siem.post_event("key-2", "live-2", 7).await, 202);
    cdp.wait_for(&format!("{ids}[0]"), json!("event-live-2"))
        .await;
    assert_eq!(
        cdp.eval("!!document.getElementById('event-live-1')").await,
        json!(false)
    );
    // An alert appearing: live-1 (severity 9) is sent by the notifier; the pane says so.
    cdp.wait_for(
        "(document.getElementById('alert-live-1') || {dataset: {}}).dataset.status",
        json!("sent"),
    )
    .await;

    // Pause: what comes is buffered, not shown; resumed, it is all there, in order.
    cdp.eval("document.getElementById('filter-account').value = ''; document.getElementById('filter-severity').value = '0'; document.getElementById('filter').dispatchEvent(new Event('change')); document.getElementById('pause').click(); 1").await;
    for i in 0..3 {
        assert_eq!(siem.post_event("key-3", &format!("p{i}"), 1).await, 202);
    }
    cdp.wait_for(
        "document.getElementById('buffered').textContent",
        json!("3"),
    )
    .await;
    assert_eq!(
        cdp.eval("!!document.getElementById('event-p0')").await,
        json!(false)
    );
    cdp.eval("document.getElementById('pause').click(); 1")
        .await;
    assert_eq!(
        cdp.eval(&format!("{ids}.slice(0, 3)")).await,
        json!(["event-p2", "event-p1", "event-p0"])
    );

    // A correlation rule: five failed logins for account 4 within the minute.
    for i in 0..5 {
        assert_eq!(siem.post_event("key-4", &format!("f{i}"), 3).await, 202);
    }
    // Event time moves on (an event two minutes ahead): the rule's windows close now.
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 120_000;
    let body = format!(r#"{{"id":"tick","kind":"login_failed","severity":1,"time":{ahead}}}"#);
    assert_eq!(siem.post("key-1", &body).await.status(), 202);
    cdp.wait_for(
        "[...document.querySelectorAll('#events tr.rule')].length",
        json!(1),
    )
    .await;
    cdp.wait_for(
        "[...document.querySelectorAll('#alerts li')].some(li => li.textContent.includes('rule brute_force'))",
        json!(true),
    )
    .await;
    cdp.wait_for(
        "(document.getElementById('rule-brute_force') || {dataset: {}}).dataset.matches",
        json!("1"),
    )
    .await;
    // The chart counts every event of the last minutes: 4 + 2 + 3 + 5 posted, 1 raised.
    cdp.eval("chart(); 1").await;
    assert_eq!(
        cdp.eval("document.getElementById('chart').dataset.total")
            .await,
        json!("15")
    );

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let wide = cdp
        .screenshot(1280, 800, false, &dir.join("siem-page-1280x800.png"))
        .await;
    assert!(wide <= 1280, "the page is {wide} px wide at 1280");
    let narrow = cdp
        .screenshot(390, 844, true, &dir.join("siem-page-390x844.png"))
        .await;
    assert!(narrow <= 390, "the page is {narrow} px wide on a phone");
    println!("screenshots in {}", dir.display());
    drop(cdp);
    siem.service.shutdown().await.unwrap();
}
