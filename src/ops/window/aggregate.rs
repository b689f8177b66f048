//! What a window computes from its items: [`Aggregate`], and the ready-made ones behind
//! [`Windows::count`](crate::Windows::count), [`reduce`](crate::Windows::reduce),
//! [`fold`](crate::Windows::fold) and [`collect_items`](crate::Windows::collect_items).
//!
//! Sliding windows are built from panes (the stretches of time between two window starts):
//! each item is added to one pane only, and a window's value is its panes merged, so an item
//! costs one `add` whatever the number of windows it is in. Sessions merge too, when an item
//! bridges two of them. That is why an aggregation says how to [`merge`](Aggregate::merge);
//! one that cannot (a [`Fold`] without [`Fold::merge`]) is accepted by tumbling and count
//! windows only, and rejected by the others as a configuration error before the run.

use std::marker::PhantomData;

/// An aggregation over the items of a window: an accumulator made by
/// [`init`](Aggregate::init), items added one by one, accumulators merged, and the window's
/// value made from the final accumulator by [`finish`](Aggregate::finish).
///
/// ```
/// use flowline::prelude::*;
/// use flowline::{Aggregate, Tumbling};
/// use std::collections::HashSet;
/// use std::time::Duration;
///
/// /// How many distinct accounts a source address tried (a SIEM's "one source, many accounts").
/// struct DistinctAccounts;
///
/// impl Aggregate<(&'static str, &'static str)> for DistinctAccounts {
///     type Acc = HashSet<&'static str>;
///     type Output = usize;
///     fn init(&mut self) -> Self::Acc { HashSet::new() }
///     fn add(&mut self, acc: &mut Self::Acc, (_, account): (&'static str, &'static str)) {
///         acc.insert(account);
///     }
///     fn merge(&mut self, into: &mut Self::Acc, other: &Self::Acc) -> bool {
///         into.extend(other.iter().copied());
///         true
///     }
///     fn finish(&mut self, acc: Self::Acc) -> usize { acc.len() }
/// }
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let logins = [("10.0.0.1", "ann"), ("10.0.0.1", "bob"), ("10.0.0.2", "ann"), ("10.0.0.1", "ann")];
/// let out = Pipeline::from_iter(logins)
///     .window(Tumbling::every(Duration::from_secs(60)))
///         .key_by(|(source, _)| *source)
///     .aggregate(DistinctAccounts)
///     .collect().await.unwrap();
/// let per_source: Vec<(&str, usize)> = out.iter().map(|w| (w.key, w.value)).collect();
/// assert_eq!(per_source.len(), 2);
/// assert!(per_source.contains(&("10.0.0.1", 2)));
/// # }
/// ```
pub trait Aggregate<T>: Send + 'static {
    /// What is kept per open window (per pane, for sliding windows).
    type Acc: Send + 'static;
    /// The window's value.
    type Output: Send + 'static;

    /// A new, empty accumulator.
    fn init(&mut self) -> Self::Acc;

    /// Adds one item.
    fn add(&mut self, acc: &mut Self::Acc, item: T);

    /// Merges `other` into `into`, as if `into` had also been given `other`'s items; returns
    /// false if this aggregation cannot merge (the default), which only tumbling and count
    /// windows accept. Whether it can is asked once, when the run starts, by merging two
    /// fresh accumulators: the answer must not depend on their contents.
    fn merge(&mut self, into: &mut Self::Acc, other: &Self::Acc) -> bool {
        let _ = (into, other);
        false
    }

    /// The window's value from its accumulator.
    fn finish(&mut self, acc: Self::Acc) -> Self::Output;
}

/// Counts the items (behind [`Windows::count`](crate::Windows::count)).
///
/// ```
/// use flowline::{Aggregate, CountItems};
/// let mut c = CountItems;
/// let mut acc = <CountItems as Aggregate<&str>>::init(&mut c);
/// c.add(&mut acc, "a");
/// assert_eq!(<CountItems as Aggregate<&str>>::finish(&mut c, acc), 1);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct CountItems;

impl<T> Aggregate<T> for CountItems {
    type Acc = u64;
    type Output = u64;
    #[inline]
    fn init(&mut self) -> u64 {
        0
    }
    #[inline]
    fn add(&mut self, acc: &mut u64, _: T) {
        *acc += 1;
    }
    #[inline]
    fn merge(&mut self, into: &mut u64, other: &u64) -> bool {
        *into += *other;
        true
    }
    #[inline]
    fn finish(&mut self, acc: u64) -> u64 {
        acc
    }
}

/// Combines the items pairwise with `f` (behind [`Windows::reduce`](crate::Windows::reduce));
/// `f` also merges panes and sessions, so it should be associative.
///
/// ```
/// use flowline::{Aggregate, Reduce};
/// let mut max = Reduce::new(|a: u32, b: u32| a.max(b));
/// let mut acc = max.init();
/// max.add(&mut acc, 3);
/// max.add(&mut acc, 7);
/// assert_eq!(max.finish(acc), Some(7));
/// ```
pub struct Reduce<T, F> {
    f: F,
    _t: PhantomData<fn(T) -> T>,
}

impl<T, F> Reduce<T, F> {
    /// The reduction by `f`.
    ///
    /// ```
    /// let sum = flowline::Reduce::<u64, _>::new(|a: u64, b: u64| a + b);
    /// # let _ = sum;
    /// ```
    pub fn new(f: F) -> Self {
        Reduce { f, _t: PhantomData }
    }
}

impl<T, F> Aggregate<T> for Reduce<T, F>
where
    T: Clone + Send + 'static,
    F: FnMut(T, T) -> T + Send + 'static,
{
    type Acc = Option<T>;
    /// `None` only for a window no item reached, which is never emitted.
    type Output = Option<T>;
    fn init(&mut self) -> Option<T> {
        None
    }
    fn add(&mut self, acc: &mut Option<T>, item: T) {
        *acc = Some(match acc.take() {
            Some(a) => (self.f)(a, item),
            None => item,
        });
    }
    fn merge(&mut self, into: &mut Option<T>, other: &Option<T>) -> bool {
        if let Some(o) = other {
            self.add(into, o.clone());
        }
        true
    }
    fn finish(&mut self, acc: Option<T>) -> Option<T> {
        acc
    }
}

/// Folds the items into a state that starts as a clone of `init` (behind
/// [`Windows::fold`](crate::Windows::fold)). Sliding and session windows also need
/// [`merge`](Fold::merge); without it they reject the fold when the plan is checked.
///
/// ```
/// use flowline::{Aggregate, Fold};
/// let mut sum = Fold::new(0u64, |s: &mut u64, x: u64| *s += x).merge(|a, b| *a += *b);
/// let mut acc = sum.init();
/// sum.add(&mut acc, 2);
/// sum.add(&mut acc, 3);
/// assert_eq!(sum.finish(acc), 5);
/// ```
pub struct Fold<A, F, M = fn(&mut A, &A)> {
    init: A,
    add: F,
    merge: Option<M>,
}

impl<A, F> Fold<A, F> {
    /// A fold: each window starts from a clone of `init`; `add` adds an item.
    ///
    /// ```
    /// let longest = flowline::Fold::new(0usize, |n: &mut usize, s: String| *n = (*n).max(s.len()));
    /// # let _ = longest;
    /// ```
    pub fn new(init: A, add: F) -> Self {
        Fold {
            init,
            add,
            merge: None,
        }
    }

    /// How to merge one state into another (needed by sliding and session windows).
    ///
    /// ```
    /// let f = flowline::Fold::new(0u64, |s: &mut u64, x: u64| *s += x).merge(|a, b| *a += *b);
    /// # let _ = f;
    /// ```
    pub fn merge<M>(self, merge: M) -> Fold<A, F, M>
    where
        M: FnMut(&mut A, &A) + Send + 'static,
    {
        Fold {
            init: self.init,
            add: self.add,
            merge: Some(merge),
        }
    }
}

impl<T, A, F, M> Aggregate<T> for Fold<A, F, M>
where
    A: Clone + Send + 'static,
    F: FnMut(&mut A, T) + Send + 'static,
    M: FnMut(&mut A, &A) + Send + 'static,
{
    type Acc = A;
    type Output = A;
    fn init(&mut self) -> A {
        self.init.clone()
    }
    #[inline]
    fn add(&mut self, acc: &mut A, item: T) {
        (self.add)(acc, item);
    }
    fn merge(&mut self, into: &mut A, other: &A) -> bool {
        match &mut self.merge {
            Some(m) => {
                m(into, other);
                true
            }
            None => false,
        }
    }
    fn finish(&mut self, acc: A) -> A {
        acc
    }
}

/// Keeps the items, in the order they arrived (behind
/// [`Windows::collect_items`](crate::Windows::collect_items)).
///
/// ```
/// use flowline::{Aggregate, CollectItems};
/// let mut c = CollectItems;
/// let mut acc = <CollectItems as Aggregate<u8>>::init(&mut c);
/// c.add(&mut acc, 1u8);
/// assert_eq!(c.finish(acc), vec![1u8]);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct CollectItems;

impl<T: Clone + Send + 'static> Aggregate<T> for CollectItems {
    type Acc = Vec<T>;
    type Output = Vec<T>;
    fn init(&mut self) -> Vec<T> {
        Vec::new()
    }
    fn add(&mut self, acc: &mut Vec<T>, item: T) {
        acc.push(item);
    }
    fn merge(&mut self, into: &mut Vec<T>, other: &Vec<T>) -> bool {
        into.extend(other.iter().cloned());
        true
    }
    fn finish(&mut self, acc: Vec<T>) -> Vec<T> {
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fold_without_merge_says_so() {
        let mut f = Fold::new(0u32, |s: &mut u32, x: u32| *s += x);
        let mut a = 1;
        assert!(!Aggregate::<u32>::merge(&mut f, &mut a, &2));
        assert_eq!(a, 1);
        let mut g = f.merge(|a, b| *a += *b);
        assert!(Aggregate::<u32>::merge(&mut g, &mut a, &2));
        assert_eq!(a, 3);
    }

    #[test]
    fn reduce_merges_with_its_function() {
        let mut r = Reduce::new(|a: i32, b: i32| a.min(b));
        let mut a = r.init();
        r.add(&mut a, 5);
        let mut b = r.init();
        r.add(&mut b, 2);
        assert!(r.merge(&mut a, &b));
        assert!(r.merge(&mut a, &None));
        assert_eq!(r.finish(a), Some(2));
    }
}
