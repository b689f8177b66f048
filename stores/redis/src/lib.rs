//! Redis for flowline.
#![warn(missing_docs)]
#![forbid(unsafe_code)]
