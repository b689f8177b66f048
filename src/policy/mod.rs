//! Stage policies: flow control and resilience values, each with its mechanism. They are
//! shareable (an `Arc` inside) and plug into an async stage's options.
//!
//! An async stage's driver knows no policy by name. It sees them through two traits:
//!
//! - [`Admission`]: asked for leave before each call starts (a rate permit, a shared
//!   in-flight slot, a closed breaker), told how each call ended, and asked whether the run's
//!   source should be paused. A stage asks its admissions in the order the options were given
//!   on the builder; a call starts when every one of them has let it through. A refusal
//!   carries the refusing policy's own error. What only some policies need is a small trait
//!   of its own that a policy opts into ([`Holds`], [`TimesCalls`], [`Idles`]).
//! - [`RetryPolicy`]: asked when a call fails whether (and when) to try again.
//!
//! A new policy is a value implementing [`Policy`] (its per-stage [`Admission`] comes from
//! it), in a file of its own, plus one builder method that hands it to the stage. From
//! outside the crate, a gate is a [`Limit`](limit::Limit) (an async acquire and a permit held
//! while the call runs), adapted to an [`Admission`] in `limit.rs`.

pub(crate) mod adaptive;
pub(crate) mod breaker;
pub(crate) mod committed;
pub mod gcra;
pub(crate) mod hedge;
pub(crate) mod inflight;
pub(crate) mod limit;
pub(crate) mod rate;
#[cfg(feature = "tower")]
pub(crate) mod rate_layer;
pub(crate) mod retry;

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::failure::ItemError;

/// An invalid setting, as (option, value, reason): reported as `Error::Config` before a run.
pub(crate) type Invalid = (&'static str, String, &'static str);

/// An async stage's name and admission policies.
pub(crate) type StagePolicies = (std::sync::Arc<str>, Vec<std::sync::Arc<dyn Policy>>);

/// A flow-control or resilience option as given on a stage builder: checked before the run
/// starts, then made into the stage's own [`Admission`] when the stage is built.
pub(crate) trait Policy: fmt::Debug + Send + Sync {
    /// The first invalid setting, if any.
    fn invalid(&self) -> Option<Invalid>;
    /// This policy's state for one stage (clones of a shared value share what they share,
    /// e.g. a rate's budget; the returned state is the stage's own).
    fn admission(&self) -> Box<dyn Admission>;

    /// A gauge of this policy's state, as (metric name, value), for the run's metrics.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn gauge(&self) -> Option<(&'static str, f64)> {
        None
    }

    /// The rate this policy is, for a stage whose rate is changed while running.
    fn rate(&self) -> Option<&crate::Rate> {
        None
    }

    /// Whether this policy sets the stage's limit on calls in flight itself (adaptive
    /// concurrency): the stage's workers then cap it.
    fn moves_limit(&self) -> bool {
        false
    }
}

/// What an admission says about the next call.
#[derive(Debug, Clone)]
pub(crate) enum Verdict {
    /// It may start (as far as this policy is concerned).
    Go,
    /// It must not be made: the item fails at once with this error, which names the policy
    /// that refused (a fail-fast open breaker: [`ItemError::CircuitOpen`]; any other policy:
    /// [`ItemError::Refused`] with its own reason), and is counted under that name.
    Refuse(ItemError),
}

/// A finished call, as an admission sees it.
pub(crate) struct Finished<'a> {
    /// The id the call was admitted with.
    pub(crate) call: u64,
    /// Its error, if it failed.
    pub(crate) error: Option<&'a ItemError>,
    /// How long it took, when it was timed (always, if an admission times calls).
    pub(crate) latency: Option<Duration>,
    /// Calls of this stage in flight when it finished, itself included.
    pub(crate) in_flight: usize,
    /// Attempts the item has made, this one included.
    pub(crate) attempts: u32,
}

/// What a stage does now with the items an admission asked it to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// Keep them: calls may not go through yet (the admission wakes the stage).
    Wait,
    /// Not known yet; keep them unless the stage has nothing else that could decide it.
    Undecided,
    /// Try them again (they pass the admissions like any call).
    Again,
    /// Fail them with their errors.
    Fail,
}

/// One policy's state inside one stage: it decides on each call (go, wait, refuse with its
/// own reason) and observes how calls end. The driver calls it from its own poll loop, so
/// nothing here blocks: waiting is `Poll::Pending` with the waker registered.
///
/// Protocol: for each call, the driver polls its admissions in order with the same `call` id
/// until each has answered `Go`; an answer is kept until the call starts (a later admission
/// may make it wait, it does not ask the earlier ones again). If one refuses, the earlier ones
/// are told with [`cancel`](Admission::cancel). A call that every one let through is announced
/// with [`started`](Admission::started) as it starts. Every call that started ends with one
/// [`finished`](Admission::finished) on every admission.
///
/// What only some policies do is a trait of its own, which a policy opts into by returning
/// itself from the matching accessor: [`Holds`] (items of failed calls held to be tried
/// again: the pausing breaker), [`TimesCalls`] (every call timed, and the limit on calls in
/// flight set from them: adaptive concurrency), [`Idles`] (told when the stage does not wait
/// on it: a rate gives back what it granted ahead).
pub(crate) trait Admission: Send {
    /// Leave to start call `call`. `want` is how many calls could start now, for a policy
    /// that grants in batches (it keeps the rest for the next calls).
    fn poll_admit(&mut self, cx: &mut Context<'_>, call: u64, want: usize) -> Poll<Verdict>;

    /// A `Go` given for `call` will not be used (a later admission refused it): give back
    /// what must be given back. What was spent (a rate permit) stays spent.
    fn cancel(&mut self, _call: u64) {}

    /// Call `call`, which every admission let through, starts now.
    fn started(&mut self, _call: u64) {}

    /// A call this admission let through has ended.
    fn finished(&mut self, _call: &Finished<'_>) {}

    /// Called once per turn of the driver: reports what was batched, and says whether the
    /// run's source should be paused now (if so, `cx` is woken when that may change).
    fn poll_pause(&mut self, _cx: &mut Context<'_>) -> bool {
        false
    }

    /// This policy holds items of failed calls ([`Holds`]).
    fn holds(&mut self) -> Option<&mut dyn Holds> {
        None
    }

    /// This policy times every call and sets the limit on calls in flight ([`TimesCalls`]).
    fn times_calls(&self) -> Option<&dyn TimesCalls> {
        None
    }

    /// This policy wants to know when the stage is not waiting on it ([`Idles`]).
    fn idles(&mut self) -> Option<&mut dyn Idles> {
        None
    }
}

/// A policy that may hold the item of a failed call to be tried again, rather than let it
/// fail (a breaker in pause mode).
pub(crate) trait Holds {
    /// A call failed (and no retry takes it): whether the stage should hold its item.
    /// Asked after [`Admission::finished`].
    fn hold(&mut self, call: &Finished<'_>) -> bool;

    /// While items are held: what to do with them now (`cx` is woken when that may change).
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Held;
}

/// A policy that wants [`Finished::latency`] for every call (else it is sampled), and sets
/// the limit on the stage's calls in flight that replaces `workers(n)` (an adaptive limit).
pub(crate) trait TimesCalls {
    /// The limit on calls in flight now.
    fn limit(&self) -> usize;
}

/// A policy owed nothing for the time the stage does not wait on it (no input, no room, or
/// waiting on another admission): a rate gives back the permits it granted ahead.
pub(crate) trait Idles {
    /// The stage is not waiting on this admission until it asks again.
    fn idle(&mut self);
}

/// A failed call, as a retry policy sees it.
pub(crate) struct Failed<'a> {
    /// Attempts made, the failed one included.
    pub(crate) attempts: u32,
    /// When the first attempt started (kept when [`RetryPolicy::needs_first_at`] says so).
    pub(crate) first_at: Option<Instant>,
    pub(crate) error: &'a ItemError,
}

/// What a retry policy says about a failed call.
pub(crate) enum Again {
    /// Try again at this instant.
    At(Instant),
    /// Do not: the item fails with its error.
    No,
    /// Do not: the item fails with this error instead (it says why, its source is the
    /// call's error).
    GiveUp(ItemError),
}

/// A stage's retry state: decides whether and when a failed call is tried again. The stage
/// keeps the waiting items (a delay queue in its driver; an item in backoff takes no worker).
pub(crate) trait RetryPolicy: Send {
    /// An item's first attempt is starting.
    fn first_attempt(&mut self) {}

    /// Whether the start of each item's first attempt must be kept (one clock read per item).
    fn needs_first_at(&self) -> bool {
        false
    }

    /// A call failed: when to try again, or not.
    fn again(&mut self, failed: &Failed<'_>) -> Again;

    /// Whether the run's source stays paused while an item of the stage waits for its next
    /// attempt.
    fn pauses_source(&self) -> bool {
        false
    }
}
