//! `scan(init, f)`: state threaded through the items, like `StreamExt::scan`. Written only
//! with the public operator API ([`Operator`], [`Out`], [`Step`]): what a user can write too.

use std::marker::PhantomData;

use crate::{BoxError, Operator, Out, Step};

/// The operator behind [`Flow::scan`](crate::Flow::scan).
pub(crate) struct Scan<S, F, U> {
    state: S,
    f: F,
    out: PhantomData<fn() -> U>,
}

impl<S, F, U> Scan<S, F, U> {
    pub(crate) fn new(init: S, f: F) -> Self {
        Scan {
            state: init,
            f,
            out: PhantomData,
        }
    }
}

impl<T, S, F, U> Operator<T> for Scan<S, F, U>
where
    S: Send + 'static,
    U: Send + 'static,
    F: FnMut(&mut S, T) -> Option<U> + Send + 'static,
{
    type Output = U;

    fn push(&mut self, item: T, out: &mut Out<'_, U>) -> Result<Step, BoxError> {
        Ok(match (self.f)(&mut self.state, item) {
            Some(u) => {
                out.push(u);
                Step::Continue
            }
            // As in `StreamExt::scan` and `Iterator::scan`: `None` ends the stream.
            None => Step::Done,
        })
    }

    fn name(&self) -> &'static str {
        "scan"
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn running_totals_in_order() {
        let (out, report) = Pipeline::from_iter(1..=5u64)
            .scan(0u64, |sum, x| {
                *sum += x;
                Some(*sum)
            })
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![1, 3, 6, 10, 15]);
        let s = report.stage("scan").unwrap();
        assert_eq!((s.received, s.passed, s.dropped), (5, 5, 0));
    }

    #[tokio::test]
    async fn none_ends_the_stream_and_the_rest_is_dropped() {
        let pulls = Arc::new(AtomicU64::new(0));
        let p = pulls.clone();
        let (out, report) = Pipeline::from_fn(move || {
            let n = p.fetch_add(1, Ordering::Relaxed);
            async move { Some(n) }
        })
        .scan(0u64, |sum, x| {
            *sum += x;
            (*sum < 10).then_some(*sum)
        })
        .collect_with_report()
        .await
        .unwrap();
        // 0, 1, 3, 6, then 10: ends (the item that ended it is dropped too)
        assert_eq!(out, vec![0, 1, 3, 6]);
        let s = report.stage("scan").unwrap();
        assert_eq!((s.passed, s.dropped, s.failed), (4, s.received - 4, 0));
        assert!(report.is_balanced());
        assert!(
            pulls.load(Ordering::Relaxed) <= 2 * 512,
            "the endless source stopped"
        );
    }

    #[tokio::test]
    async fn a_panic_fails_one_item_and_the_state_goes_on() {
        let (out, report) = Pipeline::from_iter(1..=4u32)
            .scan(0u32, |sum, x| {
                if x == 2 {
                    panic!("two");
                }
                *sum += x;
                Some(*sum)
            })
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![1, 4, 8]);
        let s = report.stage("scan").unwrap();
        assert_eq!((s.passed, s.dropped, s.failed), (3, 0, 1));
        assert_eq!(report.failure_sample[0].error.to_string(), "panicked: two");
    }
}
