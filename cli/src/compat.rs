//! GNU parallel's command line: input groups (`:::`, `::::`, `:::+`, `::::+`, `-a`), the
//! command given as words, `-j N|N%|+N|-N|FILE`, `--halt`, `--timeout`. Each value is
//! checked here; a bad one is an error naming the option and the value.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// An input group after a separator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// `::::`: the values are files whose records are the inputs.
    pub files: bool,
    /// `:::+` / `::::+`: paired with the group before (not combined with it).
    pub linked: bool,
    pub values: Vec<OsString>,
}

fn separator(a: &OsString) -> Option<(bool, bool)> {
    match a.as_bytes() {
        b":::" => Some((false, false)),
        b"::::" => Some((true, false)),
        b":::+" => Some((false, true)),
        b"::::+" => Some((true, true)),
        _ => None,
    }
}

/// Splits the arguments at the first input separator: what is before (options, command),
/// and the groups after it. Everything after a separator is an input, whatever it looks
/// like (`-x`, `--help`).
pub fn split_groups(mut argv: Vec<OsString>) -> (Vec<OsString>, Vec<Group>) {
    let Some(first) = argv.iter().position(|a| separator(a).is_some()) else {
        return (argv, Vec::new());
    };
    let rest = argv.split_off(first);
    let mut groups: Vec<Group> = Vec::new();
    for a in rest {
        match separator(&a) {
            Some((files, linked)) => groups.push(Group {
                files,
                linked,
                values: Vec::new(),
            }),
            None => {
                if let Some(g) = groups.last_mut() {
                    g.values.push(a);
                }
            }
        }
    }
    (argv, groups)
}

/// The inputs of the groups: each group's values (a `::::` group: the records of its
/// files, ended by `delim`), combined as parallel does: every combination of the groups in
/// order (the last one changing fastest), a linked group paired value by value with the
/// one before (as many as the shorter has).
pub fn table(groups: &[Group], delim: u8) -> Result<Vec<Vec<Vec<u8>>>, String> {
    let mut rows: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
    for (i, g) in groups.iter().enumerate() {
        let mut values: Vec<Vec<u8>> = Vec::new();
        if g.files {
            for f in &g.values {
                let data = if f.as_bytes() == b"-" {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)
                        .map_err(|e| format!("::::: cannot read stdin: {e}"))?;
                    v
                } else {
                    std::fs::read(f).map_err(|e| {
                        format!(
                            "::::: cannot read {}: {e}",
                            std::path::Path::new(f).display()
                        )
                    })?
                };
                values.extend(records(&data, delim));
            }
        } else {
            values.extend(g.values.iter().map(|v| v.as_bytes().to_vec()));
        }
        if g.linked && i > 0 {
            rows = rows
                .into_iter()
                .zip(values)
                .map(|(mut r, v)| {
                    r.push(v);
                    r
                })
                .collect();
        } else {
            let mut next = Vec::with_capacity(rows.len() * values.len());
            for r in &rows {
                for v in &values {
                    let mut r = r.clone();
                    r.push(v.clone());
                    next.push(r);
                }
            }
            rows = next;
        }
    }
    if groups.is_empty() {
        rows.clear();
    }
    Ok(rows)
}

/// The records of `data`, each ended by `delim` (the last one may lack it).
pub fn records(data: &[u8], delim: u8) -> impl Iterator<Item = Vec<u8>> + '_ {
    let body = data.strip_suffix(&[delim]).unwrap_or(data);
    let empty = data.is_empty();
    body.split(move |&b| b == delim)
        .filter(move |_| !empty)
        .map(<[u8]>::to_vec)
}

/// The command given as words, as parallel builds it: the words joined by spaces (the
/// shell reads them again), or with `quote` (`-q`) each word quoted so that the shell
/// reads it as one word, replacement strings kept. Without any replacement string, ` {}`
/// is appended.
pub fn command_text(words: &[OsString], quote: bool) -> Result<String, String> {
    let mut parts = Vec::new();
    for w in words {
        let w = w
            .to_str()
            .ok_or_else(|| format!("the command word {w:?} is not UTF-8"))?;
        if quote {
            let t = crate::template::Template::parse(w);
            let mut out = Vec::new();
            for p in &t.parts {
                match p {
                    crate::template::Part::Text(text) => {
                        out.extend(crate::template::shell_quote(text));
                    }
                    other => out.extend(
                        crate::template::Template {
                            parts: vec![other.clone()],
                        }
                        .source(),
                    ),
                }
            }
            if out.is_empty() {
                out.extend_from_slice(b"''");
            }
            parts.push(String::from_utf8(out).map_err(|e| e.to_string())?);
        } else {
            parts.push(w.to_string());
        }
    }
    let mut cmd = parts.join(" ");
    if !crate::template::Template::parse(&cmd).uses_args() {
        cmd.push_str(" {}");
    }
    Ok(cmd)
}

/// `-j`: `N`, `N%` of the CPUs, `+N` / `-N` CPUs more or less, `0` as many as there are
/// inputs (here: 65,536), or a file holding one of these ([`jobs_file`]; read here for the
/// start, and again while the run goes on by `live`).
pub fn jobs(text: &str, cpus: usize) -> Result<usize, String> {
    if let Some(t) = jobs_file(text) {
        let bad = |why: &str| format!("--jobs `{}`: {why}", text.escape_debug());
        let content = std::fs::read_to_string(t).map_err(|e| bad(&e.to_string()))?;
        // The file's text is a number, never another file (a file naming itself would
        // never end).
        return jobs_value(content.trim(), cpus).map_err(|e| {
            format!(
                "{e} (read from the file `{}`)",
                t.to_string_lossy().escape_debug()
            )
        });
    }
    jobs_value(text.trim(), cpus)
}

/// The file `-j`'s value names, when it names one (an existing file wins over a number).
pub fn jobs_file(text: &str) -> Option<&std::path::Path> {
    let t = std::path::Path::new(text.trim());
    (!t.as_os_str().is_empty() && t.is_file()).then_some(t)
}

/// `-j`'s value as text: `N`, `N%`, `+N`, `-N` or `0`.
pub fn jobs_value(text: &str, cpus: usize) -> Result<usize, String> {
    let bad = |why: &str| format!("--jobs `{}`: {why}", text.escape_debug());
    let t = text.trim();
    let num = |s: &str| -> Result<i64, String> {
        s.parse::<i64>()
            .map_err(|_| bad("is not N, N%, +N, -N or a file"))
    };
    let n: i64 = if let Some(p) = t.strip_suffix('%') {
        let p = num(p)?;
        (cpus as i64).saturating_mul(p) / 100
    } else if let Some(x) = t.strip_prefix('+') {
        (cpus as i64).saturating_add(num(x)?)
    } else if t.starts_with('-') {
        (cpus as i64).saturating_add(num(t)?)
    } else {
        match num(t)? {
            0 => 65_536,
            n => n,
        }
    };
    if n > 65_536 {
        return Err(bad("is more than 65536 jobs"));
    }
    Ok(n.max(1) as usize)
}

/// When `--halt` ends a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Halt {
    /// `now`: kill the running jobs; `soon`: let them finish, start nothing new.
    pub now: bool,
    /// Count successes (`success=`) instead of failures (`fail=`).
    pub on_success: bool,
    pub limit: Limit,
}

/// A count, or a percentage of the jobs done so far (counted from 3 jobs on, as parallel).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Count(u64),
    Percent(f64),
}

impl Halt {
    /// `now,fail=1`, `soon,success=50%`, `never`, and parallel's numeric forms (`0`: never,
    /// `1`: soon,fail=1, `2`: now,fail=1).
    pub fn parse(text: &str) -> Result<Option<Halt>, String> {
        let bad = |why: &str| format!("--halt `{}`: {why}", text.escape_debug());
        match text.trim() {
            "never" | "0" => return Ok(None),
            "1" => return Halt::parse("soon,fail=1"),
            "2" => return Halt::parse("now,fail=1"),
            _ => {}
        }
        let (when, cond) = text
            .split_once(',')
            .ok_or_else(|| bad("is not like `now,fail=1` or `soon,success=50%`"))?;
        let now = match when.trim() {
            "now" => true,
            "soon" => false,
            _ => return Err(bad("must start with `now` or `soon`")),
        };
        let (what, n) = cond
            .split_once('=')
            .ok_or_else(|| bad("needs `fail=N`, `success=N` or `done=N`"))?;
        let on_success = match what.trim() {
            "fail" => false,
            "success" => true,
            _ => return Err(bad("counts `fail` or `success`")),
        };
        let n = n.trim();
        let limit = if let Some(p) = n.strip_suffix('%') {
            let p: f64 = p.parse().map_err(|_| bad("has a bad percentage"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad("percentage must be more than 0 and at most 100"));
            }
            Limit::Percent(p)
        } else {
            let c: u64 = n.parse().map_err(|_| bad("has a bad count"))?;
            if c == 0 {
                return Err(bad("count must be at least 1"));
            }
            Limit::Count(c)
        };
        Ok(Some(Halt {
            now,
            on_success,
            limit,
        }))
    }

    /// Whether `hits` (failures or successes) of `done` jobs reach the limit.
    pub fn reached(&self, hits: u64, done: u64) -> bool {
        match self.limit {
            Limit::Count(c) => hits >= c,
            Limit::Percent(p) => done >= 3 && hits as f64 * 100.0 >= p * done as f64,
        }
    }
}

/// `--timeout`: seconds (`30`, `1.5`, or with a unit), or `N%` of the median run time of
/// the jobs that succeeded so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timeout {
    Fixed(Duration),
    Percent(f64),
}

pub fn timeout(text: &str) -> Result<Timeout, String> {
    let bad = |why: &str| format!("--timeout `{}` {why}", text.escape_debug());
    if let Some(p) = text.trim().strip_suffix('%') {
        let p: f64 = p.parse().map_err(|_| bad("is not a percentage"))?;
        if !(p > 100.0 && p <= 1_000_000.0) {
            return Err(bad(
                "must be more than 100% (a job may take longer than the median)",
            ));
        }
        return Ok(Timeout::Percent(p));
    }
    let d = crate::spec::parse_duration(text).map_err(bad)?;
    if d.is_zero() {
        return Err(bad("must be more than zero"));
    }
    Ok(Timeout::Fixed(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn groups_combine_and_link() {
        let (before, groups) = split_groups(os(&[
            "-j2", "echo", ":::", "a", "b", ":::", "1", "2", ":::+", "x", "y", "z",
        ]));
        assert_eq!(before, os(&["-j2", "echo"]));
        let t = table(&groups, b'\n').unwrap();
        let t: Vec<String> = t
            .iter()
            .map(|r| String::from_utf8(r.join(&b' ')).unwrap())
            .collect();
        // a×(1,2) then b×(1,2), the linked group paired with that order.
        assert_eq!(t, ["a 1 x", "a 2 y", "b 1 z"]);
        let (_, groups) = split_groups(os(&["echo", ":::", "--help", "-x"]));
        assert_eq!(table(&groups, b'\n').unwrap().len(), 2);
    }

    #[test]
    fn records_split_at_the_delimiter() {
        let r: Vec<Vec<u8>> = records(b"a\0b c\0\0", 0).collect();
        assert_eq!(r, [b"a".to_vec(), b"b c".to_vec(), b"".to_vec()]);
        assert_eq!(records(b"", b'\n').count(), 0);
        assert_eq!(records(b"x", b'\n').count(), 1);
    }

    #[test]
    fn command_words_and_quoting() {
        assert_eq!(
            command_text(&os(&["echo", "a b", "{}"]), false).unwrap(),
            "echo a b {}"
        );
        assert_eq!(
            command_text(&os(&["echo", "a b", "{}"]), true).unwrap(),
            "echo 'a b' {}"
        );
        assert_eq!(command_text(&os(&["gzip"]), false).unwrap(), "gzip {}");
    }

    #[test]
    fn jobs_forms() {
        assert_eq!(jobs("4", 8), Ok(4));
        assert_eq!(jobs("50%", 8), Ok(4));
        assert_eq!(jobs("+2", 8), Ok(10));
        assert_eq!(jobs("-2", 8), Ok(6));
        assert_eq!(jobs("-20", 8), Ok(1));
        assert_eq!(jobs("0", 8), Ok(65_536));
        assert!(jobs("x", 8).unwrap_err().contains("--jobs `x`"));
        assert!(jobs("99999999", 8).is_err());
        // A file names the number; a file naming itself is an error, not a recursion.
        let dir = tempfile::tempdir().unwrap();
        let (four, itself) = (dir.path().join("four"), dir.path().join("itself"));
        std::fs::write(&four, "4\n").unwrap();
        std::fs::write(&itself, itself.to_str().unwrap()).unwrap();
        assert_eq!(jobs(four.to_str().unwrap(), 8), Ok(4));
        let e = jobs(itself.to_str().unwrap(), 8).unwrap_err();
        assert!(
            e.contains("is not N") && e.contains("read from the file"),
            "{e}"
        );
    }

    #[test]
    fn halt_forms() {
        let h = Halt::parse("now,fail=1").unwrap().unwrap();
        assert!(h.now && !h.on_success && h.reached(1, 1));
        let h = Halt::parse("soon,success=50%").unwrap().unwrap();
        assert!(!h.reached(1, 2) && h.reached(2, 4));
        assert_eq!(Halt::parse("never").unwrap(), None);
        assert!(Halt::parse("later,fail=1").is_err());
        assert!(Halt::parse("now,fail=0").is_err());
        assert!(Halt::parse("now,fail=NaN%").is_err());
    }

    #[test]
    fn timeout_forms() {
        assert_eq!(timeout("2"), Ok(Timeout::Fixed(Duration::from_secs(2))));
        assert_eq!(timeout("200%"), Ok(Timeout::Percent(200.0)));
        assert!(timeout("50%").is_err());
        assert!(timeout("0").is_err());
        assert!(timeout("inf").is_err());
    }
}
