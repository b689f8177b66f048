//! The reclaimer: takes over entries that other consumers left idle longer than `min_idle`
//! (`XAUTOCLAIM`) and runs them here. A live consumer renews its entries' leases well before
//! `min_idle` (`lease.rs`), so what is idle that long belongs to a consumer that died or was
//! cut off. An entry taken over too often is a poison message: it goes to the dead letters
//! with its delivery count instead of running again. Consumers are never deleted, so no
//! pending entry is lost with its consumer.
//!
//! **A pause of everything is not a death.** Idle times are counted on the server's clock,
//! which runs on while the server is frozen (`SIGSTOP`), restarting, or unreachable: after
//! such a pause every entry looks idle, the live consumers' too, and the first scan would
//! take them before their owners could renew. So each scan is one script that first notes
//! the server time of the last scan of any consumer (`<stream>:flowline.reclaim`, a hash
//! with the stream's hash tag); when no consumer scanned for longer than half `min_idle`
//! (scans are a quarter of it apart), nobody claims for one `min_idle`, the time every live
//! owner needs to renew its leases. A consumer that really died is reclaimed after that
//! wait.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use crate::entry;
use crate::source::Shared;

/// `KEYS`: the stream, its scan record. `ARGV`: group, consumer, `min_idle` ms, start id,
/// count, the longest gap between scans (ms) that is not a pause, rounds. Returns
/// `XAUTOCLAIM`'s reply, or `{'quiet', ms}` while claims wait out a pause. Up to `rounds`
/// `XAUTOCLAIM`s run until one claims something: claiming one entry at a time (suspects
/// that run alone) then scans as far per call as a claim of `rounds` entries would.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local min_idle, gap = tonumber(ARGV[3]), tonumber(ARGV[6])
local seen = redis.call('HMGET', KEYS[2], 'last', 'quiet_until')
local last, quiet = tonumber(seen[1]), tonumber(seen[2])
redis.call('HSET', KEYS[2], 'last', now)
if not last or now - last > gap then
  quiet = now + min_idle
  redis.call('HSET', KEYS[2], 'quiet_until', quiet)
end
redis.call('PEXPIRE', KEYS[2], min_idle + gap)
if quiet and now < quiet then return {'quiet', quiet - now} end
local cursor, r = ARGV[4], nil
for _ = 1, tonumber(ARGV[7]) do
  r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', ARGV[5])
  if #r[2] > 0 or r[1] == '0-0' then return r end
  cursor = r[1]
end
return r
";

/// The longest gap between two scans of any consumer that is not a pause of everything:
/// half `min_idle` (scans are a quarter of it apart), and at least two scan intervals. A
/// pause that takes a live owner's entries is longer than four fifths of `min_idle` (their
/// leases are renewed every fifth), so it is always seen as one.
pub(crate) fn pause_gap(min_idle: Duration) -> Duration {
    (min_idle / 2).max(interval(min_idle) * 2)
}

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
    let conn = tokio::select! {
        c = sh.connect(Duration::from_secs(10), go_on) => match c {
            Ok(c) => c,
            Err(e) => {
                // The reader meets the same and ends the run with it.
                tracing::error!(stream = %sh.stream, error = %e, "reclaimer cannot connect");
                return;
            }
        },
        _ = sh.stop_feeding.notified() => return,
    };
    let script = redis::Script::new(CLAIM);
    let record = format!("{}:flowline.reclaim", sh.stream);
    let every = interval(sh.opts.min_idle);
    let min_idle_ms = sh.opts.min_idle.as_millis().to_string();
    let gap_ms = pause_gap(sh.opts.min_idle).as_millis().to_string();
    // Every entry claimed is a suspect (delivered before). Run alone, they are claimed one
    // at a time, once no other suspect runs: a claimed entry waiting for its turn would
    // have its delivery counted again by a death it took no part in.
    let (count, rounds) = if sh.opts.isolate_suspects {
        (1, sh.opts.batch)
    } else {
        (sh.opts.batch, 1)
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = sh.stop_feeding.notified() => return,
        }
        let mut start = "0-0".to_string();
        loop {
            tokio::select! {
                free = sh.until_open(&tx) => if !free { return },
                _ = sh.stop_feeding.notified() => return,
            }
            let _read = sh.pending_read();
            let call = sh.retry(&conn, "XAUTOCLAIM", go_on, |mut c| {
                let mut call = script.prepare_invoke();
                call.key(&sh.stream)
                    .key(&record)
                    .arg(&sh.group)
                    .arg(&sh.consumer)
                    .arg(&min_idle_ms)
                    .arg(&start)
                    .arg(count)
                    .arg(&gap_ms)
                    .arg(rounds);
                async move { call.invoke_async::<Value>(&mut c).await }
            });
            let v = tokio::select! {
                v = call => v,
                _ = sh.stop_feeding.notified() => return,
            };
            let v = match v {
                Ok(v) => v,
                Err(e) => {
                    // The reader meets the same error and ends the run with it.
                    tracing::error!(stream = %sh.stream, error = %e, "XAUTOCLAIM failed");
                    break;
                }
            };
            let mut parts = entry::items(v).unwrap_or_default().into_iter();
            let next = parts.next().as_ref().and_then(entry::text);
            if next.as_deref() == Some("quiet") {
                tracing::debug!(stream = %sh.stream, "every consumer paused: claims wait for their owners to renew");
                break;
            }
            let reads = match parts.next().map(entry::parse_entries) {
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

    #[test]
    fn a_pause_is_longer_than_half_min_idle_and_two_scans_and_shorter_than_a_takeover() {
        assert_eq!(pause_gap(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(
            pause_gap(Duration::from_millis(30)),
            Duration::from_millis(20)
        );
        assert_eq!(pause_gap(Duration::from_secs(60)), Duration::from_secs(30));
        for ms in [30, 100, 2000, 10_000, 3_600_000] {
            let min_idle = Duration::from_millis(ms);
            assert!(pause_gap(min_idle) < min_idle * 4 / 5, "{ms}");
        }
    }
}
