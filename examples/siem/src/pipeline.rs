//! The flowline pipelines behind `POST /events`.
//!
//! Events: `from_channel` (the bounded queue the HTTP handler `try_send`s into, each event
//! with the sender of its answer) → enrich → the [`Store`] sink: the account lookup (through
//! the [`Loader`]: lookups coalesce into one query, answers cached), then one transaction
//! for whatever is ready (a group commit: while one commit runs, the next batch gathers, so
//! batches grow with the load and a quiet service commits at once), then each request is
//! answered (`202` means the row is committed), then the stored events go to the websocket
//! hub and to the correlation rules.
//!
//! Alerts: a lane of its own, fed from the database's outbox (an alert is a `pending` row
//! from the moment its event is stored, in the same transaction). The notifier is slow and
//! may be down: in the events pipeline its retries and its breaker would hold up every event
//! behind an alert. In its own lane, the rate limit, retry and breaker (which pauses the
//! lane, holding its alerts, while the notifier is down) act on alerts only. The lane is
//! bounded (`--alert-queue`); the outbox reader fills it as it empties, so no alert waits for
//! a restart, and an alert is read into the lane once per run.

use std::sync::Arc;
use std::time::Duration;

use flowline::prelude::*;
use flowline::{BatchSink, Outage};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::event::{Account, Event};
use crate::notifier::NotifierClient;
use crate::store::{self, AlertOutcome, Db, Writes};
use crate::ws::{Hub, Msg};

/// An accepted event and the sender of its answer: `()` once its row is committed; dropped
/// unsent if it could not be stored.
pub type Posted = (Event, oneshot::Sender<()>);

/// The running pipelines.
pub struct Pipelines {
    /// The events pipeline; it ends once its queue is closed and what was queued is stored
    /// and broadcast.
    pub events: Handle,
    /// The alert lane; it ends when the outbox reader has stopped and what it gave the lane
    /// is sent, or when stopped.
    pub alerts: Handle,
    /// The outbox reader; `stop_outbox` makes it read once more (what fits) and end.
    pub outbox: tokio::task::JoinHandle<()>,
    /// Tells the outbox reader to stop.
    pub stop_outbox: CancellationToken,
    /// The database writes of both; a stop waits for them to settle.
    pub writes: Writes,
    /// The correlation rules' pipelines, one per rule.
    pub rules: Vec<Handle>,
}

/// What the pipelines need besides the config.
pub struct Parts {
    /// API key → account, cached.
    pub loader: Loader<String, Arc<Account>>,
    /// The writer connection.
    pub db: Db,
    /// A connection for the outbox reader's reads.
    pub outbox_reader: Db,
    /// The websocket fan-out.
    pub hub: Hub,
    /// The notifier client.
    pub notifier: NotifierClient,
    /// Where stored events go for the correlation rules: one input per rule.
    pub rules: Vec<mpsc::Sender<Event>>,
    /// Wakes the outbox reader (shared with the rules, whose matches alert too).
    pub outbox_wake: Arc<Notify>,
    /// The database writes of every pipeline, tracked for the stop.
    pub writes: Writes,
}

/// Starts the pipelines on `queue` (the HTTP side holds its sender).
pub fn start(cfg: &Config, queue: mpsc::Receiver<Posted>, parts: Parts) -> Pipelines {
    let writes = parts.writes;
    let outbox_wake = parts.outbox_wake;
    let threshold = cfg.alert_threshold;
    let store = Store {
        loader: parts.loader,
        db: parts.db.clone(),
        writes: writes.clone(),
        hub: parts.hub.clone(),
        outbox: outbox_wake.clone(),
        rules: parts.rules,
        per_transaction: cfg.batch,
        outage: Outage::default(),
        insert: Arc::new(store::insert_batch),
    };
    let events = Pipeline::from_channel(queue)
        .map(move |(mut e, answer): Posted| {
            e.status = "enriched";
            e.alert = e.severity >= threshold;
            (e, answer)
        })
        .into_sink(store)
        .name("siem_events")
        .spawn();

    let (alert_tx, alert_rx) = mpsc::channel::<Event>(cfg.alert_queue);
    let stop_outbox = CancellationToken::new();
    let outbox = tokio::spawn(outbox(
        parts.outbox_reader,
        outbox_wake,
        alert_tx,
        stop_outbox.clone(),
    ));
    let alerts = alert_lane(
        cfg,
        alert_rx,
        parts.db,
        writes.clone(),
        parts.hub,
        parts.notifier,
    );
    Pipelines {
        events,
        alerts,
        outbox,
        stop_outbox,
        writes,
        rules: Vec::new(),
    }
}

/// Whether a notifier call is worth trying again (and counts against the breaker): a
/// connection fault, a 5xx or 429, or a call that timed out.
fn notifier_fault(e: &ItemError) -> bool {
    e.is_transient() || matches!(e, ItemError::Timeout(_))
}

fn alert_lane(
    cfg: &Config,
    alert_rx: mpsc::Receiver<Event>,
    db: Db,
    writes: Writes,
    hub: Hub,
    notifier: NotifierClient,
) -> Handle {
    let rate = Rate::per_second(cfg.alert_rate).burst(cfg.alert_rate.max(1));
    Pipeline::from_channel(alert_rx)
        .try_map_async_with("notify", notifier, |n, e: Event| async move {
            let attempt = flowline::attempt();
            n.send(&e).await.map(|()| (e, attempt))
        })
        .workers(16)
        .unordered()
        .timeout(Duration::from_secs(5))
        .rate_limit(rate)
        .retry(
            Retry::exponential(Duration::from_millis(100))
                .max_attempts(4)
                .max_delay(Duration::from_secs(2))
                .jitter()
                .retry_if(notifier_fault),
        )
        // Open after 5 faults in a row: the lane pauses (holding its alerts, not failing
        // them) and probes the notifier every cooldown. A refusal (4xx) is the alert's own
        // fault and does not open it.
        .circuit_breaker(
            Breaker::consecutive_failures(5)
                .cooldown(Duration::from_millis(cfg.breaker_cooldown_ms))
                .counts(notifier_fault),
        )
        .results()
        .map(|r| match r {
            Ok((e, attempts)) => {
                metrics::counter!("siem_alerts_total", "outcome" => "sent").increment(1);
                AlertOutcome::of(e, "sent", attempts, None)
            }
            Err(f) => {
                metrics::counter!("siem_alerts_total", "outcome" => "failed").increment(1);
                let error = f.error.to_string();
                AlertOutcome::of(f.input, "failed", f.attempts, Some(error))
            }
        })
        .batch(64, Duration::from_millis(100))
        .try_map_async_with(
            "alert_outcome",
            (db, writes),
            |(db, writes), outcomes: Vec<AlertOutcome>| async move {
                Outage::default()
                    .retry("database", || {
                        let (db, writes, outcomes) = (db.clone(), writes.clone(), outcomes.clone());
                        async move {
                            writes
                                .run(&db, move |conn| store::record_alerts(conn, &outcomes))
                                .await
                        }
                    })
                    .await?;
                Ok::<_, flowline::BoxError>(outcomes)
            },
        )
        .for_each(move |outcomes: Vec<AlertOutcome>| {
            for o in &outcomes {
                let json = serde_json::json!({ "outcome": o }).to_string();
                let _ = hub.send(Msg::new(o.account_id, json));
            }
            std::future::ready(())
        })
        .name("siem_alerts")
        .spawn()
}

/// Feeds the alert lane from the outbox: whenever a commit stored an alert (and once at
/// start, for what an earlier run left pending), it reads the pending alerts after its
/// cursor, as many as the lane has room for, waiting for room when it is full. Stopped, it
/// reads once more what fits without waiting, and ends (the lane then ends when empty);
/// what did not fit stays pending for the next start.
async fn outbox(reader: Db, wake: Arc<Notify>, lane: mpsc::Sender<Event>, stop: CancellationToken) {
    let mut cursor = 0i64;
    let mut stopping = false;
    loop {
        // Read until caught up with the committed rows.
        loop {
            let permit = if stopping {
                match lane.try_reserve() {
                    Ok(p) => p,
                    Err(_) => return,
                }
            } else {
                tokio::select! {
                    p = lane.reserve() => match p {
                        Ok(p) => p,
                        Err(_) => return, // the lane ended (cancelled)
                    },
                    _ = stop.cancelled() => { stopping = true; continue; }
                }
            };
            let room = lane.capacity() + 1;
            let read = Outage::default()
                .retry("database", || {
                    let reader = reader.clone();
                    async move {
                        tokio::task::spawn_blocking(move || {
                            let conn = reader
                                .lock()
                                .map_err(|_| flowline::Permanent::new("database lock poisoned"))?;
                            store::pending_alerts_after(&conn, cursor, room)
                                .map_err(store::classify)
                        })
                        .await
                        .map_err(|e| flowline::BoxError::from(flowline::Permanent::new(e)))?
                    }
                })
                .await;
            let (events, next) = match read {
                Ok(r) => r,
                Err(e) => {
                    // The pending rows stay for the next start.
                    eprintln!("flowline-siem: outbox: {e}");
                    return;
                }
            };
            cursor = next;
            let n = events.len();
            let mut events = events.into_iter();
            match events.next() {
                Some(first) => permit.send(first),
                None => break,
            }
            for e in events {
                // Room was counted above and only this task sends.
                let _ = lane.try_send(e);
            }
            if n < room {
                break;
            }
        }
        if stopping {
            return;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = stop.cancelled() => stopping = true,
        }
    }
}

/// The events pipeline's sink: account lookup, one transaction, the answers, the fan-out.
struct Store {
    loader: Loader<String, Arc<Account>>,
    db: Db,
    writes: Writes,
    hub: Hub,
    outbox: Arc<Notify>,
    rules: Vec<mpsc::Sender<Event>>,
    per_transaction: usize,
    outage: Outage,
    /// One transaction's insert ([`store::insert_batch`]; a test puts faults in it).
    insert: Insert,
}

/// Inserts events in one transaction; per event, whether it was new.
type Insert =
    Arc<dyn Fn(&mut rusqlite::Connection, &[Event]) -> rusqlite::Result<Vec<bool>> + Send + Sync>;

impl Store {
    /// Sends committed events on (to the websocket hub and the correlation rules), each
    /// one whose row is new; whether one of them calls for an alert.
    async fn forward(&self, events: Vec<Event>, new: &[bool]) -> bool {
        let mut alerted = false;
        let mut stored = 0;
        for (mut e, new) in events.into_iter().zip(new) {
            if !new {
                // A repeated post of a stored id: stored once, shown once.
                metrics::counter!("siem_events_duplicate_total").increment(1);
                continue;
            }
            stored += 1;
            e.status = "stored";
            alerted |= e.alert;
            // No client connected is not an error: `send` fails only then.
            if let Ok(json) = serde_json::to_string(&e) {
                let _ = self.hub.send(Msg::new(e.account_id(), json));
            }
            // The rules keep up (they count in memory); waiting here is back-pressure, not
            // a loss.
            for rule in &self.rules {
                let _ = rule.send(e.clone()).await;
            }
        }
        metrics::counter!("siem_events_persisted_total").increment(stored);
        alerted
    }
}

impl BatchSink<Posted> for Store {
    type Output = ();

    fn name(&self) -> &'static str {
        "persist"
    }

    async fn write(&mut self, batch: Vec<Posted>) -> Result<(), flowline::BoxError> {
        let (mut events, answers): (Vec<Event>, Vec<oneshot::Sender<()>>) =
            batch.into_iter().unzip();
        // The door looked the account up already; an event without one is looked up here,
        // in one lock of the loader for the batch (cached accounts answer at once, the
        // misses go to the database together).
        let lacking: Vec<usize> = (0..events.len())
            .filter(|&i| events[i].account.is_none())
            .collect();
        if !lacking.is_empty() {
            let keys = lacking.iter().map(|&i| events[i].api_key.clone()).collect();
            for (i, account) in lacking.into_iter().zip(self.loader.load_many(keys).await) {
                match account {
                    Ok(account) => events[i].account = account,
                    // A lookup failing now (the database busy) must not lose the event: it
                    // is stored without account details.
                    Err(_) => metrics::counter!("siem_account_lookup_errors_total").increment(1),
                }
            }
        }
        // Each transaction is retried on its own: one committed is never written again
        // (its rows would read as repeats and its events would not go on), and its
        // requests hear 202 before the next one starts.
        let events = Arc::new(events);
        let mut answers = answers.into_iter();
        let mut new = Vec::with_capacity(events.len());
        let outcome = loop {
            let from = new.len();
            if from == events.len() {
                break Ok(());
            }
            let to = (from + self.per_transaction.max(1)).min(events.len());
            // A busy database is waited out (the requests wait with it); an error that
            // trying again cannot fix fails the rest of the batch: its requests are
            // answered 503, none 202.
            let committed = self
                .outage
                .retry("database", || {
                    let (db, writes, events) =
                        (self.db.clone(), self.writes.clone(), events.clone());
                    let insert = self.insert.clone();
                    async move {
                        writes
                            .run(&db, move |conn| insert(conn, &events[from..to]))
                            .await
                    }
                })
                .await;
            match committed {
                Ok(part) => new.extend(part),
                Err(e) => break Err(e),
            }
            // Committed: now, and only now, these requests hear 202.
            for answer in answers.by_ref().take(to - from) {
                let _ = answer.send(());
            }
        };
        // What was committed goes on, even when a later transaction failed.
        let mut events = Arc::try_unwrap(events).unwrap_or_else(|shared| (*shared).clone());
        events.truncate(new.len());
        if self.forward(events, &new).await {
            self.outbox.notify_one();
        }
        Ok(outcome?)
    }

    fn finish(self) {}
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::event::Incoming;

    /// A persist sink over a fresh database, `per_transaction` events a transaction, whose
    /// second transaction's first attempt fails with `fault`; the hub's and a rule's
    /// receiving ends.
    fn store(
        dir: &std::path::Path,
        fault: i32,
    ) -> (
        Store,
        tokio::sync::broadcast::Receiver<Msg>,
        mpsc::Receiver<Event>,
    ) {
        let db: Db = Arc::new(Mutex::new(store::open(&dir.join("t.db"), 1).unwrap()));
        let loader = Loader::new(16, Duration::from_millis(1), |_: Vec<String>| async {
            Ok::<_, String>(HashMap::<String, Arc<Account>>::new())
        })
        .unwrap();
        let (hub, feed) = tokio::sync::broadcast::channel(64);
        let (rule, matched) = mpsc::channel(64);
        let calls = AtomicUsize::new(0);
        let insert: Insert = Arc::new(move |conn, events| {
            if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(fault),
                    None,
                ));
            }
            store::insert_batch(conn, events)
        });
        let sink = Store {
            loader,
            db,
            writes: Writes::default(),
            hub,
            outbox: Arc::new(Notify::new()),
            rules: vec![rule],
            per_transaction: 2,
            outage: Outage::default(),
            insert,
        };
        (sink, feed, matched)
    }

    /// Four posted events e1..e4 and the receivers of their answers.
    fn posted() -> (Vec<Posted>, Vec<oneshot::Receiver<()>>) {
        (1..=4)
            .map(|i| {
                let body = format!(r#"{{"id":"e{i}","kind":"k","severity":1}}"#);
                let e = Event::accepted(Incoming::parse(body.as_bytes()).unwrap(), "key-1".into());
                let (tx, rx) = oneshot::channel();
                ((e, tx), rx)
            })
            .unzip()
    }

    fn ids(
        feed: &mut tokio::sync::broadcast::Receiver<Msg>,
        rule: &mut mpsc::Receiver<Event>,
    ) -> (Vec<String>, Vec<String>) {
        let mut shown = Vec::new();
        while let Ok(m) = feed.try_recv() {
            let v: serde_json::Value = serde_json::from_str(m.text()).unwrap();
            shown.push(v["id"].as_str().unwrap().to_string());
        }
        let mut ruled = Vec::new();
        while let Ok(e) = rule.try_recv() {
            ruled.push(e.id);
        }
        (shown, ruled)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_second_transaction_is_retried_alone_and_the_first_goes_on_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, mut feed, mut rule) = store(dir.path(), rusqlite::ffi::SQLITE_BUSY);
        let (batch, answers) = posted();
        sink.write(batch).await.unwrap();
        for a in answers {
            a.await.expect("every event answered 202");
        }
        let all: Vec<String> = (1..=4).map(|i| format!("e{i}")).collect();
        assert_eq!(ids(&mut feed, &mut rule), (all.clone(), all));
        let conn = sink.db.lock().unwrap();
        assert_eq!(store::count_events(&conn).unwrap(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_second_transaction_leaves_the_first_answered_and_sent_on() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, mut feed, mut rule) = store(dir.path(), rusqlite::ffi::SQLITE_FULL);
        let (batch, answers) = posted();
        assert!(sink.write(batch).await.is_err());
        let mut answers = answers.into_iter();
        for a in answers.by_ref().take(2) {
            a.await.expect("the committed events answered 202");
        }
        for a in answers {
            assert!(a.await.is_err(), "an event not stored is not answered 202");
        }
        let first: Vec<String> = vec!["e1".into(), "e2".into()];
        assert_eq!(ids(&mut feed, &mut rule), (first.clone(), first));
        let conn = sink.db.lock().unwrap();
        assert_eq!(store::count_events(&conn).unwrap(), 2);
    }
}
