//! A toy SIEM as a real service, on flowline: `POST /events` (API key in `x-api-key`, JSON
//! body) → account lookup → enrich → persist (SQLite, group commit, idempotent by event id;
//! answered 202 once the row is committed) → every websocket client of `GET /ws`; alerts for
//! severe events and for the correlation rules' matches (windows over the events' own time)
//! go to an SMS/email gateway from the database's outbox, behind a rate limit, retries and a
//! circuit breaker. `GET /` is the analyst's page (history, live events, alerts, counts,
//! filter, pause), `GET /metrics` the Prometheus text; viewers authenticate with the viewer
//! token or an account's key (that account only), `/metrics` with the viewer token.
//!
//! Modules: `config` (options), `event` (validation), `http` (routes), `pipeline` (the
//! flowline part), `rules` (correlation rules), `store` (SQLite), `ws` (the fan-out),
//! `notifier` (client and a fake gateway), `naive` (the same service without flowline, for
//! the benchmark). The library's
//! public face is what a test, the benchmark and `main` need: [`Config`], [`Service`],
//! [`Summary`] and [`counts`].
//!
//! ```no_run
//! # #[tokio::main] async fn main() {
//! let service = flowline_siem::Service::start(flowline_siem::Config::defaults()).await.unwrap();
//! println!("listening on http://{}", service.addr());
//! tokio::signal::ctrl_c().await.unwrap();
//! let summary = service.shutdown().await.unwrap();   // every accepted event stored first
//! println!("{summary:?}");
//! # }
//! ```

#![warn(missing_docs)]

mod config;
mod event;
mod http;
mod naive;
mod notifier;
mod pipeline;
mod rules;
mod store;
mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use config::Config;
use flowline::{Loader, Report};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::notifier::{FakeNotifier, NotifierClient};

/// The Prometheus recorder is process-wide: installed once, shared by every service a
/// process starts (the tests and the benchmark start several).
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder already installed (an embedding application's): ours then
            // renders empty, the service still runs.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// How a run of the service ended.
///
/// ```
/// # #[tokio::main] async fn main() {
/// let dir = tempfile::tempdir().unwrap();
/// let mut cfg = flowline_siem::Config::defaults();
/// cfg.listen = "127.0.0.1:0".parse().unwrap(); // any free port
/// cfg.db = dir.path().join("siem.db");
/// let service = flowline_siem::Service::start(cfg).await.unwrap();
/// let summary = service.shutdown().await.unwrap();
/// assert_eq!(summary.events.unwrap().delivered(), 0); // nothing was posted
/// # }
/// ```
#[derive(Debug)]
pub struct Summary {
    /// The events pipeline's report (none for the naive service).
    pub events: Option<Report>,
    /// The alert lane's report (none for the naive service, or when the lane had to be
    /// cancelled with alerts still held).
    pub alerts: Option<Report>,
    /// Alerts left pending in the database (the notifier did not take them during the
    /// drain): sent at the next start.
    pub alerts_pending: u64,
}

/// A running service.
///
/// ```
/// # #[tokio::main] async fn main() {
/// let dir = tempfile::tempdir().unwrap();
/// let mut cfg = flowline_siem::Config::defaults();
/// cfg.listen = "127.0.0.1:0".parse().unwrap(); // any free port
/// cfg.db = dir.path().join("siem.db");
/// let service = flowline_siem::Service::start(cfg).await.unwrap();
/// println!("listening on http://{}", service.addr());
/// service.shutdown().await.unwrap();
/// # }
/// ```
pub struct Service {
    addr: SocketAddr,
    accepting: Arc<AtomicBool>,
    queue: Option<http::Queue>,
    viewer_token: Arc<str>,
    db: std::path::PathBuf,
    stop_http: oneshot::Sender<()>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    pipelines: Option<pipeline::Pipelines>,
    notifier: Option<FakeNotifier>,
    notifier_url: String,
    checkpoint_task: Option<tokio::task::JoinHandle<()>>,
}

/// Why the service did not start.
///
/// ```
/// # #[tokio::main] async fn main() {
/// let dir = tempfile::tempdir().unwrap();
/// let mut cfg = flowline_siem::Config::defaults();
/// cfg.listen = "127.0.0.1:0".parse().unwrap(); // any free port
/// cfg.db = dir.path().join("siem.db");
/// let service = flowline_siem::Service::start(cfg).await.unwrap();
/// # drop(service);
/// let mut bad = flowline_siem::Config::defaults();
/// bad.db = dir.path().join("no/such/dir/siem.db");
/// let err = flowline_siem::Service::start(bad).await.err().unwrap();
/// assert!(!err.to_string().is_empty());
/// # }
/// ```
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

impl Service {
    /// Opens the database, starts the fake notifier if no URL is given, the pipelines and
    /// the HTTP server.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let mut cfg = flowline_siem::Config::defaults();
    /// cfg.listen = "127.0.0.1:0".parse().unwrap(); // any free port
    /// cfg.db = dir.path().join("siem.db");
    /// let service = flowline_siem::Service::start(cfg).await.unwrap();
    /// assert_ne!(service.addr().port(), 0);
    /// service.shutdown().await.unwrap();
    /// # }
    /// ```
    pub async fn start(cfg: Config) -> Result<Service, StartError> {
        if cfg.ws_buffer < cfg.batch.min(512) {
            // A stored batch is broadcast at once: a smaller buffer would cut off every
            // client at the first full batch.
            return Err(StartError(format!(
                "--ws-buffer {} must be at least --batch {} (or 512)",
                cfg.ws_buffer,
                cfg.batch.min(512)
            )));
        }
        let open = |what: &str| {
            store::open(&cfg.db, cfg.accounts)
                .map(|c| Arc::new(Mutex::new(c)))
                .map_err(|e| {
                    StartError(format!(
                        "--db {}: cannot open ({what}): {e}",
                        cfg.db.display()
                    ))
                })
        };
        let writer = open("writer")?;
        let (notifier, notifier_url) = match &cfg.notifier_url {
            Some(url) => (None, url.clone()),
            None => {
                let fake = FakeNotifier::start(Duration::from_millis(cfg.notifier_delay_ms))
                    .await
                    .map_err(|e| StartError(format!("fake notifier: {e}")))?;
                let url = fake.url();
                (Some(fake), url)
            }
        };
        let client = NotifierClient::new(&notifier_url);
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| StartError(format!("--listen {}: {e}", cfg.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError(format!("--listen {}: {e}", cfg.listen)))?;

        // Reads go through connections of their own: in WAL mode they do not wait for the
        // writer.
        let reader = open("reader")?;
        let page_reader = open("page reader")?;
        let loader = {
            let reader = reader.clone();
            Loader::new(256, Duration::from_millis(1), move |keys: Vec<String>| {
                let reader = reader.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        let conn = reader.lock().map_err(|_| "lock poisoned".to_string())?;
                        store::accounts_by_key(&conn, &keys)
                            .map(|found| {
                                found
                                    .into_iter()
                                    .map(|(k, a)| (k, Arc::new(a)))
                                    .collect::<HashMap<_, _>>()
                            })
                            .map_err(|e| e.to_string())
                    })
                    .await
                    .map_err(|e| e.to_string())?
                }
            })
            .and_then(|l| l.cache(100_000, Duration::from_secs(60)))
            .map_err(|e| StartError(e.to_string()))?
        };
        let rules = if cfg.rules.is_empty() && !cfg.no_default_rules && !cfg.naive {
            rules::DEFAULT_RULES
                .iter()
                .map(|r| rules::Rule::parse(r).map_err(StartError))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            cfg.rules.clone()
        };
        let rules = rules::RuleSet::new(rules).shared();
        let viewer_token: Arc<str> = match &cfg.viewer_token {
            Some(t) => t.as_str().into(),
            None => random_token().into(),
        };

        let accepting = Arc::new(AtomicBool::new(true));
        let (hub, _) = broadcast::channel(cfg.ws_buffer);
        let shared = http::Shared {
            hub: hub.clone(),
            limits: ws::ClientLimits {
                write_timeout: Duration::from_millis(cfg.ws_write_timeout_ms),
            },
            prom: prometheus(),
            viewers: http::Viewers {
                token: viewer_token.clone(),
                accounts: loader.clone(),
            },
            reader: page_reader,
            rules: rules.clone(),
        };
        let mut checkpoint_task = None;
        let mut queue = None;
        let (router, pipelines) = if cfg.naive {
            let state = naive::Naive {
                accepting: accepting.clone(),
                db: writer,
                notifier: client,
                hub,
                threshold: cfg.alert_threshold,
                body_limit: cfg.body_limit,
            };
            (naive::events_route(state), None)
        } else {
            // Checkpoints (copying the WAL into the database file, with an fsync) run on a
            // connection of their own, once a second, rather than inside whichever commit
            // crosses the WAL's size limit: the persist stage never waits for an fsync.
            let checkpoints = open("checkpointer")?;
            writer
                .lock()
                .map_err(|_| StartError("lock poisoned".into()))?
                .pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(|e| StartError(format!("--db {}: {e}", cfg.db.display())))?;
            checkpoint_task = Some(tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    let c = checkpoints.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Ok(conn) = c.lock() {
                            let _ = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)");
                        }
                    })
                    .await;
                }
            }));
            let (queue_tx, queue_rx) = mpsc::channel(cfg.queue);
            let outbox_wake = Arc::new(tokio::sync::Notify::new());
            let writes = store::Writes::default();
            let running = rules::start(
                rules.clone(),
                cfg.queue,
                Duration::from_millis(cfg.rule_lateness_ms),
                writer.clone(),
                writes.clone(),
                hub.clone(),
                outbox_wake.clone(),
            );
            let mut pipelines = pipeline::start(
                &cfg,
                queue_rx,
                pipeline::Parts {
                    loader: loader.clone(),
                    db: writer.clone(),
                    outbox_reader: open("outbox reader")?,
                    hub: hub.clone(),
                    notifier: client,
                    rules: running.inputs,
                    outbox_wake,
                    writes,
                },
            );
            pipelines.rules = running.handles;
            let q: http::Queue = Arc::new(std::sync::RwLock::new(Some(queue_tx)));
            queue = Some(q.clone());
            let intake = http::Intake {
                accepting: accepting.clone(),
                queue: q,
                loader,
                body_limit: cfg.body_limit,
            };
            (http::events_route(intake), Some(pipelines))
        };
        let app = router.merge(http::common_routes(shared));
        let (stop_http, stopped) = oneshot::channel::<()>();
        let http = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Service {
            addr,
            accepting,
            queue,
            stop_http,
            http,
            pipelines,
            notifier,
            notifier_url,
            viewer_token,
            checkpoint_task,
            db: cfg.db.clone(),
        })
    }

    /// The address it listens on.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let mut cfg = flowline_siem::Config::defaults();
    /// cfg.listen = "127.0.0.1:0".parse().unwrap(); // any free port
    /// cfg.db = dir.path().join("siem.db");
    /// let service = flowline_siem::Service::start(cfg).await.unwrap();
    /// assert!(service.addr().ip().is_loopback());
    /// service.shutdown().await.unwrap();
    /// # }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The notifier's base URL.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let mut cfg = flowline_siem::Config::defaults();
    /// cfg.listen = "127.0.0.1:0".parse().unwrap(); // any free port
    /// cfg.db = dir.path().join("siem.db");
    /// let service = flowline_siem::Service::start(cfg).await.unwrap();
    /// // No notifier URL given: the service started its fake gateway.
    /// assert!(service.notifier_url().starts_with("http://127.0.0.1:"));
    /// service.shutdown().await.unwrap();
    /// # }
    /// ```
    pub fn notifier_url(&self) -> &str {
        &self.notifier_url
    }

    /// The fake notifier, when the service started one.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let mut cfg = flowline_siem::Config::defaults();
    /// cfg.listen = "127.0.0.1:0".parse().unwrap(); // any free port
    /// cfg.db = dir.path().join("siem.db");
    /// let service = flowline_siem::Service::start(cfg).await.unwrap();
    /// assert!(service.fake_notifier().is_some());
    /// service.shutdown().await.unwrap();
    /// # }
    /// ```
    pub fn fake_notifier(&self) -> Option<&FakeNotifier> {
        self.notifier.as_ref()
    }

    /// The viewer token (given, or drawn at start).
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let mut cfg = flowline_siem::Config::defaults();
    /// cfg.listen = "127.0.0.1:0".parse().unwrap(); // any free port
    /// cfg.db = dir.path().join("siem.db");
    /// let service = flowline_siem::Service::start(cfg).await.unwrap();
    /// assert!(service.viewer_token().len() >= 16);
    /// service.shutdown().await.unwrap();
    /// # }
    /// ```
    pub fn viewer_token(&self) -> &str {
        &self.viewer_token
    }

    /// Drains and stops. From the first moment new events are answered 503 with
    /// `Retry-After` (the listener stays open through the drain: a client hears why, rather
    /// than finding the port closed); requests already queued are stored and answered 202;
    /// every stored event is broadcast; the alert lane gets what fits of the outbox and has
    /// `alert_grace` to send it; then the websocket clients are closed (1001) and the
    /// listener with them. Alerts that could not be sent stay pending in the database for
    /// the next start ([`Summary::alerts_pending`]).
    ///
    /// The pipeline is not stopped with flowline's `stop_on_signal` or `Control::stop`:
    /// stopping its source would leave accepted events in the queue. It ends the other way:
    /// its queue's sender is dropped, and the source reads the queue dry.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let mut cfg = flowline_siem::Config::defaults();
    /// cfg.listen = "127.0.0.1:0".parse().unwrap(); // any free port
    /// cfg.db = dir.path().join("siem.db");
    /// let service = flowline_siem::Service::start(cfg).await.unwrap();
    /// let summary = service.shutdown().await.unwrap();
    /// assert!(summary.events.unwrap().is_balanced());
    /// # }
    /// ```
    pub async fn shutdown(self) -> Result<Summary, String> {
        self.accepting.store(false, Ordering::Release);
        // A handler that passed the check above holds the read side until it has queued
        // its event: taking the sender out waits for it, and no event is queued after.
        if let Some(q) = &self.queue {
            q.write().map_err(|_| "queue lock poisoned")?.take();
        }
        let stop_http = |http: tokio::task::JoinHandle<std::io::Result<()>>,
                         tx: oneshot::Sender<()>| async move {
            let _ = tx.send(());
            match http.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("http server: {e}")),
                Err(e) => Err(format!("http server: {e}")),
            }
        };
        let checkpoint_task = self.checkpoint_task;
        let Some(p) = self.pipelines else {
            stop_http(self.http, self.stop_http).await?;
            if let Some(t) = checkpoint_task {
                t.abort();
            }
            return Ok(Summary {
                events: None,
                alerts: None,
                alerts_pending: 0,
            });
        };
        let events = p.events.join().await.map_err(|e| e.to_string())?;
        // The rules' inputs went with the events pipeline: their windows are flushed and
        // what they match is stored.
        for rules in p.rules {
            let _ = rules.join().await;
        }
        // The outbox gives the lane what fits, without waiting for room, and lets it end.
        p.stop_outbox.cancel();
        let _ = p.outbox.await;
        let alert_control = p.alerts.control();
        let mut alerts_join = Box::pin(p.alerts.join());
        let alerts = match tokio::time::timeout(Duration::from_secs(5), &mut alerts_join).await {
            Ok(r) => r.ok(),
            Err(_) => {
                // The notifier is still down: what is left stays pending for the next
                // start. A breaker holding its alerts may not let a graceful stop through:
                // then the lane is cancelled (nothing of it is lost: the alerts are rows).
                alert_control.stop();
                match tokio::time::timeout(Duration::from_secs(2), &mut alerts_join).await {
                    Ok(r) => r.ok(),
                    Err(_) => {
                        alert_control.cancel();
                        let _ = alerts_join.await;
                        None
                    }
                }
            }
        };
        // A cancelled lane stopped waiting for its last write, not the write itself.
        p.writes.settled().await;
        let alerts_pending = counts(&self.db)
            .map(|c| c["pending"])
            .map_err(|e| format!("--db {}: {e}", self.db.display()))?;
        if alerts_pending > 0 {
            eprintln!(
                "flowline-siem: {alerts_pending} alerts could not be sent during the drain \
                 (the notifier at {} did not take them); they stay pending in the database \
                 and are sent at the next start",
                self.notifier_url
            );
        }
        stop_http(self.http, self.stop_http).await?;
        drop(self.notifier);
        // The last connection to close checkpoints what is left.
        if let Some(t) = checkpoint_task {
            t.abort();
        }
        Ok(Summary {
            events: Some(events),
            alerts,
            alerts_pending,
        })
    }
}

/// A viewer token drawn at random: 128 bits from the standard library's hasher keys, which
/// it draws from the operating system's random source (no crate needed for 16 bytes).
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for i in 0..2u8 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(i);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// Counts for a quick look: events stored and alerts by status.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("s.db"); // a new file gets the schema
/// assert_eq!(flowline_siem::counts(&path).unwrap()["events"], 0);
/// ```
pub fn counts(db: &std::path::Path) -> rusqlite::Result<HashMap<&'static str, u64>> {
    let conn = store::open(db, 0)?;
    let mut m = HashMap::new();
    m.insert("events", store::count_events(&conn)?);
    for s in ["pending", "sent", "failed"] {
        m.insert(s, store::count_alerts(&conn, s)?);
    }
    Ok(m)
}
