//! The lease keeper: every fifth of `min_idle`, the entries this consumer holds (handed to
//! the pipeline and not ended) are claimed again to this consumer (`XCLAIM ... JUSTID`,
//! which resets their idle time without counting a delivery), so that a long call is not
//! taken over by another consumer while its owner lives. One script per batch checks the
//! owner first: an entry another consumer took over meanwhile (this one was cut off past
//! `min_idle`) is left to it, not stolen back.
//!
//! A renewal that fails is tried again under the source's outage policy, not a period
//! later. The keeper measures its margin: the longest time between two renewals of the
//! entries held, against `min_idle`; past half of it (a process starved of CPU, a slow
//! server) it warns, since past all of it a live owner's entries can be taken over.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

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

/// A fifth of `min_idle`: four renewals may fail or come late before an entry can be taken.
pub(crate) fn every(min_idle: Duration) -> Duration {
    min_idle / 5
}

pub(crate) async fn run(sh: Arc<Shared>) {
    let script = redis::Script::new(KEEP);
    let every = every(sh.opts.min_idle);
    let go_on = || !sh.all_ended();
    let conn = match sh.connect(every.max(Duration::from_secs(1)), go_on).await {
        Ok(c) => c,
        Err(e) => {
            // The reader meets the same and ends the run with it.
            tracing::warn!(stream = %sh.stream, error = %e, "lease keeper cannot connect");
            return;
        }
    };
    let mut last = Instant::now();
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
            last = Instant::now();
            continue;
        }
        let mut ok = true;
        for chunk in ids.chunks(1000) {
            let renewed = sh
                .retry(&conn, "lease renewal", go_on, |mut c| {
                    let mut call = script.prepare_invoke();
                    call.key(&sh.stream).arg(&sh.group).arg(&sh.consumer);
                    for id in chunk {
                        call.arg(id);
                    }
                    async move { call.invoke_async::<Vec<String>>(&mut c).await }
                })
                .await;
            match renewed {
                Ok(lost) => {
                    let held = sh.lock();
                    let lost = lost.iter().filter(|id| held.held.contains_key(*id)).count();
                    if lost > 0 {
                        tracing::warn!(stream = %sh.stream, consumer = %sh.consumer, n = lost, "entries in flight were taken over by another consumer");
                    }
                }
                Err(e) => {
                    tracing::warn!(stream = %sh.stream, error = %e, "lease renewal failed");
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            let gap = last.elapsed();
            last = Instant::now();
            let mut longest = sh.lease_gap.lock().unwrap_or_else(|p| p.into_inner());
            if gap > *longest {
                *longest = gap;
                if gap > sh.opts.min_idle / 2 {
                    tracing::warn!(stream = %sh.stream, consumer = %sh.consumer, gap = ?gap, min_idle = ?sh.opts.min_idle,
                        "leases renewed late: past min_idle a live consumer's entries are taken over");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn leases_are_renewed_five_times_per_min_idle() {
        use std::time::Duration;
        assert_eq!(
            super::every(Duration::from_secs(2)),
            Duration::from_millis(400)
        );
    }
}
