//! The ages of an async stage's waiting calls, for the stall watchdog: kept only while a
//! watchdog asks for them (`RunCtx::watch_calls`), so that it sees one stuck call even while
//! the other workers keep completing.

use std::collections::BTreeSet;

use tokio::time::Instant;

/// Calls waiting in the in-flight set, oldest first, by (when it began waiting, item).
#[derive(Default)]
pub(super) struct CallAges {
    waiting: Option<BTreeSet<(Instant, u64)>>,
}

impl CallAges {
    /// Starts keeping ages (from the next call on); a no-op once on.
    pub(super) fn watch(&mut self) {
        if self.waiting.is_none() {
            self.waiting = Some(BTreeSet::new());
        }
    }

    pub(super) fn is_watched(&self) -> bool {
        self.waiting.is_some()
    }

    /// The call of item `seq` begins to wait: when, if ages are kept (the call keeps it, to
    /// be told in [`ended`](Self::ended)).
    pub(super) fn began(&mut self, seq: u64) -> Option<Instant> {
        let waiting = self.waiting.as_mut()?;
        let at = Instant::now();
        waiting.insert((at, seq));
        Some(at)
    }

    /// The call of item `seq` that began waiting at `at` has ended.
    pub(super) fn ended(&mut self, at: Instant, seq: u64) {
        if let Some(w) = self.waiting.as_mut() {
            w.remove(&(at, seq));
        }
    }

    /// When the oldest waiting call began (`None` inside: no call waits), if ages are kept.
    pub(super) fn oldest(&self) -> Option<Option<Instant>> {
        self.waiting.as_ref().map(|w| w.first().map(|&(at, _)| at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn nothing_is_kept_until_a_watchdog_asks() {
        let mut ages = CallAges::default();
        assert_eq!(ages.began(1), None);
        assert_eq!(ages.oldest(), None);
        ages.watch();
        assert!(ages.is_watched());
        assert_eq!(ages.oldest(), Some(None));
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_waiting_call_is_seen_while_younger_ones_come_and_go() {
        let mut ages = CallAges::default();
        ages.watch();
        let t0 = Instant::now();
        let stuck = ages.began(7).unwrap();
        for seq in 8..20 {
            tokio::time::advance(Duration::from_millis(10)).await;
            let at = ages.began(seq).unwrap();
            ages.ended(at, seq);
            assert_eq!(ages.oldest(), Some(Some(t0)));
        }
        // Two calls that began at the same instant are told apart by their item.
        let twin = ages.began(30).unwrap();
        let twin2 = ages.began(31).unwrap();
        assert_eq!(twin, twin2);
        ages.ended(stuck, 7);
        assert_eq!(ages.oldest(), Some(Some(twin)));
        ages.ended(twin, 30);
        assert_eq!(ages.oldest(), Some(Some(twin2)));
        ages.ended(twin2, 31);
        assert_eq!(ages.oldest(), Some(None));
    }
}
