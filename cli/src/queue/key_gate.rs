//! Per-key order through a queue (`key(..)` / `--key` on the pipe's first task): the
//! feeder hands out an input only while no earlier input of its key is fed and not ended,
//! so the inputs of one key run one at a time, in input order, whichever worker takes
//! them. An input whose key is busy is held by the feeder (at most [`MAX_HELD`], then the
//! source is read no further) and fed when the key's input in flight ends; inputs of other
//! keys are fed meanwhile.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::{Notify, mpsc};

use crate::key::{Key, KeySpec};
use crate::spec::{Plan, Step};

/// An input: its position and its arguments.
pub type Input = (u64, Vec<Vec<u8>>);

/// The most inputs held for a busy key, over all keys: half the feeder's window, so that
/// the window, full, always has inputs in flight whose ends make room.
pub const MAX_HELD: usize = super::feeder::WINDOW as usize / 2;

/// The feeder's record of the keys in flight and the inputs held behind them.
pub struct KeyGate {
    key: Key,
    state: Mutex<State>,
    /// Room for another held input.
    room: Notify,
    /// Inputs released when their key's input ended, to be fed.
    released: mpsc::UnboundedSender<Input>,
}

#[derive(Default)]
struct State {
    /// The key of each input fed and not ended.
    of: HashMap<u64, Vec<u8>>,
    /// The keys of those inputs.
    busy: std::collections::HashSet<Vec<u8>>,
    /// Per key in flight: the inputs held behind it, in input order.
    held: HashMap<Vec<u8>, VecDeque<Input>>,
    held_count: usize,
    /// Inputs held in all (this feeder's).
    waits: u64,
    /// A resumed run: the inputs up to this one were fed by an earlier feeder.
    fed_before: u64,
    /// Those of them whose end came before the source reached them (results wait in Redis
    /// from the start): they keep no key busy.
    ended_early: std::collections::HashSet<u64>,
}

impl KeyGate {
    /// The gate of a plan whose first task is keyed, with the receiver of the inputs it
    /// releases; `None` without a key.
    pub fn of(plan: &Plan) -> Option<(KeyGate, mpsc::UnboundedReceiver<Input>)> {
        let Some(Step::Task(t)) = plan.main.steps.first() else {
            return None;
        };
        let spec: &KeySpec = t.policies.key.as_ref()?;
        let (released, rx) = mpsc::unbounded_channel();
        let gate = KeyGate {
            key: spec.key(),
            state: Mutex::new(State::default()),
            room: Notify::new(),
            released,
        };
        Some((gate, rx))
    }

    fn key_of(&self, input: &Input) -> Vec<u8> {
        self.key.of(input.0, &input.1)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A resumed run: an earlier feeder fed the inputs up to `fed_before`. To be told
    /// before any input ends.
    pub fn resuming(&self, fed_before: u64) {
        self.state().fed_before = fed_before;
    }

    /// An input fed by an earlier feeder of the run and not ended when this one started:
    /// its key is in flight, unless its end has come meanwhile.
    pub fn in_flight(&self, input: &Input) {
        let key = self.key_of(input);
        let mut s = self.state();
        if s.ended_early.remove(&input.0) {
            return;
        }
        s.busy.insert(key.clone());
        s.of.insert(input.0, key);
    }

    /// An input from the source: `Some` to feed now (its key is free, and now in flight),
    /// `None` when it is held behind its key. Waits while [`MAX_HELD`] are held.
    pub async fn admit(&self, input: Input) -> Option<Input> {
        let key = self.key_of(&input);
        loop {
            let room = self.room.notified();
            {
                let mut guard = self.state();
                let s = &mut *guard;
                if let Some(q) = s.held.get_mut(&key) {
                    if s.held_count < MAX_HELD {
                        q.push_back(input);
                        s.held_count += 1;
                        s.waits += 1;
                        return None;
                    }
                } else if !s.busy.contains(&key) {
                    s.busy.insert(key.clone());
                    s.of.insert(input.0, key);
                    return Some(input);
                } else if s.held_count < MAX_HELD {
                    s.held.insert(key, VecDeque::from([input]));
                    s.held_count += 1;
                    s.waits += 1;
                    return None;
                }
            }
            room.await;
        }
    }

    /// Input `seq` has ended: the next input held behind its key is released (sent to be
    /// fed, and in flight).
    pub fn ended(&self, seq: u64) {
        let mut s = self.state();
        let Some(key) = s.of.remove(&seq) else {
            if seq <= s.fed_before {
                s.ended_early.insert(seq);
            }
            return;
        };
        let Some(q) = s.held.get_mut(&key) else {
            s.busy.remove(&key);
            return;
        };
        let next = q.pop_front();
        if q.is_empty() {
            s.held.remove(&key);
        }
        if let Some(input) = next {
            s.held_count -= 1;
            s.of.insert(input.0, key);
            // Sent under the lock: `drained` sees it counted or in the channel.
            let _ = self.released.send(input);
            self.room.notify_waiters();
        }
    }

    /// How many inputs this feeder held for their key.
    pub fn waits(&self) -> u64 {
        self.state().waits
    }

    /// Whether no input is held (those released are in the channel by then).
    pub fn drained(&self) -> bool {
        self.state().held_count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn gate(pipe: &str) -> (KeyGate, mpsc::UnboundedReceiver<Input>) {
        let plan = crate::spec::plan(
            &crate::parse::parse(pipe).unwrap(),
            crate::spec::Source::Lines(None),
        )
        .unwrap();
        KeyGate::of(&plan).expect("a keyed first task")
    }

    fn input(seq: u64, key: &str) -> Input {
        (seq, vec![key.as_bytes().to_vec(), b"x".to_vec()])
    }

    #[tokio::test]
    async fn a_keys_inputs_go_one_at_a_time_in_order_and_other_keys_go_by() {
        let (g, mut rx) = gate("key({1}) | sh(x)");
        assert_eq!(g.admit(input(1, "a")).await.map(|i| i.0), Some(1));
        assert_eq!(g.admit(input(2, "b")).await.map(|i| i.0), Some(2));
        assert!(g.admit(input(3, "a")).await.is_none());
        assert!(g.admit(input(4, "a")).await.is_none());
        assert_eq!(g.admit(input(5, "c")).await.map(|i| i.0), Some(5));
        g.ended(2);
        g.ended(5);
        assert!(rx.try_recv().is_err(), "b and c hold nothing");
        assert!(!g.drained());
        g.ended(1);
        assert_eq!(rx.try_recv().map(|i| i.0), Ok(3));
        assert!(g.admit(input(6, "a")).await.is_none(), "behind 4");
        g.ended(3);
        assert_eq!(rx.try_recv().map(|i| i.0), Ok(4));
        g.ended(4);
        assert_eq!(rx.try_recv().map(|i| i.0), Ok(6));
        g.ended(6);
        assert!(g.drained() && rx.try_recv().is_err());
        assert_eq!(g.waits(), 3);
        assert_eq!(g.admit(input(7, "a")).await.map(|i| i.0), Some(7));
        // Ends of inputs the gate never saw change nothing.
        g.ended(0);
        g.ended(u64::MAX);
        assert!(g.admit(input(8, "a")).await.is_none());
    }

    #[tokio::test]
    async fn an_input_in_flight_before_a_resume_keeps_its_key_busy() {
        let (g, mut rx) = gate("key({1}) | sh(x)");
        g.resuming(4);
        g.in_flight(&input(3, "a"));
        assert!(g.admit(input(5, "a")).await.is_none());
        g.ended(3);
        assert_eq!(rx.try_recv().map(|i| i.0), Ok(5));
    }

    /// A resumed run reads the results waiting in Redis at once: an input's end may come
    /// before the source reaches the input. It then keeps its key busy for nothing.
    #[tokio::test]
    async fn an_input_that_ended_before_the_source_reached_it_keeps_no_key_busy() {
        let (g, _rx) = gate("key({1}) | sh(x)");
        g.resuming(4);
        g.ended(2);
        g.in_flight(&input(2, "a"));
        assert_eq!(g.admit(input(3, "a")).await.map(|i| i.0), Some(3));
        // Past what was fed before, an unknown end is nobody's: nothing is kept.
        g.ended(9);
        assert!(g.state().ended_early.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_source_waits_while_the_most_inputs_are_held() {
        let (g, mut rx) = gate("key(same) | sh(x)");
        assert!(g.admit(input(1, "a")).await.is_some());
        for seq in 2..(2 + MAX_HELD as u64) {
            assert!(g.admit(input(seq, "a")).await.is_none());
        }
        let g = Arc::new(g);
        let next = (2 + MAX_HELD) as u64;
        let waiting = tokio::spawn({
            let g = g.clone();
            async move { g.admit(input(next, "a")).await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished(), "held past the bound");
        g.ended(1);
        assert_eq!(rx.try_recv().map(|i| i.0), Ok(2));
        let admitted = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert!(matches!(admitted, Ok(Ok(None))), "held once there is room");
    }

    #[test]
    fn a_plan_without_a_key_on_its_first_task_has_no_gate() {
        for pipe in [
            "sh(x)",
            "sh(x) | key({1}) | sh(y)",
            "filter(a) | key({1}) | sh(x)",
        ] {
            let plan = crate::spec::plan(
                &crate::parse::parse(pipe).unwrap(),
                crate::spec::Source::Lines(None),
            )
            .unwrap();
            assert!(KeyGate::of(&plan).is_none(), "{pipe}");
        }
    }
}
