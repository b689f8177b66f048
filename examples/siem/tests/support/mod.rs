//! What the tests share: a service on a free port over a temporary database, HTTP and
//! websocket clients.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use flowline_siem::{Config, Service};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// The viewer token every test service is started with.
pub const TOKEN: &str = "test-viewer-token-0123456789";

pub struct Siem {
    pub service: Service,
    pub db: PathBuf,
    pub base: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// Starts a service on 127.0.0.1:0 with the given extra options.
pub async fn start(args: &[&str]) -> Siem {
    start_in(tempfile::tempdir().unwrap(), args).await
}

/// Starts a service over `dir/siem.db` (a database an earlier service may have left).
pub async fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Siem {
    let db = dir.path().join("siem.db");
    let mut all = vec![
        "flowline-siem",
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
        "--viewer-token",
        TOKEN,
    ];
    // The correlation rules raise events of their own: only the tests of the rules want
    // them (they give `--rule`).
    if !args.contains(&"--rule") {
        all.push("--no-default-rules");
    }
    all.extend_from_slice(args);
    let service = Service::start(Config::try_parse_from(all).unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", service.addr());
    Siem {
        service,
        db,
        base,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Siem {
    pub async fn post(&self, key: &str, body: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/events", self.base))
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn post_event(&self, key: &str, id: &str, severity: u8) -> u16 {
        let body = format!(
            r#"{{"id":"{id}","kind":"login_failed","severity":{severity},"message":"m {id}"}}"#
        );
        self.post(key, &body).await.status().as_u16()
    }

    /// A websocket client with the viewer token (sees every account).
    pub async fn ws(&self) -> Ws {
        self.ws_with(&format!("token={TOKEN}")).await.unwrap()
    }

    /// A websocket client with the given query (`token=...`, `key=...`, or none); the
    /// handshake's error when refused.
    pub async fn ws_with(&self, query: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let url = format!("ws://{}/ws?{query}", self.service.addr());
        tokio_tungstenite::connect_async(url)
            .await
            .map(|(ws, _)| ws)
    }

    /// `GET path` with the viewer token, as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn counts(&self) -> HashMap<&'static str, u64> {
        flowline_siem::counts(&self.db).unwrap()
    }

    /// Drains and stops the service; its database directory, for a next start.
    pub async fn stop(self) -> tempfile::TempDir {
        self.service.shutdown().await.unwrap();
        self._dir
    }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads events from `ws` until `n` are in (or 30 s pass): (id, account name) each.
pub async fn read_events(ws: &mut Ws, n: usize) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events within 30 s", got.len()));
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                // Alerts' outcomes (`{"outcome": ...}`) come on the same socket; only events are counted here.
                if v.get("outcome").is_none() {
                    got.push(v);
                }
            }
            Some(Ok(_)) => {}
            other => panic!(
                "websocket ended after {} of {n} events: {other:?}",
                got.len()
            ),
        }
    }
    got
}
