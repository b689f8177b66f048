//! The HTTP side: `POST /events` into the pipeline's bounded queue (answered once the event
//! is committed); for viewers `GET /` (the page), `GET /ws` (live), `GET /api/events`,
//! `GET /api/alerts`, `GET /api/rules` (history and state for the page); `GET /metrics`.
//!
//! Viewers authenticate with the viewer token (`?token=` or `authorization: Bearer`; sees
//! every account) or an account's API key (`?key=` or `x-api-key`; sees that account's events
//! and alerts only). `/metrics` takes the viewer token only: its counts are the service's,
//! across accounts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use flowline::Loader;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::event::{Account, BadField, Event, Incoming};
use crate::pipeline::Posted;
use crate::store::{self, Db};
use crate::ws::{ClientLimits, Hub, Scope};

/// API keys and tokens longer than this are refused without a lookup.
const MAX_KEY_LEN: usize = 128;

/// Events `GET /api/events` returns at most.
const MAX_HISTORY: usize = 1000;

/// Who may look, and how a key is checked.
#[derive(Clone)]
pub struct Viewers {
    /// The viewer token: sees every account.
    pub token: Arc<str>,
    /// API key → account, cached.
    pub accounts: Loader<String, Arc<Account>>,
}

/// What the routes common to both services need.
#[derive(Clone)]
pub struct Shared {
    /// The websocket fan-out.
    pub hub: Hub,
    /// Per-client limits.
    pub limits: ClientLimits,
    /// The Prometheus text.
    pub prom: PrometheusHandle,
    /// Who may look.
    pub viewers: Viewers,
    /// A connection for the page's reads (history, alerts).
    pub reader: Db,
    /// The correlation rules, as `/api/rules` shows them.
    pub rules: Arc<crate::rules::RuleSet>,
}

/// The viewer routes and `GET /metrics`.
pub fn common_routes(shared: Shared) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/ws", get(ws))
        .route("/api/events", get(api_events))
        .route("/api/alerts", get(api_alerts))
        .route("/api/rules", get(api_rules))
        .route("/metrics", get(metrics_text))
        .with_state(shared)
}

/// The queue into the events pipeline, shared by the handlers; a stop takes the sender out,
/// which ends the pipeline once it has stored what was queued.
pub type Queue = Arc<RwLock<Option<mpsc::Sender<Posted>>>>;

/// What `POST /events` needs in the flowline service.
#[derive(Clone)]
pub struct Intake {
    /// Cleared when shutdown begins.
    pub accepting: Arc<AtomicBool>,
    /// The pipeline's bounded input.
    pub queue: Queue,
    /// API key → account, cached.
    pub loader: Loader<String, Arc<Account>>,
    /// Largest body accepted.
    pub body_limit: usize,
}

/// `POST /events` of the flowline service.
pub fn events_route(intake: Intake) -> Router {
    Router::new()
        .route("/events", post(post_event))
        // The limit is applied (and its 413 counted) by `read_body`.
        .layer(DefaultBodyLimit::disable())
        .with_state(intake)
}

/// An error answer: JSON `{"error": ..., "field": ...}`, with `Retry-After` when given;
/// counted in `siem_events_rejected_total` by status.
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

/// A refusal of a viewer request (not counted as a rejected event).
fn viewer_refused(status: StatusCode, error: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": error }))).into_response()
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

/// The 415 answer unless the body is declared JSON (`application/json`, any parameters, or
/// an `application/...+json` type): a form or text post is a client's mistake, said at once.
pub fn not_json(headers: &HeaderMap) -> Option<Response> {
    let ty = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match ty.as_deref() {
        Some("application/json") => None,
        Some(t) if t.starts_with("application/") && t.ends_with("+json") => None,
        _ => Some(reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type must be application/json",
            Some("content-type"),
            None,
        )),
    }
}

/// Reads the body up to `limit` bytes: 413 (counted) beyond it.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Response> {
    let too_big = || {
        reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes"),
            Some("body"),
            None,
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_big());
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over {
                Err(too_big())
            } else {
                Err(reject(
                    StatusCode::BAD_REQUEST,
                    "the body could not be read",
                    Some("body"),
                    None,
                ))
            }
        }
    }
}

/// The answer once the service is shutting down: come back later (to this instance once
/// restarted, or another).
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

/// The answer for an accepted (stored) event.
pub fn accepted(id: &str) -> Response {
    metrics::counter!("siem_events_accepted_total").increment(1);
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "id": id })),
    )
        .into_response()
}

async fn post_event(State(s): State<Intake>, headers: HeaderMap, body: Body) -> Response {
    if !s.accepting.load(Ordering::Acquire) {
        return shutting_down();
    }
    let Some(key) = api_key(&headers) else {
        return unauthorized();
    };
    // The key is checked here, before the event is accepted, so that the client hears 401;
    // the account found goes with the event (the pipeline looks up only what lacks one).
    let account = match s.loader.load(key.to_string()).await {
        Ok(Some(account)) => account,
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
    let id = incoming.id.clone();
    let mut event = Event::accepted(incoming, key.to_string());
    event.account = Some(account);
    let (stored_tx, stored) = oneshot::channel();
    // `try_send`: a full queue is answered at once (429), never waited on, so memory stays
    // bounded and the client knows to back off.
    let queued = match s.queue.read() {
        Ok(q) => match q.as_ref() {
            Some(q) => q.try_send((event, stored_tx)),
            None => return shutting_down(),
        },
        Err(_) => return shutting_down(),
    };
    match queued {
        // 202 once the row is committed; if the pipeline could not store it, the answer's
        // sender is dropped unsent.
        Ok(()) => match stored.await {
            Ok(()) => accepted(&id),
            Err(_) => reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "not stored: the database failed",
                None,
                Some(1),
            ),
        },
        Err(TrySendError::Full(_)) => reject(
            StatusCode::TOO_MANY_REQUESTS,
            "pipeline full",
            None,
            Some(1),
        ),
        Err(TrySendError::Closed(_)) => shutting_down(),
    }
}

/// How a viewer says who it is, in the query (a browser's websocket cannot set headers).
#[derive(Debug, Default, Deserialize)]
pub struct Credentials {
    token: Option<String>,
    key: Option<String>,
    limit: Option<usize>,
}

/// Equal in time independent of where they differ (a token compared byte by byte would
/// tell by its timing how much of a guess was right).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Viewers {
    /// The viewer's scope, or the answer refusing it.
    async fn scope(&self, headers: &HeaderMap, q: &Credentials) -> Result<Scope, Response> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(t) = q.token.as_deref().or(bearer) {
            return if same(t.as_bytes(), self.token.as_bytes()) {
                Ok(Scope::All)
            } else {
                Err(viewer_refused(
                    StatusCode::UNAUTHORIZED,
                    "wrong viewer token",
                ))
            };
        }
        let key = q
            .key
            .as_deref()
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        match key {
            Some(k) if !k.is_empty() && k.len() <= MAX_KEY_LEN => {
                match self.accounts.load(k.to_string()).await {
                    Ok(Some(a)) => Ok(Scope::Account(a.id)),
                    Ok(None) => Err(viewer_refused(StatusCode::UNAUTHORIZED, "unknown API key")),
                    Err(_) => Err(viewer_refused(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "account lookup failed",
                    )),
                }
            }
            _ => Err(viewer_refused(
                StatusCode::UNAUTHORIZED,
                "a viewer token (?token=) or an account's API key (?key=) is required",
            )),
        }
    }

    /// Whether this is the viewer token.
    fn is_token(&self, headers: &HeaderMap, q: &Credentials) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        q.token
            .as_deref()
            .or(bearer)
            .is_some_and(|t| same(t.as_bytes(), self.token.as_bytes()))
    }
}

async fn ws(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<Credentials>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let scope = match s.viewers.scope(&headers, &q).await {
        Ok(scope) => scope,
        Err(r) => return r,
    };
    // Subscribed now, before the upgrade completes: the client gets every event stored
    // from its request on. The task gets the receiver only, not the state, so that the
    // hub closes when the pipeline ends.
    let events = s.hub.subscribe();
    let limits = s.limits;
    upgrade.on_upgrade(move |socket| crate::ws::serve_client(socket, events, limits, scope))
}

/// Runs a read on the page's connection, off the async workers.
async fn read<R: Send + 'static>(
    db: &Db,
    f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<R> + Send + 'static,
) -> Result<R, Response> {
    let db = db.clone();
    let out = tokio::task::spawn_blocking(move || {
        let conn = db
            .lock()
            .map_err(|_| "database lock poisoned".to_string())?;
        f(&conn).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    out.map_err(|e| {
        let mut r = viewer_refused(StatusCode::SERVICE_UNAVAILABLE, &format!("database: {e}"));
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1));
        r
    })
}

async fn api_events(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<Credentials>,
) -> Response {
    let scope = match s.viewers.scope(&headers, &q).await {
        Ok(scope) => scope,
        Err(r) => return r,
    };
    let limit = q.limit.unwrap_or(200).clamp(1, MAX_HISTORY);
    match read(&s.reader, move |c| {
        store::recent_events(c, scope.account(), limit)
    })
    .await
    {
        Ok(events) => axum::Json(events).into_response(),
        Err(r) => r,
    }
}

async fn api_alerts(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<Credentials>,
) -> Response {
    let scope = match s.viewers.scope(&headers, &q).await {
        Ok(scope) => scope,
        Err(r) => return r,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_HISTORY);
    match read(&s.reader, move |c| {
        store::recent_alerts(c, scope.account(), limit)
    })
    .await
    {
        Ok(alerts) => axum::Json(alerts).into_response(),
        Err(r) => r,
    }
}

async fn api_rules(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<Credentials>,
) -> Response {
    if let Err(r) = s.viewers.scope(&headers, &q).await {
        return r;
    }
    axum::Json(s.rules.describe()).into_response()
}

async fn metrics_text(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<Credentials>,
) -> Response {
    if !s.viewers.is_token(&headers, &q) {
        return viewer_refused(
            StatusCode::UNAUTHORIZED,
            "the viewer token is required (authorization: Bearer, or ?token=)",
        );
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.prom.render(),
    )
        .into_response()
}

async fn page(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<Credentials>,
) -> Response {
    match s.viewers.scope(&headers, &q).await {
        Ok(_) => Html(include_str!("page.html")).into_response(),
        Err(r) if r.status() == StatusCode::UNAUTHORIZED => {
            (StatusCode::UNAUTHORIZED, Html(include_str!("login.html"))).into_response()
        }
        Err(r) => r,
    }
}
