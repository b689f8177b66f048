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

/// An event as posted: `{"id": "...", "kind": "...", "severity": 0..=10, "message": "...",
/// "time": <ms since the Unix epoch>, "source": "<IP address>"}` (`message`, `time` and
/// `source` optional). The account is not in the body: it comes from the API key.
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
    /// When it happened, by the sender's clock (ms since the Unix epoch), if given.
    pub time_ms: Option<i64>,
    /// The address it came from, if given (checked to be an IP address).
    pub source: Option<String>,
}

/// The earliest event time accepted (2000-01-01T00:00:00Z, in ms since the Unix epoch).
pub const MIN_TIME_MS: i64 = 946_684_800_000;
/// The latest event time accepted (2100-01-01T00:00:00Z).
pub const MAX_TIME_MS: i64 = 4_102_444_800_000;

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
        if let Some(k) = map.keys().find(|k| {
            !["id", "kind", "severity", "message", "time", "source"].contains(&k.as_str())
        }) {
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
        let time_ms = match map.get("time") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(t) if (MIN_TIME_MS..MAX_TIME_MS).contains(&t) => Some(t),
                _ => {
                    return Err(BadField {
                        field: "time",
                        problem: format!(
                            "must be an integer of milliseconds since the Unix epoch, from {MIN_TIME_MS} (2000) to {MAX_TIME_MS} (2100)"
                        ),
                    });
                }
            },
        };
        let source = match map.get("source") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() <= 64 && s.parse::<std::net::IpAddr>().is_ok() => {
                Some(s.clone())
            }
            Some(_) => {
                return Err(BadField {
                    field: "source",
                    problem: "must be an IPv4 or IPv6 address as a string".into(),
                });
            }
        };
        Ok(Incoming {
            id,
            kind,
            severity,
            message,
            time_ms,
            source,
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
    /// When it happened: the sender's `time`, or `received_ms` when it gave none. The
    /// correlation rules' windows go by it.
    pub time_ms: i64,
    /// The address it came from, if the sender said.
    pub source: Option<String>,
    /// Where it is: `accepted`, `enriched`, `stored`.
    pub status: &'static str,
    /// Whether it calls for an alert (its severity, or a correlation rule's match).
    pub alert: bool,
    /// The correlation rule that made it, for an event a rule raised (none for a posted one).
    pub rule: Option<String>,
}

impl Event {
    /// An accepted event, before the pipeline has seen it.
    pub fn accepted(incoming: Incoming, api_key: String) -> Event {
        let received_ms = now_ms();
        Event {
            id: incoming.id,
            api_key,
            account: None,
            kind: incoming.kind,
            severity: incoming.severity,
            message: incoming.message,
            received_ms,
            time_ms: incoming.time_ms.unwrap_or(received_ms),
            source: incoming.source,
            status: "accepted",
            alert: false,
            rule: None,
        }
    }
}

impl Event {
    /// Its account's id (0 when the account is not known).
    pub fn account_id(&self) -> i64 {
        self.account.as_ref().map_or(0, |a| a.id)
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
    fn time_and_source_are_checked_and_time_defaults_to_arrival() {
        for bad in ["-1", "0", "1e20", "\"yesterday\"", "4102444800000", "1.5"] {
            let body = format!(r#"{{"id":"a","kind":"k","severity":1,"time":{bad}}}"#);
            assert_eq!(field_of(&body), "time", "{bad}");
        }
        for bad in ["\"10.0.0.256\"", "\"\"", "7", "\"host.example\""] {
            let body = format!(r#"{{"id":"a","kind":"k","severity":1,"source":{bad}}}"#);
            assert_eq!(field_of(&body), "source", "{bad}");
        }
        let inc = Incoming::parse(
            br#"{"id":"a","kind":"k","severity":1,"time":1700000000000,"source":"::1"}"#,
        )
        .unwrap();
        assert_eq!(
            (inc.time_ms, inc.source.as_deref()),
            (Some(1_700_000_000_000), Some("::1"))
        );
        assert_eq!(Event::accepted(inc, "k".into()).time_ms, 1_700_000_000_000);
        let e = Event::accepted(
            Incoming::parse(br#"{"id":"a","kind":"k","severity":1}"#).unwrap(),
            "k".into(),
        );
        assert_eq!(e.time_ms, e.received_ms);
    }

    #[test]
    fn takes_a_good_body() {
        let e = Incoming::parse(br#"{"id":"a","kind":"k","severity":10,"message":"m"}"#).unwrap();
        assert_eq!(e.severity, 10);
        assert_eq!(e.message, "m");
    }
}
