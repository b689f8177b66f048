//! The second seed's toy SIEM as a real service, on flowline: `POST /events` (API key in
//! `x-api-key`) → account lookup → enrich → persist (SQLite, batched, idempotent by event
//! id) → every websocket client of `GET /ws`; alerts for severe events go to an SMS/email
//! gateway behind a rate limit, retries and a circuit breaker. `GET /` shows the live
//! events, `GET /metrics` the Prometheus text.
//!
//! Modules: `config` (options), `event` (validation), `http` (routes), `pipeline` (the
//! flowline part), `store` (SQLite), `ws` (the fan-out), `notifier` (client and a fake
//! gateway), `naive` (the same service without flowline, for the benchmark). The library's
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
        if cfg.ws_buffer < cfg.batch {
            // A stored batch is broadcast at once: a smaller buffer would cut off every
            // client at the first full batch.
            return Err(StartError(format!(
                "--ws-buffer {} must be at least --batch {}",
                cfg.ws_buffer, cfg.batch
            )));
        }
        let open = |what: &str| {
            store::open(&cfg.db, cfg.accounts).map_err(|e| {
                StartError(format!(
                    "--db {}: cannot open ({what}): {e}",
                    cfg.db.display()
                ))
            })
        };
        let writer = Arc::new(Mutex::new(open("writer")?));
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

        let accepting = Arc::new(AtomicBool::new(true));
        let (hub, _) = broadcast::channel(cfg.ws_buffer);
        let shared = http::Shared {
            hub: hub.clone(),
            limits: ws::ClientLimits {
                write_timeout: Duration::from_millis(cfg.ws_write_timeout_ms),
            },
            prom: prometheus(),
        };
        let mut checkpoint_task = None;
        let (router, pipelines) = if cfg.naive {
            let state = naive::Naive {
                accepting: accepting.clone(),
                db: writer,
                notifier: client,
                hub,
                threshold: cfg.alert_threshold,
            };
            (naive::events_route(state, cfg.body_limit), None)
        } else {
            // Reads go through a connection of their own: in WAL mode they do not wait for
            // the writer.
            let reader = Arc::new(Mutex::new(open("reader")?));
            // Checkpoints (copying the WAL into the database file, with an fsync) run on a
            // connection of their own, once a second, rather than inside whichever commit
            // crosses the WAL's size limit: the persist stage never waits for an fsync.
            let checkpointer = open("checkpointer")?;
            writer
                .lock()
                .map_err(|_| StartError("lock poisoned".into()))?
                .pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(|e| StartError(format!("--db {}: {e}", cfg.db.display())))?;
            let checkpoints = Arc::new(Mutex::new(checkpointer));
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
            let loader = Loader::new(256, Duration::from_millis(1), move |keys: Vec<String>| {
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
            .map_err(|e| StartError(e.to_string()))?;
            let requeue = {
                let conn = writer
                    .lock()
                    .map_err(|_| StartError("lock poisoned".into()))?;
                store::pending_alerts(&conn, cfg.alert_queue)
                    .map_err(|e| StartError(format!("--db {}: {e}", cfg.db.display())))?
            };
            let (queue_tx, queue_rx) = mpsc::channel(cfg.queue);
            let pipelines =
                pipeline::start(&cfg, queue_rx, loader.clone(), writer, hub, client, requeue);
            let intake = http::Intake {
                accepting: accepting.clone(),
                queue: queue_tx,
                loader,
            };
            (http::events_route(intake, cfg.body_limit), Some(pipelines))
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
            stop_http,
            http,
            pipelines,
            notifier,
            notifier_url,
            checkpoint_task,
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

    /// Drains and stops: new events are refused (503) from now on; requests in progress
    /// finish; every accepted event is stored and broadcast; then the websocket clients are
    /// closed (1001). Alerts still waiting after `alert_grace` stay pending in the database.
    ///
    /// The pipeline is not stopped with flowline's `stop_on_signal` or `Control::stop`:
    /// stopping its source would leave accepted events in the queue. It ends the other way:
    /// its queue's senders go with the HTTP server, and the source reads the queue dry.
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
        let _ = self.stop_http.send(());
        let checkpoint_task = self.checkpoint_task;
        match self.http.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("http server: {e}")),
            Err(e) => return Err(format!("http server: {e}")),
        }
        let Some(p) = self.pipelines else {
            if let Some(t) = checkpoint_task {
                t.abort();
            }
            return Ok(Summary {
                events: None,
                alerts: None,
            });
        };
        let events = p.events.join().await.map_err(|e| e.to_string())?;
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
        drop(self.notifier);
        // The last connection to close checkpoints what is left.
        if let Some(t) = checkpoint_task {
            t.abort();
        }
        Ok(Summary {
            events: Some(events),
            alerts,
        })
    }
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
