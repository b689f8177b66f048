//! [`StreamEntry`]: one entry of a stream, as a source hands it out, and the reading of the
//! server's replies into entries ([`parse_entries`], [`parse_streams`]). Replies are outside
//! input: an entry whose fields are missing (deleted from the stream while pending) or
//! malformed is marked ([`ReadEntry::Bad`]); a reply whose shape is wrong is a
//! [`ReplyError`] naming what was wrong; never a panic.

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

/// An entry of a reply, as read: whole, or its id and why its fields cannot be used.
///
/// ```
/// use flowline_redis::ReadEntry;
/// let bad = ReadEntry::Bad("7-0".into(), "deleted");
/// assert_eq!(bad.id(), "7-0");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEntry {
    /// The entry, its fields read.
    Entry(StreamEntry),
    /// The id, and why the entry cannot be handed out: `"deleted"` (its fields are gone:
    /// it was deleted while pending), `"no fields"` or `"malformed"` (a field that is not
    /// a name and a value, or a name that is not UTF-8).
    Bad(String, &'static str),
}

impl ReadEntry {
    /// The entry's id, whole or not.
    ///
    /// ```
    /// let e = flowline_redis::ReadEntry::Entry(flowline_redis::StreamEntry::new("1-0", vec![]));
    /// assert_eq!(e.id(), "1-0");
    /// ```
    pub fn id(&self) -> &str {
        match self {
            ReadEntry::Entry(e) => &e.id,
            ReadEntry::Bad(id, _) => id,
        }
    }
}

/// A reply from Redis that does not have the shape its command gives: what was expected
/// and not found.
///
/// ```
/// let e = flowline_redis::parse_entries(redis::Value::Int(3)).unwrap_err();
/// assert_eq!(e.to_string(), "a reply that does not parse: a list of entries was expected");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyError {
    what: &'static str,
}

impl ReplyError {
    fn new(what: &'static str) -> Self {
        ReplyError { what }
    }
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a reply that does not parse: {}", self.what)
    }
}

impl std::error::Error for ReplyError {}

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
fn entry(v: Value) -> Option<ReadEntry> {
    let mut parts = items(v)?.into_iter();
    let id = text(&parts.next()?)?;
    let Some(fields) = parts.next() else {
        return Some(ReadEntry::Bad(id, "no fields"));
    };
    if fields == Value::Nil {
        return Some(ReadEntry::Bad(id, "deleted"));
    }
    let Some(flat) = items(fields) else {
        return Some(ReadEntry::Bad(id, "malformed"));
    };
    if flat.len() % 2 != 0 {
        return Some(ReadEntry::Bad(id, "malformed"));
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        // A field name that is not UTF-8 cannot be a `String` without changing it: the entry
        // goes to the dead letters, which keep its bytes as they are.
        let k = bytes(k).and_then(|b| String::from_utf8(b).ok());
        match (k, bytes(v)) {
            (Some(k), Some(v)) => out.push((k, v)),
            _ => return Some(ReadEntry::Bad(id, "malformed")),
        }
    }
    Some(ReadEntry::Entry(StreamEntry::new(id, out)))
}

/// The entries of a reply that is a list of them (`XRANGE`, `XREVRANGE`, the second part of
/// `XAUTOCLAIM`), in order. Nil is no entries.
///
/// ```
/// use redis::Value;
/// use flowline_redis::{parse_entries, ReadEntry};
/// let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
/// let reply = Value::Array(vec![
///     Value::Array(vec![b("1-0"), Value::Array(vec![b("job"), b("7")])]),
///     Value::Array(vec![b("2-0"), Value::Nil]),
/// ]);
/// let got = parse_entries(reply).unwrap();
/// assert!(matches!(&got[0], ReadEntry::Entry(e) if e.get_str("job") == Some("7")));
/// assert_eq!(got[1], ReadEntry::Bad("2-0".into(), "deleted"));
/// let err = parse_entries(Value::Array(vec![Value::Int(1)])).unwrap_err();
/// assert!(err.to_string().contains("an entry without an id"));
/// ```
pub fn parse_entries(v: Value) -> Result<Vec<ReadEntry>, ReplyError> {
    if v == Value::Nil {
        return Ok(Vec::new());
    }
    let list = items(v).ok_or(ReplyError::new("a list of entries was expected"))?;
    list.into_iter()
        .map(|e| entry(e).ok_or(ReplyError::new("an entry without an id")))
        .collect()
}

/// The entries of an `XREAD` or `XREADGROUP` reply, stream by stream: each stream's name
/// and its entries, in the reply's order. Nil (nothing came before the block time ran out)
/// is no streams. Both protocols' shapes are read: RESP2's `[[name, entries], ...]` and
/// RESP3's map of names to entries.
///
/// ```
/// use redis::Value;
/// use flowline_redis::{parse_streams, ReadEntry};
/// let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
/// let reply = Value::Array(vec![Value::Array(vec![
///     b("results"),
///     Value::Array(vec![Value::Array(vec![b("5-0"), Value::Array(vec![b("seq"), b("1")])])]),
/// ])]);
/// let got = parse_streams(reply).unwrap();
/// assert_eq!(got[0].0, "results");
/// assert!(matches!(&got[0].1[0], ReadEntry::Entry(e) if e.id() == "5-0"));
/// assert!(parse_streams(Value::Nil).unwrap().is_empty());
/// let err = parse_streams(Value::Okay).unwrap_err();
/// assert!(err.to_string().contains("a list of streams was expected"));
/// ```
pub fn parse_streams(v: Value) -> Result<Vec<(String, Vec<ReadEntry>)>, ReplyError> {
    if v == Value::Nil {
        return Ok(Vec::new());
    }
    let streams = items(v).ok_or(ReplyError::new("a list of streams was expected"))?;
    let mut out = Vec::new();
    let mut it = streams.into_iter();
    while let Some(first) = it.next() {
        let (name, list) = match first {
            Value::Array(pair) => {
                let mut p = pair.into_iter();
                match (p.next(), p.next(), p.next()) {
                    (Some(name), Some(list), None) => (name, list),
                    _ => return Err(ReplyError::new("a stream's name and entries were expected")),
                }
            }
            name => (name, it.next().unwrap_or(Value::Nil)),
        };
        let name = text(&name).ok_or(ReplyError::new("a stream's name was expected"))?;
        out.push((name, parse_entries(list)?));
    }
    Ok(out)
}

/// The entries of an `XREADGROUP` reply on one stream, as one list.
pub(crate) fn read_reply(v: Value) -> Result<Vec<ReadEntry>, ReplyError> {
    Ok(parse_streams(v)?.into_iter().flat_map(|(_, e)| e).collect())
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
        assert!(matches!(&got[4], ReadEntry::Bad(id, "malformed") if id == "5-0"));
        // A value is bytes: not UTF-8 is the stage's to judge.
        assert!(matches!(&got[5], ReadEntry::Entry(e) if e.get("k") == Some(&[0xff][..])));
        assert!(matches!(&got[0], ReadEntry::Entry(e) if e.get_str("k") == Some("v")));
        assert!(matches!(&got[1], ReadEntry::Bad(id, "deleted") if id == "2-0"));
        assert!(matches!(&got[2], ReadEntry::Bad(id, "malformed") if id == "3-0"));
        assert!(matches!(&got[3], ReadEntry::Bad(id, "malformed") if id == "4-0"));
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
        assert!(parse_entries(Value::Array(vec![Value::Array(vec![])])).is_err());
        assert!(parse_entries(Value::Array(vec![Value::Okay])).is_err());
        // Each error names what was wrong.
        let says = |v: Value| parse_streams(v).unwrap_err().to_string();
        assert!(says(Value::Int(3)).ends_with("a list of streams was expected"));
        let only_a_name = Value::Array(vec![Value::Array(vec![b("only-a-name")])]);
        assert!(says(only_a_name).ends_with("a stream's name and entries were expected"));
        let three = Value::Array(vec![Value::Array(vec![b("s"), Value::Nil, Value::Nil])]);
        assert!(says(three).ends_with("a stream's name and entries were expected"));
        let no_name = Value::Array(vec![Value::Array(vec![Value::Nil, Value::Array(vec![])])]);
        assert!(says(no_name).ends_with("a stream's name was expected"));
        let not_a_list = Value::Array(vec![Value::Array(vec![b("s"), Value::Int(1)])]);
        assert!(says(not_a_list).ends_with("a list of entries was expected"));
        let no_id = Value::Array(vec![Value::Array(vec![
            b("s"),
            Value::Array(vec![Value::Int(7)]),
        ])]);
        assert!(says(no_id).ends_with("an entry without an id"));
    }

    #[test]
    fn both_protocols_name_each_stream() {
        let one = |id: &str| {
            Value::Array(vec![Value::Array(vec![
                b(id),
                Value::Array(vec![b("k"), b("v")]),
            ])])
        };
        let resp2 = Value::Array(vec![
            Value::Array(vec![b("a"), one("1-0")]),
            Value::Array(vec![b("b"), one("2-0")]),
        ]);
        let resp3 = Value::Map(vec![(b("a"), one("1-0")), (b("b"), one("2-0"))]);
        for reply in [resp2, resp3] {
            let got = parse_streams(reply).unwrap();
            let names: Vec<_> = got.iter().map(|(n, e)| (n.as_str(), e[0].id())).collect();
            assert_eq!(names, [("a", "1-0"), ("b", "2-0")]);
        }
    }
}
