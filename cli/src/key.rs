//! `key(TEMPLATE[, PER_KEY])` and `--key TEMPLATE`: in order per key, concurrent across
//! keys. A task's inputs with the same key (the template rendered for the input, as a
//! command's replacement strings are: `{1}`, `{.}`, `{/}`, ... with `--colsep`) run at
//! most `PER_KEY` at once (default 1), start and leave in input order; inputs of other
//! keys go on beside them. `fork(N)` / `-j` stays the bound over all keys. This is the
//! library's [`key_by`](flowline::AsyncStage::key_by) and
//! [`per_key`](flowline::AsyncStage::per_key) on the task's stage. Through a queue the
//! feeder keeps the order across workers (`queue/key_gate.rs`).

use crate::exec::Item;
use crate::template::{Part, Template};

/// The most jobs of one key at once that `key(.., N)` takes.
pub const MAX_PER_KEY: u64 = 65_536;

/// A task's key: what is rendered for each input, and how many of one key may run at once.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySpec {
    /// The template, as written.
    pub template: String,
    pub per_key: usize,
}

impl KeySpec {
    /// The key of `item`: the template rendered over the item's arguments, values as they
    /// are (no shell quoting: the key is compared, never run).
    pub fn key_fn(&self) -> impl Fn(&Item) -> Vec<u8> + Send + 'static {
        let key = self.key();
        move |item: &Item| key.of(item.seq, &item.value.args())
    }

    /// The key of an input given as its position and arguments (the queue's feeder holds
    /// inputs so, not as items).
    pub fn key(&self) -> Key {
        Key(Template::parse(&self.template))
    }
}

/// A parsed key template.
pub struct Key(Template);

impl Key {
    /// The key of input `seq` with arguments `args`.
    pub fn of(&self, seq: u64, args: &[Vec<u8>]) -> Vec<u8> {
        self.0.render_plain(args, seq, 0)
    }
}

/// Why a key template cannot be used, if it cannot.
pub fn template_problem(text: &str) -> Option<&'static str> {
    if text.trim().is_empty() {
        return Some("is empty: give the part of the input that names its key, like `{1}`");
    }
    if text.contains('\0') {
        return Some("holds a NUL byte");
    }
    if Template::parse(text).parts.contains(&Part::Slot) {
        return Some("uses `{%}`, the job's slot, which is known only once the job starts");
    }
    None
}

/// `--key TEMPLATE`: the key of the task stage, one job of a key at a time; the error
/// names the option and the value.
pub fn option(text: &str) -> Result<KeySpec, String> {
    match template_problem(text) {
        Some(why) => Err(format!("error: --key `{}` {why}", text.escape_debug())),
        None => Ok(KeySpec {
            template: text.to_string(),
            per_key: 1,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use crate::spec::{Plan, Source, plan};

    fn p(text: &str) -> Result<Plan, String> {
        parse(text)
            .and_then(|p| plan(&p, Source::Lines(None)))
            .map_err(|e| e.message)
    }

    fn key_of(plan: &Plan, task: usize) -> Option<KeySpec> {
        plan.main_tasks().nth(task).unwrap().policies.key.clone()
    }

    #[test]
    fn key_is_a_policy_with_a_template_and_an_optional_per_key() {
        let plan = p("lines(f) | fork(16) | key({1}) | sh(\"apply {2}\")").unwrap();
        assert_eq!(
            key_of(&plan, 0),
            Some(KeySpec {
                template: "{1}".into(),
                per_key: 1
            })
        );
        let plan = p("seq(9) | key(\"{/.}-x\", 2) | http(http://h/{})").unwrap();
        assert_eq!(key_of(&plan, 0).unwrap().per_key, 2);
        assert_eq!(key_of(&plan, 0).unwrap().template, "{/.}-x");
        // Like any policy: every task after it, or trailing, the task before it.
        let plan = p("seq(9) | key({}) | sh(a) | sh(b)").unwrap();
        assert!(key_of(&plan, 0).is_some() && key_of(&plan, 1).is_some());
        let plan = p("seq(9) | sh(a) | sh(b) | key({}, 3)").unwrap();
        assert_eq!(key_of(&plan, 0), None);
        assert_eq!(key_of(&plan, 1).unwrap().per_key, 3);
    }

    #[test]
    fn bad_keys_name_the_stage_and_the_value() {
        for (text, needle) in [
            (
                "seq(3) | key() | sh(x)",
                "`key` takes 1 to 2 arguments, got 0",
            ),
            ("seq(3) | key(\"\") | sh(x)", "template `` is empty"),
            ("seq(3) | key(\"  \") | sh(x)", "template `  ` is empty"),
            (
                "seq(3) | key({1}, 0) | sh(x)",
                "per_key `0` must be from 1 to 65536",
            ),
            (
                "seq(3) | key({1}, two) | sh(x)",
                "per_key `two` is not a whole number",
            ),
            ("seq(3) | key({1}, -1) | sh(x)", "per_key `-1`"),
            ("seq(3) | key({1}, NaN) | sh(x)", "per_key `NaN`"),
            (
                "seq(3) | key({1}, 18446744073709551616) | sh(x)",
                "per_key `18446744073709551616`",
            ),
            ("seq(3) | key({1}, 65537) | sh(x)", "per_key `65537`"),
            ("seq(3) | key({1}, 2, 3) | sh(x)", "got 3 argument(s)"),
            ("seq(3) | key({%}) | sh(x)", "template `{%}` uses `{%}`"),
            ("seq(3) | key({1}) | print", "`key` has no task to apply to"),
            (
                "seq(3) | key({1}) | filter(x)",
                "`key` has no task to apply to",
            ),
        ] {
            let e = p(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(e.contains("key"), "{text}: {e}");
        }
    }

    #[test]
    fn the_option_checks_its_value() {
        assert_eq!(option("{1}").unwrap().per_key, 1);
        for bad in ["", " ", "a{%}", "\0"] {
            let e = option(bad).unwrap_err();
            assert!(e.starts_with("error: --key `"), "{e}");
        }
        assert!(option("").unwrap_err().contains("is empty"));
    }

    #[test]
    fn the_key_is_the_template_rendered_over_the_inputs_arguments() {
        let key = |t: &str, item: &Item| {
            KeySpec {
                template: t.into(),
                per_key: 1,
            }
            .key_fn()(item)
        };
        let cols = Item::with_args(7, vec![b"acct 1".to_vec(), b"x/y.tar.gz".to_vec()]);
        assert_eq!(key("{1}", &cols), b"acct 1");
        assert_eq!(key("{2/}", &cols), b"y.tar.gz");
        assert_eq!(key("{2.}", &cols), b"x/y.tar");
        assert_eq!(key("{1}:{#}", &cols), b"acct 1:7");
        let one = Item::new(3, b"dir/a.txt".to_vec());
        assert_eq!(key("{/.}", &one), b"a");
        // No quoting: `'` and `$` are part of the key, not shell syntax.
        assert_eq!(key("{}", &Item::new(1, b"it's $x".to_vec())), b"it's $x");
        // A column the input lacks renders as nothing: one key for all such inputs.
        assert_eq!(key("{3}", &cols), b"");
    }
}
