//! The reclaimer: takes over entries that other consumers left idle longer than `min_idle`
//! (`XAUTOCLAIM`) and runs them here. A live consumer renews its entries' leases well before
//! `min_idle` (`lease.rs`), so what is idle that long belongs to a consumer that died or was
//! cut off. An entry taken over too often is a poison message: it goes to the dead letters
//! with its delivery count instead of running again. Consumers are never deleted, so no
//! pending entry is lost with its consumer.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use crate::conn::{self, Backoff};
use crate::entry;
use crate::source::Shared;

type Feed = tokio::sync::mpsc::Sender<
    Result<(crate::StreamEntry, flowline::Completion), flowline::BoxError>,
>;

/// How often the pending entries are scanned: a quarter of `min_idle`, between 10 ms and
/// 1 s, so a dead consumer's entries run again within `min_idle` plus at most a second.
pub(crate) fn interval(min_idle: Duration) -> Duration {
    (min_idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

pub(crate) async fn run(sh: Arc<Shared>, tx: Feed) {
    if !sh.opts.reclaim {
        return;
    }
    let go_on = || !tx.is_closed();
    let mut backoff = Backoff::new();
    let conn = loop {
        tokio::select! {
            c = conn::connect(&sh.client, Duration::from_secs(10)) => match c {
                Ok(c) => break c,
                Err(e) if conn::is_transient(&e) && go_on() => backoff.wait().await,
                Err(e) => {
                    tracing::error!(stream = %sh.stream, error = %e, "reclaimer cannot connect");
                    return;
                }
            },
            _ = sh.stop_feeding.notified() => return,
        }
    };
    let every = interval(sh.opts.min_idle);
    let min_idle_ms = sh.opts.min_idle.as_millis().to_string();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = sh.stop_feeding.notified() => return,
        }
        let mut start = "0-0".to_string();
        loop {
            let call = sh.retry(&conn, "XAUTOCLAIM", go_on, |mut c| {
                let (start, min_idle_ms) = (start.clone(), min_idle_ms.clone());
                let sh = &sh;
                async move {
                    redis::cmd("XAUTOCLAIM")
                        .arg(&sh.stream)
                        .arg(&sh.group)
                        .arg(&sh.consumer)
                        .arg(min_idle_ms)
                        .arg(start)
                        .arg("COUNT")
                        .arg(sh.opts.batch)
                        .query_async::<Value>(&mut c)
                        .await
                }
            });
            let v = tokio::select! {
                v = call => v,
                _ = sh.stop_feeding.notified() => return,
            };
            let v = match v {
                Ok(v) => v,
                Err(e) => {
                    // The reader meets the same error and fails the run with it.
                    tracing::error!(stream = %sh.stream, error = %e, "XAUTOCLAIM failed");
                    break;
                }
            };
            let mut parts = entry::items(v).unwrap_or_default().into_iter();
            let next = parts.next().as_ref().and_then(entry::text);
            let reads = match parts.next().map(entry::entries) {
                Some(Ok(r)) => r,
                _ => {
                    tracing::error!(stream = %sh.stream, "XAUTOCLAIM: a reply that does not parse");
                    break;
                }
            };
            if let (Some(first), Some(last)) = (reads.first(), reads.last()) {
                let (first, last) = (first.id().to_string(), last.id().to_string());
                tracing::info!(stream = %sh.stream, consumer = %sh.consumer, n = reads.len(), "reclaimed idle entries");
                let counts = match sh.counts(&conn, &first, &last, reads.len(), go_on).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(stream = %sh.stream, error = %e, "XPENDING failed");
                        break;
                    }
                };
                if sh.hand_out(reads, &counts, &tx).await.is_err() {
                    return;
                }
            }
            match next {
                Some(n) if n != "0-0" => start = n,
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_interval_stays_within_its_bounds() {
        assert_eq!(
            interval(Duration::from_millis(30)),
            Duration::from_millis(10)
        );
        assert_eq!(interval(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(interval(Duration::from_secs(3600)), Duration::from_secs(1));
    }
}
