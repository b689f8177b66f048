//! The lease keeper: every third of `min_idle`, the entries this consumer holds (handed to
//! the pipeline and not ended) are claimed again to this consumer (`XCLAIM ... JUSTID`,
//! which resets their idle time without counting a delivery), so that a long call is not
//! taken over by another consumer while its owner lives. One script per batch checks the
//! owner first: an entry another consumer took over meanwhile (this one was cut off past
//! `min_idle`) is left to it, not stolen back.

use std::sync::Arc;
use std::time::Duration;

use crate::conn;
use crate::source::Shared;

const KEEP: &str = r"
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
";

/// A third of `min_idle`: two renewals may fail before an entry can be taken.
pub(crate) fn every(min_idle: Duration) -> Duration {
    min_idle / 3
}

pub(crate) async fn run(sh: Arc<Shared>) {
    let script = redis::Script::new(KEEP);
    let mut conn = None;
    let every = every(sh.opts.min_idle);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = sh.lease_wake.notified() => {}
        }
        if sh.all_ended() {
            return;
        }
        let ids: Vec<String> = sh.lock().held.keys().cloned().collect();
        if ids.is_empty() {
            continue;
        }
        if conn.is_none() {
            match conn::connect(&sh.client, every.max(Duration::from_secs(1))).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::warn!(stream = %sh.stream, error = %e, "lease keeper cannot connect");
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        for chunk in ids.chunks(1000) {
            let mut call = script.prepare_invoke();
            call.key(&sh.stream).arg(&sh.group).arg(&sh.consumer);
            for id in chunk {
                call.arg(id);
            }
            match call.invoke_async::<Vec<String>>(c).await {
                Ok(lost) => {
                    let held = sh.lock();
                    let lost: Vec<&String> = lost
                        .iter()
                        .filter(|id| held.held.contains_key(*id))
                        .collect();
                    if !lost.is_empty() {
                        tracing::warn!(stream = %sh.stream, consumer = %sh.consumer, n = lost.len(), "entries in flight were taken over by another consumer");
                    }
                }
                Err(e) => {
                    tracing::warn!(stream = %sh.stream, error = %e, "lease renewal failed");
                    break;
                }
            }
        }
    }
}
