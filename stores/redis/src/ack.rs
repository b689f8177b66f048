//! The acknowledger: acknowledges entries whose items finished (`XACK`, all that ended
//! since the last call in one command), and moves failed, poison and unreadable entries to
//! the dead-letter stream. The move is one script: the entry's fields, with its id, source
//! stream, delivery count and reason, are added to the dead-letter stream and the entry is
//! acknowledged, atomically; an entry no longer pending (a retried call after a lost reply)
//! is not moved twice, and neither is an entry another consumer took over meanwhile (its
//! new owner runs it: a takeover is not a failure).
//!
//! A failed call is tried again under the source's outage policy, for as long as the run
//! lasts: an acknowledgement is never dropped while Redis is down. Once the run has ended
//! it gives up after the source's `drain_timeout`, leaving the rest pending (run again
//! later, never lost).

use std::sync::Arc;

use redis::Value;
use tokio::time::Instant;

use crate::conn;
use crate::source::Shared;

const DEAD: &str = r"
local moved = 0
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    local out = {'flowline.id', id, 'flowline.stream', KEYS[1],
                 'flowline.deliveries', ARGV[i + 1], 'flowline.reason', ARGV[i + 2],
                 'flowline.consumer', ARGV[2]}
    local e = redis.call('XRANGE', KEYS[1], id, id)
    if e[1] then
      for _, v in ipairs(e[1][2]) do out[#out + 1] = v end
    end
    redis.call('XADD', KEYS[2], '*', unpack(out))
    redis.call('XACK', KEYS[1], ARGV[1], id)
    moved = moved + 1
  end
end
return moved
";

pub(crate) async fn run(sh: Arc<Shared>) {
    let script = redis::Script::new(DEAD);
    let mut conn = None;
    let mut watch = sh.opts.outage.watch(sh.server.clone());
    let mut ended_at: Option<Instant> = None;
    loop {
        let (acks, dead) = {
            let mut st = sh.lock();
            (
                std::mem::take(&mut st.to_ack),
                std::mem::take(&mut st.to_dead),
            )
        };
        if acks.is_empty() && dead.is_empty() {
            if sh.all_ended() {
                let idle = {
                    let st = sh.lock();
                    st.to_ack.is_empty() && st.to_dead.is_empty()
                };
                if idle {
                    return;
                }
                continue;
            }
            sh.ack_wake.notified().await;
            continue;
        }
        let (mut acks, mut dead) = (acks, dead);
        let result = flush(&sh, &script, &mut conn, &mut acks, &mut dead).await;
        match result {
            Ok(()) => {
                watch.succeeded();
            }
            Err(e) => {
                let transient = conn::is_transient(&e);
                if sh.all_ended() {
                    let at = *ended_at.get_or_insert_with(Instant::now);
                    if !transient || at.elapsed() > sh.opts.drain_timeout {
                        tracing::error!(stream = %sh.stream, error = %e, left = acks.len() + dead.len(),
                            "cannot acknowledge; the entries stay pending and run again");
                        return;
                    }
                }
                if transient {
                    tracing::warn!(stream = %sh.stream, error = %e, "acknowledging failed; retrying");
                } else {
                    tracing::error!(stream = %sh.stream, error = %e, "acknowledging failed");
                }
                {
                    let mut st = sh.lock();
                    st.to_ack.extend(acks);
                    st.to_dead.extend(dead);
                }
                // Past the outage policy's limit the reader, meeting the same server, ends
                // the run; until the source is gone the acknowledgements keep waiting.
                let wait = watch
                    .failed(conn::mark(e))
                    .unwrap_or_else(|_| sh.opts.outage.backoff_range().1);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Acknowledges `acks`, then moves `dead`; what succeeded is taken out of both, so a retry
/// sends only the rest (a wrong type at the dead-letter stream holds back only the entries
/// to be moved there).
async fn flush(
    sh: &Shared,
    script: &redis::Script,
    conn: &mut Option<redis::aio::ConnectionManager>,
    acks: &mut Vec<String>,
    dead: &mut Vec<(String, u64, &'static str)>,
) -> Result<(), redis::RedisError> {
    if conn.is_none() {
        *conn = Some(conn::connect(&sh.client, std::time::Duration::from_secs(10)).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Ok(());
    };
    while !acks.is_empty() {
        let n = acks.len().min(10_000);
        let _: Value = redis::cmd("XACK")
            .arg(&sh.stream)
            .arg(&sh.group)
            .arg(&acks[..n])
            .query_async(c)
            .await?;
        let mut st = sh.lock();
        for id in acks.drain(..n) {
            st.acked(id);
        }
    }
    while !dead.is_empty() {
        let n = dead.len().min(500);
        let mut call = script.prepare_invoke();
        call.key(&sh.stream)
            .key(&sh.dead)
            .arg(&sh.group)
            .arg(&sh.consumer);
        for (id, count, why) in &dead[..n] {
            call.arg(id).arg(*count).arg(*why);
        }
        let _: Value = call.invoke_async(c).await?;
        let mut st = sh.lock();
        for (id, ..) in dead.drain(..n) {
            st.acked(id);
        }
        drop(st);
        tracing::warn!(stream = %sh.stream, dead = %sh.dead, n, "entries moved to the dead letters");
    }
    Ok(())
}
