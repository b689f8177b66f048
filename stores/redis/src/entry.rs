//! [`StreamEntry`]: one entry of a stream, as a source hands it out, and the reading of the
//! server's replies into entries. Replies are outside input: an entry whose fields are
//! missing (deleted from the stream while pending) or malformed is marked, never a panic.

use redis::Value;

/// One entry of a Redis stream, as read through a consumer group.
///
/// ```
/// use flowline_redis::StreamEntry;
/// let e = StreamEntry::new("1-0", vec![("job".into(), b"7".to_vec())]);
/// assert_eq!(e.id(), "1-0");
/// assert_eq!(e.get_str("job"), Some("7"));
/// assert_eq!(e.get("nope"), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    id: String,
    fields: Vec<(String, Vec<u8>)>,
    deliveries: u64,
}

impl StreamEntry {
    /// An entry with `id` and `fields`, delivered once (for tests of a stage).
    ///
    /// ```
    /// let e = flowline_redis::StreamEntry::new("5-1", vec![]);
    /// assert_eq!(e.deliveries(), 1);
    /// ```
    pub fn new(id: impl Into<String>, fields: Vec<(String, Vec<u8>)>) -> Self {
        StreamEntry {
            id: id.into(),
            fields,
            deliveries: 1,
        }
    }

    /// The entry's id (`<ms>-<seq>`).
    ///
    /// ```
    /// assert_eq!(flowline_redis::StreamEntry::new("9-0", vec![]).id(), "9-0");
    /// ```
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every field, in the order they were added.
    ///
    /// ```
    /// let e = flowline_redis::StreamEntry::new("1-0", vec![("a".into(), b"1".to_vec())]);
    /// assert_eq!(e.fields().len(), 1);
    /// ```
    pub fn fields(&self) -> &[(String, Vec<u8>)] {
        &self.fields
    }

    /// The value of the first field named `name`.
    ///
    /// ```
    /// let e = flowline_redis::StreamEntry::new("1-0", vec![("a".into(), vec![0, 1])]);
    /// assert_eq!(e.get("a"), Some(&[0u8, 1][..]));
    /// ```
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The value of the field `name` as text, when it is UTF-8.
    ///
    /// ```
    /// let e = flowline_redis::StreamEntry::new("1-0", vec![("a".into(), vec![0xff])]);
    /// assert_eq!(e.get_str("a"), None);
    /// ```
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// How many times the group has delivered this entry, this time included (1 for an
    /// entry read for the first time; more after a restart or a reclaim).
    ///
    /// ```
    /// assert_eq!(flowline_redis::StreamEntry::new("1-0", vec![]).deliveries(), 1);
    /// ```
    pub fn deliveries(&self) -> u64 {
        self.deliveries
    }

    pub(crate) fn set_deliveries(&mut self, n: u64) {
        self.deliveries = n;
    }
}

/// An entry as read: whole, or an id whose fields could not be read.
#[derive(Debug)]
pub(crate) enum Read {
    Entry(StreamEntry),
    /// The id, and why it cannot be handed out (its fields are gone or malformed).
    Bad(String, &'static str),
}

impl Read {
    pub(crate) fn id(&self) -> &str {
        match self {
            Read::Entry(e) => &e.id,
            Read::Bad(id, _) => id,
        }
    }
}

pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other).and_then(|t| t.parse().ok()),
    }
}

/// An array or a map's flattened pairs.
pub(crate) fn items(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        Value::Map(m) => Some(m.into_iter().flat_map(|(k, v)| [k, v]).collect()),
        Value::Attribute { data, .. } => items(*data),
        _ => None,
    }
}

/// One `[id, [field, value, ...]]` pair of a reply.
fn entry(v: Value) -> Option<Read> {
    let mut parts = items(v)?.into_iter();
    let id = text(&parts.next()?)?;
    let Some(fields) = parts.next() else {
        return Some(Read::Bad(id, "no fields"));
    };
    if fields == Value::Nil {
        return Some(Read::Bad(id, "deleted"));
    }
    let Some(flat) = items(fields) else {
        return Some(Read::Bad(id, "malformed"));
    };
    if flat.len() % 2 != 0 {
        return Some(Read::Bad(id, "malformed"));
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        // A field name that is not UTF-8 cannot be a `String` without changing it: the entry
        // goes to the dead letters, which keep its bytes as they are.
        let k = bytes(k).and_then(|b| String::from_utf8(b).ok());
        match (k, bytes(v)) {
            (Some(k), Some(v)) => out.push((k, v)),
            _ => return Some(Read::Bad(id, "malformed")),
        }
    }
    Some(Read::Entry(StreamEntry::new(id, out)))
}

/// A list of entries (`XRANGE`, the second part of `XAUTOCLAIM`).
pub(crate) fn entries(v: Value) -> Result<Vec<Read>, String> {
    if v == Value::Nil {
        return Ok(Vec::new());
    }
    let list = items(v).ok_or("a list of entries was expected")?;
    list.into_iter()
        .map(|e| entry(e).ok_or_else(|| "an entry without an id".to_string()))
        .collect()
}

/// The reply of `XREADGROUP` on one stream: nil (nothing came before the block time ran
/// out) or `[[stream, [entries]]]`.
pub(crate) fn read_reply(v: Value) -> Result<Vec<Read>, String> {
    if v == Value::Nil {
        return Ok(Vec::new());
    }
    let streams = items(v).ok_or("XREADGROUP: a list of streams was expected")?;
    let mut out = Vec::new();
    let mut it = streams.into_iter();
    // RESP2 gives `[name, entries]` arrays; RESP3 a map, flattened to name, entries.
    while let Some(first) = it.next() {
        let (_name, list) = match first {
            Value::Array(pair) if pair.len() == 2 => {
                let mut p = pair.into_iter();
                (p.next(), p.next().unwrap_or(Value::Nil))
            }
            name => (Some(name), it.next().unwrap_or(Value::Nil)),
        };
        out.extend(entries(list)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_reply_with_deleted_and_malformed_entries_marks_them() {
        let reply = Value::Array(vec![Value::Array(vec![
            b("s"),
            Value::Array(vec![
                Value::Array(vec![b("1-0"), Value::Array(vec![b("k"), b("v")])]),
                Value::Array(vec![b("2-0"), Value::Nil]),
                Value::Array(vec![b("3-0"), Value::Array(vec![b("odd")])]),
                Value::Array(vec![b("4-0"), Value::Array(vec![b("k"), Value::Nil])]),
                Value::Array(vec![
                    b("5-0"),
                    Value::Array(vec![Value::BulkString(vec![0xff]), b("v")]),
                ]),
                Value::Array(vec![
                    b("6-0"),
                    Value::Array(vec![b("k"), Value::BulkString(vec![0xff])]),
                ]),
            ]),
        ])]);
        let got = read_reply(reply).unwrap();
        assert_eq!(got.len(), 6);
        assert!(matches!(&got[4], Read::Bad(id, "malformed") if id == "5-0"));
        // A value is bytes: not UTF-8 is the stage's to judge.
        assert!(matches!(&got[5], Read::Entry(e) if e.get("k") == Some(&[0xff][..])));
        assert!(matches!(&got[0], Read::Entry(e) if e.get_str("k") == Some("v")));
        assert!(matches!(&got[1], Read::Bad(id, "deleted") if id == "2-0"));
        assert!(matches!(&got[2], Read::Bad(id, "malformed") if id == "3-0"));
        assert!(matches!(&got[3], Read::Bad(id, "malformed") if id == "4-0"));
    }

    #[test]
    fn nonsense_replies_are_errors_not_panics() {
        assert_eq!(read_reply(Value::Nil).unwrap().len(), 0);
        assert!(read_reply(Value::Int(3)).is_err());
        assert!(
            read_reply(Value::Array(vec![Value::Array(vec![
                b("s"),
                Value::Int(1)
            ])]))
            .is_err()
        );
        assert!(entries(Value::Array(vec![Value::Array(vec![])])).is_err());
        assert!(entries(Value::Array(vec![Value::Okay])).is_err());
    }
}
