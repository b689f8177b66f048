//! GNU parallel's replacement strings in a command: `{}` `{.}` `{/}` `{//}` `{/.}` `{#}`
//! `{%}` and `{n}` (with the same suffixes: `{2.}`, `{1/}`, ...), over the job's arguments
//! (one input, a `batch`, the columns of `--colsep`, or one value per `:::` group).
//!
//! A value goes into the shell's command line quoted only where the shell needs it, as
//! parallel does: `5` stays `5` (so `echo $(({} + 1))` works), `a b` becomes `'a b'`, and
//! any byte the shell would read (`'`, `$`, `;`, ...) is inside single quotes. Text in
//! braces that is not a replacement string (`{a}`, `{ }`) is left as written.

/// One part of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(Vec<u8>),
    /// `{}` or `{n}` (`arg: None` for all arguments), with a transformation.
    Arg {
        arg: Option<usize>,
        how: How,
    },
    /// `{#}`: the job's number.
    Seq,
    /// `{%}`: the job's slot.
    Slot,
}

/// What a replacement string keeps of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// `{}`: the value.
    Whole,
    /// `{.}`: without its extension.
    NoExt,
    /// `{/}`: its base name.
    Base,
    /// `{//}`: its directory.
    Dir,
    /// `{/.}`: its base name without extension.
    BaseNoExt,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<Part>,
}

fn how_of(s: &str) -> Option<How> {
    Some(match s {
        "" => How::Whole,
        "." => How::NoExt,
        "/" => How::Base,
        "//" => How::Dir,
        "/." => How::BaseNoExt,
        _ => return None,
    })
}

impl Template {
    /// Parses `cmd`; every `{...}` that is not a replacement string stays text.
    pub fn parse(cmd: &str) -> Template {
        let mut parts = Vec::new();
        let mut text = Vec::new();
        let b = cmd.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'{' {
                if let Some(len) = b[i + 1..].iter().position(|&c| c == b'}') {
                    let inner = &cmd[i + 1..i + 1 + len];
                    if let Some(part) = Self::replacement(inner) {
                        if !text.is_empty() {
                            parts.push(Part::Text(std::mem::take(&mut text)));
                        }
                        parts.push(part);
                        i += len + 2;
                        continue;
                    }
                }
            }
            text.push(b[i]);
            i += 1;
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Template { parts }
    }

    fn replacement(inner: &str) -> Option<Part> {
        match inner {
            "#" => return Some(Part::Seq),
            "%" => return Some(Part::Slot),
            _ => {}
        }
        let digits = inner.bytes().take_while(u8::is_ascii_digit).count();
        let (num, rest) = inner.split_at(digits);
        let how = how_of(rest)?;
        if num.is_empty() {
            return Some(Part::Arg { arg: None, how });
        }
        let n: usize = num.parse().ok()?;
        (n >= 1).then_some(Part::Arg { arg: Some(n), how })
    }

    /// The command as written.
    pub fn source(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t),
                Part::Seq => out.extend_from_slice(b"{#}"),
                Part::Slot => out.extend_from_slice(b"{%}"),
                Part::Arg { arg, how } => {
                    out.push(b'{');
                    if let Some(n) = arg {
                        out.extend_from_slice(n.to_string().as_bytes());
                    }
                    out.extend_from_slice(match how {
                        How::Whole => b"",
                        How::NoExt => b".",
                        How::Base => b"/",
                        How::Dir => b"//",
                        How::BaseNoExt => b"/.",
                    });
                    out.push(b'}');
                }
            }
        }
        out
    }

    /// Whether the command names its arguments (without, the argument is appended, as
    /// parallel does, or given on stdin by `sh(..)`).
    pub fn uses_args(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Arg { .. }))
    }

    /// Whether there is any replacement string (`{#}` and `{%}` included).
    pub fn has_replacements(&self) -> bool {
        self.parts.iter().any(|p| !matches!(p, Part::Text(_)))
    }

    /// The command line for a job, for `sh -c`: each value quoted as the shell needs.
    pub fn render(&self, args: &[Vec<u8>], seq: u64, slot: usize) -> Vec<u8> {
        self.render_with(args, seq, slot, shell_quote)
    }

    /// The command with values as they are (a URL, a dry run's echo of a direct command).
    pub fn render_plain(&self, args: &[Vec<u8>], seq: u64, slot: usize) -> Vec<u8> {
        self.render_with(args, seq, slot, |v| v.to_vec())
    }

    /// The command with each value passed through `quote`.
    pub fn render_with(
        &self,
        args: &[Vec<u8>],
        seq: u64,
        slot: usize,
        quote: impl Fn(&[u8]) -> Vec<u8>,
    ) -> Vec<u8> {
        self.render_joined(args, seq, slot, b" ", quote)
    }

    /// [`render_with`](Self::render_with), with `{}` joining several values by `sep`
    /// (a URL's `{}` takes `1,2,3`, a request body's one value a line).
    pub fn render_joined(
        &self,
        args: &[Vec<u8>],
        seq: u64,
        slot: usize,
        sep: &[u8],
        quote: impl Fn(&[u8]) -> Vec<u8>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t),
                Part::Seq => out.extend_from_slice(seq.to_string().as_bytes()),
                Part::Slot => out.extend_from_slice(slot.to_string().as_bytes()),
                Part::Arg { arg: None, how } => {
                    for (i, a) in args.iter().enumerate() {
                        if i > 0 {
                            out.extend_from_slice(sep);
                        }
                        out.extend(quote(&transform(a, *how)));
                    }
                }
                Part::Arg { arg: Some(n), how } => {
                    if let Some(a) = args.get(n - 1) {
                        out.extend(quote(&transform(a, *how)));
                    }
                }
            }
        }
        out
    }

    /// The words of a command that runs without a shell: text split at blanks, and each
    /// replacement string its own word (`{}` alone: one word per argument).
    pub fn words(&self, args: &[Vec<u8>], seq: u64, slot: usize) -> Vec<Vec<u8>> {
        let mut words: Vec<Vec<u8>> = Vec::new();
        let mut cur: Option<Vec<u8>> = None;
        for p in &self.parts {
            match p {
                Part::Text(t) => {
                    for &c in t {
                        if c.is_ascii_whitespace() {
                            if let Some(w) = cur.take() {
                                words.push(w);
                            }
                        } else {
                            cur.get_or_insert_with(Vec::new).push(c);
                        }
                    }
                }
                Part::Arg { arg: None, how } if cur.is_none() => {
                    words.extend(args.iter().map(|a| transform(a, *how)));
                }
                _ => {
                    let v = Template {
                        parts: vec![p.clone()],
                    }
                    .render_plain(args, seq, slot);
                    cur.get_or_insert_with(Vec::new).extend(v);
                }
            }
        }
        if let Some(w) = cur {
            words.push(w);
        }
        words
    }
}

/// A value transformed by `{.}`, `{/}`, `{//}` or `{/.}` (parallel's rules: the extension
/// is from the last `.` of the base name; `{//}` of a bare name is `.`).
pub fn transform(v: &[u8], how: How) -> Vec<u8> {
    let base_start = v.iter().rposition(|&c| c == b'/').map_or(0, |i| i + 1);
    let no_ext = |s: &[u8], from: usize| -> Vec<u8> {
        match s[from..].iter().rposition(|&c| c == b'.') {
            Some(i) if i > 0 => s[..from + i].to_vec(),
            _ => s.to_vec(),
        }
    };
    match how {
        How::Whole => v.to_vec(),
        How::NoExt => no_ext(v, base_start),
        How::Base => v[base_start..].to_vec(),
        How::Dir => {
            if base_start == 0 {
                b".".to_vec()
            } else if base_start == 1 {
                b"/".to_vec()
            } else {
                v[..base_start - 1].to_vec()
            }
        }
        How::BaseNoExt => no_ext(&v[base_start..], 0),
    }
}

/// `v` as the shell reads it back exactly: as it is when every byte is one the shell
/// takes literally, else in single quotes (`'` written as `'\''`).
pub fn shell_quote(v: &[u8]) -> Vec<u8> {
    let plain = !v.is_empty()
        && v.iter().all(|&c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'_' | b'-' | b'.' | b'/' | b':' | b'@' | b'%' | b'+' | b',' | b'='
                )
        });
    if plain {
        return v.to_vec();
    }
    let mut out = Vec::with_capacity(v.len() + 2);
    out.push(b'\'');
    for &c in v {
        if c == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(c);
        }
    }
    out.push(b'\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_joins_several_values_by_its_separator_and_quotes_nothing() {
        let args = vec![b"a b".to_vec(), b"dir/f.txt".to_vec()];
        let t = Template::parse("http://h/{}/{1}/{2/.}?n={#}");
        let url = t.render_joined(&args, 7, 0, b",", <[u8]>::to_vec);
        assert_eq!(url, b"http://h/a b,dir/f.txt/a b/f?n=7");
        let body = Template::parse("{}").render_joined(&args, 7, 0, b"\n", <[u8]>::to_vec);
        assert_eq!(body, b"a b\ndir/f.txt");
    }

    fn r(cmd: &str, args: &[&str]) -> String {
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        String::from_utf8(Template::parse(cmd).render(&args, 7, 2)).unwrap()
    }

    #[test]
    fn replacement_strings_as_parallel() {
        let a = ["dir/sub/file.tar.gz"];
        assert_eq!(r("{}", &a), "dir/sub/file.tar.gz");
        assert_eq!(r("{.}", &a), "dir/sub/file.tar");
        assert_eq!(r("{/}", &a), "file.tar.gz");
        assert_eq!(r("{//}", &a), "dir/sub");
        assert_eq!(r("{/.}", &a), "file.tar");
        assert_eq!(r("{//}", &["file"]), ".");
        assert_eq!(r("{//}", &["/file"]), "/");
        assert_eq!(r("{.}", &[".bashrc"]), ".bashrc");
        assert_eq!(r("{.}", &["a.b/c"]), "a.b/c");
        assert_eq!(r("{#} {%}", &a), "7 2");
        assert_eq!(r("{2} {1} {2/.}", &["x", "p/q.r"]), "p/q.r x q");
        assert_eq!(r("{3}", &["x"]), "");
        assert_eq!(r("{} {a} {0} { } {", &["x", "y"]), "x y {a} {0} { } {");
    }

    #[test]
    fn quotes_only_where_the_shell_needs_it() {
        assert_eq!(r("echo $(({} + 1))", &["5"]), "echo $((5 + 1))");
        assert_eq!(r("echo {}", &["a b"]), "echo 'a b'");
        assert_eq!(r("echo {}", &["it's"]), r"echo 'it'\''s'");
        assert_eq!(r("echo {}", &["$(id)"]), "echo '$(id)'");
        assert_eq!(r("echo {}", &[""]), "echo ''");
        assert_eq!(r("echo {}", &["a", "b c"]), "echo a 'b c'");
    }

    #[test]
    fn words_without_a_shell() {
        let t = Template::parse("rm -f {} x{#}");
        let args = vec![b"a b".to_vec(), b"c".to_vec()];
        assert_eq!(
            t.words(&args, 3, 1),
            [&b"rm"[..], b"-f", b"a b", b"c", b"x3"]
        );
    }
}
