//! `.heartbeat(every, f)`: a snapshot of every stage on a fixed schedule, whether or not
//! anything flows — paused, waiting on a slow source, or busy — so a supervisor can tell a
//! live pipeline from a dead one.

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::{Start, snapshot};
use crate::error::Error;
use crate::report::Report;
use crate::util::time::interval_from_now;

pub(crate) fn heartbeat(
    every: Duration,
    mut f: impl FnMut(&Report) + Send + 'static,
) -> Result<Start, Error> {
    super::require_positive("heartbeat", every)?;
    Ok(Box::new(move |run| {
        let started = Instant::now();
        Box::pin(async move {
            let mut ticks = interval_from_now(every);
            // A late tick (a busy runtime) is not made up for with a burst of beats.
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = run.ended().cancelled() => return,
                    _ = ticks.tick() => f(&snapshot(&*run, started)),
                }
            }
        })
    }))
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn beats_on_schedule_while_paused_and_stops_with_the_run() {
        let beats = Arc::new(Mutex::new(Vec::new()));
        let b = beats.clone();
        let t0 = Instant::now();
        let h = Pipeline::from_iter(0..10u32)
            .map_async("work", |x| async move { x })
            .heartbeat(Duration::from_secs(5), move |r| {
                b.lock().unwrap().push((t0.elapsed(), r.stages[0].received))
            })
            .spawn();
        h.pause();
        tokio::time::sleep(Duration::from_millis(16_000)).await;
        {
            let got = beats.lock().unwrap().clone();
            let at: Vec<_> = got.iter().map(|(d, _)| d.as_secs()).collect();
            assert_eq!(at, vec![5, 10, 15], "beats while nothing flows");
            assert!(got.iter().all(|(_, pulled)| *pulled == 0));
        }
        h.resume();
        let report = h.join().await.unwrap();
        assert_eq!(report.delivered(), 10);
        let n = beats.lock().unwrap().len();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            beats.lock().unwrap().len(),
            n,
            "no beat after the run ended"
        );
    }

    #[tokio::test]
    async fn zero_interval_is_a_config_error() {
        let err = Pipeline::from_iter(0..1)
            .heartbeat(Duration::ZERO, |_| {})
            .run()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("`heartbeat`: every = 0ns"),
            "{err}"
        );
    }
}
