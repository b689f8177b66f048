//! A `tracing` subscriber for tests that keeps every span (name, fields, parent) and every
//! event (level, fields, the span it happened in). Hand-written, so that flowline's tests
//! need no subscriber crate; it tracks the entered spans per thread, so the runs it watches
//! belong on one thread (a current-thread runtime), and it does not answer `Span::current`
//! (a contextual parent comes from its own record of entered spans).

use std::cell::RefCell;
use std::fmt;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// A span as it was made, with the fields recorded later.
#[derive(Debug, Clone)]
pub(crate) struct SpanRec {
    pub(crate) name: &'static str,
    /// An index into [`Captured::spans`].
    pub(crate) parent: Option<usize>,
    pub(crate) fields: Vec<(String, String)>,
}

impl SpanRec {
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct EventRec {
    pub(crate) level: Level,
    /// An index into [`Captured::spans`].
    pub(crate) span: Option<usize>,
    pub(crate) fields: Vec<(String, String)>,
}

impl EventRec {
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
pub(crate) struct Captured {
    pub(crate) spans: Vec<SpanRec>,
    pub(crate) events: Vec<EventRec>,
}

impl Captured {
    /// The spans from `i` up to the root: `[i, parent, grandparent, ...]`.
    pub(crate) fn ancestry(&self, i: usize) -> Vec<usize> {
        let mut out = vec![i];
        while let Some(p) = self.spans[*out.last().unwrap()].parent {
            out.push(p);
        }
        out
    }
}

thread_local! {
    static ENTERED: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

#[derive(Clone, Default)]
pub(crate) struct Capture(pub(crate) Arc<Mutex<Captured>>);

impl Capture {
    pub(crate) fn take(&self) -> Captured {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
}

fn current() -> Option<u64> {
    ENTERED.with(|e| e.borrow().last().copied())
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let parent = if let Some(p) = attrs.parent() {
            Some(p.into_u64())
        } else if attrs.is_contextual() {
            current()
        } else {
            None
        };
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        let mut c = self.0.lock().unwrap();
        c.spans.push(SpanRec {
            name: attrs.metadata().name(),
            parent: parent.map(|p| p as usize - 1),
            fields,
        });
        Id::from_u64(c.spans.len() as u64)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut c = self.0.lock().unwrap();
        let rec = &mut c.spans[span.into_u64() as usize - 1];
        values.record(&mut Fields(&mut rec.fields));
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let span = if let Some(p) = event.parent() {
            Some(p.into_u64())
        } else if event.is_contextual() {
            current()
        } else {
            None
        };
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().events.push(EventRec {
            level: *event.metadata().level(),
            span: span.map(|s| s as usize - 1),
            fields,
        });
    }

    fn enter(&self, span: &Id) {
        ENTERED.with(|e| e.borrow_mut().push(span.into_u64()));
    }

    fn exit(&self, span: &Id) {
        ENTERED.with(|e| {
            let mut e = e.borrow_mut();
            if let Some(i) = e.iter().rposition(|s| *s == span.into_u64()) {
                e.remove(i);
            }
        });
    }
}
