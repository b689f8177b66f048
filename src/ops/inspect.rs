//! `inspect`: look at each item as it passes (logging, metrics), without changing it.

use crate::ops::fuse;
use crate::plan::Pipeline;
use crate::runtime::chunk::Emit;
use crate::runtime::fused::PerItem;

pub(crate) fn inspect<T, F>(p: Pipeline<T>, mut f: F) -> Pipeline<T>
where
    T: Send + 'static,
    F: FnMut(&T) + Send + 'static,
{
    fuse(
        p,
        "inspect",
        PerItem::<_, true>(move |item: T, out: &mut Emit<_>| {
            f(&item);
            out.push(item)
        }),
    )
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn sees_every_item_and_passes_it_on() {
        let sum = Arc::new(AtomicU64::new(0));
        let s = sum.clone();
        let out = Pipeline::from_iter(1..=10u64)
            .inspect(move |x| {
                s.fetch_add(*x, Ordering::Relaxed);
            })
            .collect()
            .await
            .unwrap();
        assert_eq!(out.len(), 10);
        assert_eq!(sum.load(Ordering::Relaxed), 55);
    }
}
