//! The same service written the naive way, the benchmark's baseline: each request looks the
//! account up, calls the notifier if needed, inserts its row and broadcasts, all inline.
//! Same database settings (WAL, `synchronous = NORMAL`), same websocket fan-out, same
//! validation: only the organisation of the work differs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;

use crate::event::{Event, Incoming};
use crate::http::{
    accepted, api_key, bad_body, lookup_failed, not_json, read_body, reject, shutting_down,
    unauthorized,
};
use crate::notifier::NotifierClient;
use crate::store::{self, AlertOutcome, Db};
use crate::ws::{Hub, Msg};

/// What the naive handler needs.
#[derive(Clone)]
pub struct Naive {
    /// Cleared when shutdown begins.
    pub accepting: Arc<AtomicBool>,
    /// The one connection, behind a mutex.
    pub db: Db,
    /// The notifier.
    pub notifier: NotifierClient,
    /// The websocket fan-out.
    pub hub: Hub,
    /// Alert threshold.
    pub threshold: u8,
    /// Largest body accepted.
    pub body_limit: usize,
}

/// `POST /events`, naive.
pub fn events_route(state: Naive) -> Router {
    Router::new()
        .route("/events", post(post_event))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn post_event(State(s): State<Naive>, headers: HeaderMap, body: Body) -> Response {
    if !s.accepting.load(Ordering::Acquire) {
        return shutting_down();
    }
    let Some(key) = api_key(&headers) else {
        return unauthorized();
    };
    let account = {
        let conn = s.db.lock().expect("database lock");
        store::accounts_by_key(&conn, &[key.to_string()]).map(|mut m| m.remove(key))
    };
    let account = match account {
        Ok(Some(a)) => a,
        Ok(None) => return unauthorized(),
        Err(_) => return lookup_failed(),
    };
    if let Some(r) = not_json(&headers) {
        return r;
    }
    let body = match read_body(&headers, body, s.body_limit).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let incoming = match Incoming::parse(&body) {
        Ok(i) => i,
        Err(e) => return bad_body(e),
    };
    let mut e = Event::accepted(incoming, key.to_string());
    e.account = Some(std::sync::Arc::new(account));
    e.status = "enriched";
    e.alert = e.severity >= s.threshold;
    let alert = if e.alert {
        let outcome = s.notifier.send(&e).await;
        let status = if outcome.is_ok() { "sent" } else { "failed" };
        Some(AlertOutcome::of(
            e.clone(),
            status,
            1,
            outcome.err().map(|err| err.to_string()),
        ))
    } else {
        None
    };
    let new = {
        let mut conn = s.db.lock().expect("database lock");
        let new = store::insert_event(&conn, &e);
        if let (Ok(true), Some(a)) = (&new, alert) {
            let _ = store::record_alerts(&mut conn, &[a]);
        }
        new
    };
    match new {
        Ok(true) => {
            metrics::counter!("siem_events_persisted_total").increment(1);
            e.status = "stored";
            if let Ok(json) = serde_json::to_string(&e) {
                let _ = s.hub.send(Msg::new(e.account_id(), json));
            }
            accepted(&e.id)
        }
        Ok(false) => accepted(&e.id),
        Err(err) => reject(
            StatusCode::SERVICE_UNAVAILABLE,
            &err.to_string(),
            None,
            Some(1),
        ),
    }
}
