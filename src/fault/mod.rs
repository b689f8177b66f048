//! Faults of the infrastructure around a run: which errors are transient, and how long a
//! run rides out a server that is down. See [`Outage`] and [`is_transient`].

pub(crate) mod outage;
pub(crate) mod transient;

pub use outage::{Outage, OutageError, OutageWatch};
pub use transient::{Permanent, Transient, error_chain, is_transient, is_transient_with};
