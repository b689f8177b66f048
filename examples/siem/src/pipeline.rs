//! The two flowline pipelines behind `POST /events`.
//!
//! Events: `from_channel` (the bounded queue the HTTP handler `try_send`s into) → batch →
//! account (through the [`Loader`]: lookups coalesce into one query, answers cached) →
//! enrich → persist (one transaction per batch, `INSERT OR IGNORE` by event id) →
//! broadcast to the websocket hub. Every stage keeps input order, so the clients see each
//! account's events in the order they were accepted.
//!
//! Alerts: a lane of its own, fed after persist. The notifier is slow and may be down: in
//! the events pipeline its retries and its breaker would hold up every event behind an
//! alert. In its own lane, the rate limit, retry and breaker (which pauses the lane, holding
//! its alerts, while the notifier is down) act on alerts only; the alert is in the database
//! as `pending` from the moment its event is stored (same transaction), becomes `sent` or
//! `failed`, and a pending one left by a full lane or a stop is sent again at the next start.

use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use flowline::prelude::*;
use tokio::sync::mpsc;

use crate::config::Config;
use std::sync::Arc;

use crate::event::{Account, Event};
use crate::notifier::NotifierClient;
use crate::store::{self, AlertOutcome, Db, Writes};
use crate::ws::Hub;

/// The running pipelines.
pub struct Pipelines {
    /// The events pipeline; it ends once every sender of its queue is dropped and what was
    /// queued is stored and broadcast.
    pub events: Handle,
    /// The alert lane; it ends when the events pipeline has ended and its alerts are sent,
    /// or when stopped.
    pub alerts: Handle,
    /// The database writes of both; a stop waits for them to settle.
    pub writes: Writes,
}

/// Starts both pipelines on `queue` (the HTTP side holds its sender).
pub fn start(
    cfg: &Config,
    queue: mpsc::Receiver<Event>,
    loader: Loader<String, Arc<Account>>,
    db: Db,
    hub: Hub,
    notifier: NotifierClient,
    requeue: Vec<Event>,
) -> Pipelines {
    let writes = Writes::default();
    let (alert_tx, alert_rx) = mpsc::channel::<Event>(cfg.alert_queue);
    for e in requeue {
        let _ = alert_tx.try_send(e);
    }
    let threshold = cfg.alert_threshold;
    let events = Pipeline::from_channel(queue)
        // Batched from the start: every stage after this one works a batch per call, so its
        // per-call cost (a lock, a task hop, a transaction) is paid once per batch.
        .batch(cfg.batch, Duration::from_millis(cfg.batch_wait_ms))
        .map_async_with(
            "account",
            loader,
            |loader, mut batch: Vec<Event>| async move {
                // One lock of the loader for the batch; cached accounts answer at once, the
                // misses go to the database together.
                let keys = batch.iter().map(|e| e.api_key.clone()).collect();
                for (e, account) in batch.iter_mut().zip(loader.load_many(keys).await) {
                    match account {
                        Ok(account) => e.account = account,
                        // The key was checked at the door; a lookup failing now (the database
                        // busy) must not lose the event: it is stored without account details.
                        Err(_) => {
                            metrics::counter!("siem_account_lookup_errors_total").increment(1)
                        }
                    }
                }
                batch
            },
        )
        .map(move |mut batch: Vec<Event>| {
            for e in &mut batch {
                e.status = "enriched";
                e.alert = e.severity >= threshold;
            }
            batch
        })
        .try_map_async_with(
            "persist",
            (db.clone(), writes.clone()),
            |(db, writes), batch: Vec<Event>| async move {
                // SQLite is blocking: off the async workers.
                writes
                    .run(&db, move |conn| {
                        let new = store::insert_batch(conn, &batch)?;
                        Ok(batch.into_iter().zip(new).collect::<Vec<_>>())
                    })
                    .await
            },
        )
        // A locked or full database is retried: an accepted event must be stored.
        .retry(
            Retry::exponential(Duration::from_millis(20))
                .max_attempts(12)
                .max_delay(Duration::from_secs(2)),
        )
        .flat_map(|stored| stored)
        .filter_map(|(mut e, new)| {
            if !new {
                // A repeated post of a stored id: stored once, shown once.
                metrics::counter!("siem_events_duplicate_total").increment(1);
                return None;
            }
            metrics::counter!("siem_events_persisted_total").increment(1);
            e.status = "stored";
            Some(e)
        })
        .inspect(move |e: &Event| {
            if e.alert && alert_tx.try_send(e.clone()).is_err() {
                // The lane is full (the notifier down for long): the alert stays
                // `pending` in the database and is sent at the next start.
                metrics::counter!("siem_alerts_total", "outcome" => "held").increment(1);
            }
        })
        .for_each(move |e: Event| {
            // No client connected is not an error: `send` fails only then.
            if let Ok(json) = serde_json::to_string(&e) {
                let _ = hub.send(Utf8Bytes::from(json));
            }
            std::future::ready(())
        })
        .name("siem_events")
        .spawn();

    let rate = Rate::per_second(cfg.alert_rate).burst(cfg.alert_rate.max(1));
    let alerts = Pipeline::from_channel(alert_rx)
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
                .jitter(),
        )
        // Open after 5 failures in a row: the lane pauses (holding its alerts, not
        // failing them) and probes the notifier every cooldown.
        .circuit_breaker(
            Breaker::consecutive_failures(5)
                .cooldown(Duration::from_millis(cfg.breaker_cooldown_ms)),
        )
        .results()
        .map(|r| match r {
            Ok((e, attempts)) => {
                metrics::counter!("siem_alerts_total", "outcome" => "sent").increment(1);
                AlertOutcome {
                    event_id: e.id,
                    status: "sent",
                    attempts,
                    error: None,
                }
            }
            Err(f) => {
                metrics::counter!("siem_alerts_total", "outcome" => "failed").increment(1);
                AlertOutcome {
                    event_id: f.input.id,
                    status: "failed",
                    attempts: f.attempts,
                    error: Some(f.error.to_string()),
                }
            }
        })
        .batch(64, Duration::from_millis(100))
        .try_map_async_with(
            "alert_outcome",
            (db, writes.clone()),
            |(db, writes), outcomes: Vec<AlertOutcome>| async move {
                writes
                    .run(&db, move |conn| store::record_alerts(conn, &outcomes))
                    .await
            },
        )
        .retry(Retry::exponential(Duration::from_millis(20)).max_attempts(8))
        .run()
        .name("siem_alerts")
        .spawn();
    Pipelines {
        events,
        alerts,
        writes,
    }
}
