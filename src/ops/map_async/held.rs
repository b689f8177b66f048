//! Items an admission holds (a pausing breaker): their calls failed, and they wait for the
//! admission to say whether they are tried again or fail.

use std::collections::VecDeque;

use crate::failure::ItemError;
use crate::policy::Held;

use super::call::Meta;

/// The held items, with the errors they fail with if they are not tried again.
pub(super) struct HeldItems<T> {
    items: VecDeque<(T, Meta, ItemError)>,
}

impl<T> Default for HeldItems<T> {
    fn default() -> Self {
        HeldItems {
            items: VecDeque::new(),
        }
    }
}

impl<T> HeldItems<T> {
    pub(super) fn push(&mut self, item: T, meta: Meta, error: ItemError) {
        self.items.push_back((item, meta, error));
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Every held item, in the order its call failed.
    pub(super) fn take_all(&mut self) -> impl Iterator<Item = (T, Meta, ItemError)> + '_ {
        self.items.drain(..)
    }
}

/// The stage's decision on its held items from each admission's: any `Wait` keeps them, then
/// any `Undecided`, then any `Again` tries them again; they fail only if every one says so.
pub(super) fn decide(verdicts: impl IntoIterator<Item = Held>) -> Held {
    verdicts
        .into_iter()
        .fold(Held::Fail, |verdict, next| match (verdict, next) {
            (Held::Wait, _) | (_, Held::Wait) => Held::Wait,
            (Held::Undecided, _) | (_, Held::Undecided) => Held::Undecided,
            (Held::Again, _) | (_, Held::Again) => Held::Again,
            _ => Held::Fail,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::chunk::Ticket;

    #[test]
    fn the_most_cautious_verdict_wins() {
        use Held::*;
        assert_eq!(decide([]), Fail);
        assert_eq!(decide([Fail, Fail]), Fail);
        assert_eq!(decide([Fail, Again]), Again);
        assert_eq!(decide([Again, Undecided, Fail]), Undecided);
        assert_eq!(decide([Undecided, Wait, Again]), Wait);
        assert_eq!(decide([Wait, Fail]), Wait);
    }

    #[test]
    fn held_items_come_back_in_the_order_they_failed() {
        let mut h = HeldItems::default();
        for i in 0..3u32 {
            h.push(
                i,
                Meta::new(u64::from(i), Ticket::none()),
                ItemError::Timeout(std::time::Duration::from_secs(1)),
            );
        }
        assert_eq!(h.len(), 3);
        let order: Vec<u32> = h.take_all().map(|(i, ..)| i).collect();
        assert_eq!(order, vec![0, 1, 2]);
        assert!(h.is_empty());
    }
}
