//! The checks of names given to a source or a sink: stream keys, groups and consumers. A
//! name is outside input (a flag, an environment variable): one that Redis would take but
//! that breaks the job quietly (a trailing newline, a hash tag that puts the dead letters
//! on another Cluster slot than their stream) is refused before anything connects.

/// The longest stream name: a key is read on every call, and no sensible one is longer.
const MAX_KEY: usize = 1024;
/// The longest group or consumer name (a consumer's name is often a host or pod name).
const MAX_NAME: usize = 256;

/// Why `name` cannot name a stream, if it cannot.
pub(crate) fn bad_key(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("must not be empty");
    }
    if name.len() > MAX_KEY {
        return Some("at most 1024 bytes");
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Some("no spaces or control characters");
    }
    if let Some(open) = name.find('{') {
        match name[open + 1..].find('}') {
            None => {
                return Some(
                    "has a `{` without a `}` after it: close the hash tag (`{jobs}`) or drop the brace",
                );
            }
            Some(0) => {
                return Some(
                    "has an empty hash tag `{}`: a Redis Cluster would hash the whole name",
                );
            }
            Some(_) => {}
        }
    }
    None
}

/// Why `name` cannot name a group or a consumer, if it cannot.
pub(crate) fn bad_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("must not be empty");
    }
    if name.len() > MAX_NAME {
        return Some("at most 256 bytes");
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Some("no spaces or control characters");
    }
    None
}

/// The hash tag of a key, as Redis Cluster reads it: the text between the first `{` and
/// the first `}` after it, when not empty.
pub(crate) fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let len = key[open + 1..].find('}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_that_break_keys_or_hash_tags_are_refused() {
        for ok in ["jobs", "{jobs}", "{jobs}:dead", "app:{t-1}:in", "a}b", "é"] {
            assert_eq!(bad_key(ok), None, "{ok}");
        }
        assert_eq!(bad_key(""), Some("must not be empty"));
        assert!(bad_key(&"x".repeat(1025)).unwrap().contains("1024"));
        assert_eq!(bad_key(&"x".repeat(1024)), None);
        for bad in ["jobs\n", "my jobs", "a\0b", "\t"] {
            assert!(bad_key(bad).unwrap().contains("spaces"), "{bad:?}");
        }
        assert!(bad_key("{jobs").unwrap().contains("without a `}`"));
        assert!(bad_key("{}jobs").unwrap().contains("empty hash tag"));
    }

    #[test]
    fn group_and_consumer_names_are_checked() {
        assert_eq!(bad_name("worker-1.pod{7}"), None);
        assert_eq!(bad_name(""), Some("must not be empty"));
        assert!(bad_name(&"c".repeat(257)).is_some());
        assert!(bad_name("w1\r\n").is_some());
    }

    #[test]
    fn hash_tags_are_read_as_redis_cluster_reads_them() {
        assert_eq!(hash_tag("{jobs}:dead"), Some("jobs"));
        assert_eq!(hash_tag("x{a}{b}"), Some("a"));
        assert_eq!(hash_tag("jobs"), None);
        assert_eq!(hash_tag("{}x{y}"), None);
        assert_eq!(hash_tag("a}b{c"), None);
    }
}
