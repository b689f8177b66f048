//! The HTTP side: `POST /events` into the pipeline's bounded queue, `GET /ws`, `GET /`,
//! `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use flowline::Loader;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::event::{Account, BadField, Event, Incoming};
use crate::ws::{ClientLimits, Hub};

/// API keys longer than this are refused without a lookup.
const MAX_KEY_LEN: usize = 128;

/// What the routes common to both services need.
#[derive(Clone)]
pub struct Shared {
    /// The websocket fan-out.
    pub hub: Hub,
    /// Per-client limits.
    pub limits: ClientLimits,
    /// The Prometheus text.
    pub prom: PrometheusHandle,
}

/// `GET /`, `GET /ws`, `GET /metrics`.
pub fn common_routes(shared: Shared) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/ws", get(ws))
        .route("/metrics", get(metrics_text))
        .with_state(shared)
}

/// What `POST /events` needs in the flowline service.
#[derive(Clone)]
pub struct Intake {
    /// Cleared when shutdown begins.
    pub accepting: Arc<AtomicBool>,
    /// The pipeline's bounded input.
    pub queue: mpsc::Sender<Event>,
    /// API key → account, cached.
    pub loader: Loader<String, Arc<Account>>,
}

/// `POST /events` of the flowline service, with the body limit.
pub fn events_route(intake: Intake, body_limit: usize) -> Router {
    Router::new()
        .route("/events", post(post_event))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(intake)
}

/// An error answer: JSON `{"error": ..., "field": ...}`, with `Retry-After` when given.
pub fn reject(
    status: StatusCode,
    error: &str,
    field: Option<&str>,
    retry_after: Option<u32>,
) -> Response {
    let body = serde_json::json!({ "error": error, "field": field });
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    metrics::counter!("siem_events_rejected_total", "status" => status.as_str().to_string())
        .increment(1);
    resp
}

/// The answer to a body that does not parse.
pub fn bad_body(e: BadField) -> Response {
    reject(StatusCode::BAD_REQUEST, &e.to_string(), Some(e.field), None)
}

/// The API key of a request, if it has a plausible one.
pub fn api_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
}

/// The answer once the service is shutting down.
pub fn shutting_down() -> Response {
    reject(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting down",
        None,
        Some(5),
    )
}

/// 503: the account could not be looked up (the database is busy or down); try again in
/// a second.
pub fn lookup_failed() -> Response {
    reject(
        StatusCode::SERVICE_UNAVAILABLE,
        "account lookup failed",
        None,
        Some(1),
    )
}

/// The answer to a missing or unknown key.
pub fn unauthorized() -> Response {
    reject(
        StatusCode::UNAUTHORIZED,
        "unknown API key",
        Some("x-api-key"),
        None,
    )
}

/// The answer for an accepted event.
pub fn accepted(id: &str) -> Response {
    metrics::counter!("siem_events_accepted_total").increment(1);
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "id": id })),
    )
        .into_response()
}

async fn post_event(State(s): State<Intake>, headers: HeaderMap, body: Bytes) -> Response {
    if !s.accepting.load(Ordering::Acquire) {
        return shutting_down();
    }
    let Some(key) = api_key(&headers) else {
        return unauthorized();
    };
    // The key is checked here, before the event is accepted, so that the client hears 401;
    // the same loader (cached) fills in the account in the pipeline.
    match s.loader.load(key.to_string()).await {
        Ok(Some(_)) => {}
        Ok(None) => return unauthorized(),
        Err(_) => return lookup_failed(),
    }
    let incoming = match Incoming::parse(&body) {
        Ok(i) => i,
        Err(e) => return bad_body(e),
    };
    let id = incoming.id.clone();
    // `try_send`: a full queue is answered at once (429), never waited on, so memory stays
    // bounded and the client knows to back off.
    match s.queue.try_send(Event::accepted(incoming, key.to_string())) {
        Ok(()) => accepted(&id),
        Err(TrySendError::Full(_)) => reject(
            StatusCode::TOO_MANY_REQUESTS,
            "pipeline full",
            None,
            Some(1),
        ),
        Err(TrySendError::Closed(_)) => shutting_down(),
    }
}

async fn ws(State(s): State<Shared>, upgrade: WebSocketUpgrade) -> Response {
    // Subscribed now, before the upgrade completes: the client gets every event stored
    // from its request on. The task gets the receiver only, not the state, so that the
    // hub closes when the pipeline ends.
    let events = s.hub.subscribe();
    let limits = s.limits;
    upgrade.on_upgrade(move |socket| crate::ws::serve_client(socket, events, limits))
}

async fn metrics_text(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.prom.render(),
    )
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}
