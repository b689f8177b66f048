//! The event as it comes in (validated field by field: the body is outside input) and as it
//! goes through the pipeline.

use serde::Serialize;
use serde_json::Value;

/// The longest event id accepted: ids are primary keys, kept short.
pub const MAX_ID_LEN: usize = 128;
/// The longest `kind` accepted.
pub const MAX_KIND_LEN: usize = 64;
/// The longest `message` accepted.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Severities run from 0 (informational) to this.
pub const MAX_SEVERITY: u8 = 10;

/// What is wrong with a body, naming the field so that the client can fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadField {
    /// The field at fault (`body` when the body is not a JSON object at all).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl std::fmt::Display for BadField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// An event as posted: `{"id": "...", "kind": "...", "severity": 0..=10, "message": "..."}`
/// (`message` optional). The account is not in the body: it comes from the API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The client's id for the event: posting the same id twice stores it once.
    pub id: String,
    /// What happened (`login_failed`, `port_scan`, ...).
    pub kind: String,
    /// 0 to [`MAX_SEVERITY`].
    pub severity: u8,
    /// Free text.
    pub message: String,
}

impl Incoming {
    /// Parses and checks a body. Every field is checked for type and bounds; unknown fields
    /// are refused too, so that a misspelt `severity` is not silently taken as absent.
    pub fn parse(body: &[u8]) -> Result<Incoming, BadField> {
        let value: Value = serde_json::from_slice(body).map_err(|e| BadField {
            field: "body",
            problem: format!("not JSON: {e}"),
        })?;
        let Value::Object(map) = value else {
            return Err(BadField {
                field: "body",
                problem: "must be a JSON object".into(),
            });
        };
        if let Some(k) = map
            .keys()
            .find(|k| !["id", "kind", "severity", "message"].contains(&k.as_str()))
        {
            return Err(BadField {
                field: "body",
                problem: format!("unknown field `{}`", k.chars().take(64).collect::<String>()),
            });
        }
        let text = |field: &'static str, max: usize, required: bool| -> Result<String, BadField> {
            match map.get(field) {
                None if !required => Ok(String::new()),
                None => Err(BadField {
                    field,
                    problem: "missing".into(),
                }),
                Some(Value::String(s)) if required && s.trim().is_empty() => Err(BadField {
                    field,
                    problem: "must not be empty".into(),
                }),
                Some(Value::String(s)) if s.len() > max => Err(BadField {
                    field,
                    problem: format!("longer than {max} bytes"),
                }),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(BadField {
                    field,
                    problem: "must be a string".into(),
                }),
            }
        };
        let id = text("id", MAX_ID_LEN, true)?;
        let kind = text("kind", MAX_KIND_LEN, true)?;
        let severity = match map.get("severity") {
            None => {
                return Err(BadField {
                    field: "severity",
                    problem: "missing".into(),
                });
            }
            Some(v) => match v.as_u64() {
                Some(n) if n <= u64::from(MAX_SEVERITY) => n as u8,
                _ => {
                    return Err(BadField {
                        field: "severity",
                        problem: format!("must be an integer from 0 to {MAX_SEVERITY}"),
                    });
                }
            },
        };
        let message = text("message", MAX_MESSAGE_LEN, false)?;
        Ok(Incoming {
            id,
            kind,
            severity,
            message,
        })
    }
}

/// An account allowed to post, as stored in the `accounts` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    /// The account's id.
    pub id: i64,
    /// Its display name.
    pub name: String,
    /// Where its alerts go (a phone number or an address, for the notifier).
    pub contact: String,
}

/// An accepted event on its way through the pipeline.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// The client's id.
    pub id: String,
    /// The API key it was posted with (the pipeline's account lookup key); not sent out.
    #[serde(skip)]
    pub api_key: String,
    /// The account, filled in by the lookup stage (shared with the loader's cache, not
    /// copied per event).
    pub account: Option<std::sync::Arc<Account>>,
    /// What happened.
    pub kind: String,
    /// 0 to [`MAX_SEVERITY`].
    pub severity: u8,
    /// Free text.
    pub message: String,
    /// When the service accepted it, in milliseconds since the Unix epoch.
    pub received_ms: i64,
    /// Where it is: `accepted`, `enriched`, `stored`.
    pub status: &'static str,
    /// Whether its severity calls for an alert.
    pub alert: bool,
}

impl Event {
    /// An accepted event, before the pipeline has seen it.
    pub fn accepted(incoming: Incoming, api_key: String) -> Event {
        Event {
            id: incoming.id,
            api_key,
            account: None,
            kind: incoming.kind,
            severity: incoming.severity,
            message: incoming.message,
            received_ms: now_ms(),
            status: "accepted",
            alert: false,
        }
    }
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_field_is_named() {
        let e = Incoming::parse(br#"{"id":"a","kind":"x","severity":"high"}"#).unwrap_err();
        assert_eq!(e.field, "severity");
    }

    #[test]
    fn a_good_body_parses_and_is_accepted() {
        let inc = Incoming::parse(br#"{"id":"e1","kind":"login_failed","severity":7}"#).unwrap();
        assert_eq!(
            (inc.id.as_str(), inc.severity, inc.message.as_str()),
            ("e1", 7, "")
        );
        let e = Event::accepted(inc, "key-1".into());
        assert_eq!(e.status, "accepted");
    }

    fn field_of(body: &str) -> &'static str {
        Incoming::parse(body.as_bytes()).unwrap_err().field
    }

    #[test]
    fn names_the_field_at_fault() {
        assert_eq!(field_of("nope"), "body");
        assert_eq!(field_of("[1]"), "body");
        assert_eq!(field_of(r#"{"kind":"k","severity":1}"#), "id");
        assert_eq!(field_of(r#"{"id":" ","kind":"k","severity":1}"#), "id");
        assert_eq!(field_of(r#"{"id":7,"kind":"k","severity":1}"#), "id");
        assert_eq!(field_of(r#"{"id":"a","severity":1}"#), "kind");
        assert_eq!(field_of(r#"{"id":"a","kind":"k"}"#), "severity");
        assert_eq!(
            field_of(r#"{"id":"a","kind":"k","severity":11}"#),
            "severity"
        );
        assert_eq!(
            field_of(r#"{"id":"a","kind":"k","severity":-1}"#),
            "severity"
        );
        assert_eq!(
            field_of(r#"{"id":"a","kind":"k","severity":1.5}"#),
            "severity"
        );
        assert_eq!(
            field_of(r#"{"id":"a","kind":"k","severity":1e300}"#),
            "severity"
        );
        assert_eq!(
            field_of(r#"{"id":"a","kind":"k","severity":1,"message":[]}"#),
            "message"
        );
        assert_eq!(
            field_of(r#"{"id":"a","kind":"k","severity":1,"sevrity":2}"#),
            "body"
        );
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            field_of(&format!(r#"{{"id":"{long}","kind":"k","severity":1}}"#)),
            "id"
        );
    }

    #[test]
    fn takes_a_good_body() {
        let e = Incoming::parse(br#"{"id":"a","kind":"k","severity":10,"message":"m"}"#).unwrap();
        assert_eq!(e.severity, 10);
        assert_eq!(e.message, "m");
    }
}
