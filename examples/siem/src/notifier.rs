//! Alerts leave by HTTP to an SMS/email gateway. [`FakeNotifier`] stands in for one (the
//! binary starts it when no `--notifier-url` is given; the tests switch it down and up);
//! [`NotifierClient`] calls it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde::Serialize;

use crate::event::Event;

/// What is sent for an alert.
#[derive(Debug, Serialize)]
struct Notification<'a> {
    event_id: &'a str,
    to: &'a str,
    text: String,
}

/// Calls the notifier's `POST /notify`. A status other than 2xx is an error (so that
/// flowline's retry and breaker see it); a `Retry-After` is not used: the stage's retry
/// policy paces the calls, the rate limit bounds them.
#[derive(Debug, Clone)]
pub struct NotifierClient {
    http: reqwest::Client,
    url: Arc<str>,
}

impl NotifierClient {
    /// A client for the notifier at `base` (`http://host:port`).
    pub fn new(base: &str) -> NotifierClient {
        NotifierClient {
            // The pool keeps connections to the gateway open between alerts.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("a plain HTTP client builds"),
            url: format!("{}/notify", base.trim_end_matches('/')).into(),
        }
    }

    /// Sends the alert of `e`. A connection fault, a timeout, a 5xx or a 429 is
    /// [`Transient`](flowline::Transient) (the gateway is down or busy: try again later);
    /// another refusal is [`Permanent`](flowline::Permanent) (this alert will not go).
    pub async fn send(&self, e: &Event) -> Result<(), flowline::BoxError> {
        let to = e.account.as_ref().map_or("", |a| a.contact.as_str());
        let body = Notification {
            event_id: &e.id,
            to,
            text: format!("[sev {}] {}: {}", e.severity, e.kind, e.message),
        };
        let resp = self
            .http
            .post(&*self.url)
            .json(&body)
            .send()
            .await
            .map_err(|err| flowline::Transient::new(format!("notifier unreachable: {err}")))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(flowline::Transient::new(format!("notifier answered {status}")).into())
        } else {
            Err(flowline::Permanent::new(format!("notifier answered {status}")).into())
        }
    }
}

#[derive(Default)]
struct FakeState {
    down: AtomicBool,
    delivered: AtomicU64,
    refused: AtomicU64,
    delay: Duration,
}

/// A local stand-in for an SMS/email gateway: `POST /notify` answers 200 after `delay`, or
/// 503 while [`down`](FakeNotifier::set_down).
pub struct FakeNotifier {
    addr: SocketAddr,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeNotifier {
    /// Serves on a free port of 127.0.0.1; each notification takes `delay` (a gateway is
    /// slower than a database).
    pub async fn start(delay: Duration) -> std::io::Result<FakeNotifier> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(FakeState {
            delay,
            ..FakeState::default()
        });
        let app = Router::new()
            .route("/notify", post(notify))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeNotifier { addr, state, task })
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// While down, every notification is answered 503 and not counted as delivered.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Notifications answered 200.
    pub fn delivered(&self) -> u64 {
        self.state.delivered.load(Ordering::SeqCst)
    }

    /// Notifications answered 503.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl Drop for FakeNotifier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn notify(State(state): State<Arc<FakeState>>, _body: axum::body::Bytes) -> StatusCode {
    if state.down.load(Ordering::SeqCst) {
        state.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    state.delivered.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_client_posts_to_notify() {
        let c = super::NotifierClient::new("http://127.0.0.1:9/");
        assert!(format!("{c:?}").contains("127.0.0.1:9/notify"));
    }
}
