//! `Pipeline::from_iter`: items from any iterator, pulled a chunk at a time.

use std::task::{Context, Poll};

use super::{Pull, Pulled};
use crate::failure::ItemError;
use crate::plan::Pipeline;

pub(crate) struct IterPull<I>(pub(crate) I);

impl<I: Iterator + Send> Pull<I::Item> for IterPull<I> {
    fn poll_pull(
        &mut self,
        _cx: &mut Context<'_>,
        max: usize,
        out: &mut Vec<I::Item>,
    ) -> Poll<Result<Pulled, ItemError>> {
        // `extend` over `take` keeps std's fast paths (a trusted-length iterator such as a
        // range or a `Vec` fills the chunk in one reservation); fewer than `max` means the
        // iterator returned `None`.
        let before = out.len();
        out.extend(self.0.by_ref().take(max));
        Poll::Ready(Ok(if out.len() - before < max {
            Pulled::End
        } else {
            Pulled::More
        }))
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// A pipeline over the items of an iterator. The iterator is pulled lazily, a chunk at a
    /// time, only as fast as the pipeline has room. If the iterator knows its exact length,
    /// the pipeline knows its total (for progress and ETA).
    ///
    /// ```
    /// use flowline::prelude::*;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = Pipeline::from_iter(1..=3).map(|x| x * 10).collect().await.unwrap();
    /// assert_eq!(out, vec![10, 20, 30]);
    /// # }
    /// ```
    #[allow(clippy::should_implement_trait)]
    pub fn from_iter<I>(items: I) -> Pipeline<T>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
    {
        let iter = items.into_iter();
        let total = match iter.size_hint() {
            (lo, Some(hi)) if lo == hi => Some(lo as u64),
            _ => None,
        };
        let mut p = Pipeline::from_pull("source", IterPull(iter));
        p.settings.total = total;
        p
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;

    #[tokio::test]
    async fn pulls_every_item_once_in_order() {
        let out = Pipeline::from_iter(0..1000u32).collect().await.unwrap();
        assert_eq!(out, (0..1000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_panicking_iterator_fails_the_source_not_the_process() {
        let iter = (0..10u32).map(|x| if x == 5 { panic!("bad row") } else { x });
        let err = Pipeline::from_iter(iter).run().await.unwrap_err();
        match err {
            Error::Source { stage, error, .. } => {
                assert_eq!(stage, "source");
                assert_eq!(error.to_string(), "panicked: bad row");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
