//! flowline's heavier integration tests live in `tests/`; this crate has no code of its own.
//! They need a property-test generator, temporary directories and databases, which the
//! library's own tests do without.
