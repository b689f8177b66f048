//! A pipe with no task — `lines(FILE) | filter(RE) | reject(RE) | print` — run as a byte
//! stream: the input read in 256 KiB chunks, lines found with `memchr`, the lines kept
//! copied into one output buffer, one write per chunk. No item, no `String` per line, no
//! runtime: the same work `grep` does, at about its speed, in constant memory.
//!
//! With one `filter`, the regex is searched over the whole chunk in multi-line mode (as
//! grep does) and each line it lands in is checked on its own, so lines without a match
//! cost nothing; a pattern whose meaning depends on where the text starts (`\A`, `\z`,
//! inline flags) is checked line by line instead.

use std::io::{Read, Write};

use regex::bytes::Regex;

use crate::spec::{Plan, Sink, Source, Step};

/// The filters and where the lines go, when the plan is one this module runs.
pub struct LineFilter {
    input: Option<std::path::PathBuf>,
    filters: Vec<(Regex, bool)>,
    /// The single `filter`'s regex in multi-line mode, when the chunk search applies.
    chunk_re: Option<Regex>,
    sink: Option<Sink>,
}

/// What a run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub lines: u64,
    pub kept: u64,
}

impl LineFilter {
    /// The byte-stream form of `plan`, if it has one: lines in, only filters, a print or
    /// file sink or discard.
    pub fn of(plan: &Plan) -> Option<LineFilter> {
        let Source::Lines(input) = &plan.source else {
            return None;
        };
        if plan.branched || matches!(plan.main.sink, Some(Sink::Jsonl(_))) {
            return None;
        }
        let mut filters = Vec::new();
        for s in &plan.main.steps {
            match s {
                Step::Filter { re, keep } => filters.push((re.clone(), *keep)),
                _ => return None,
            }
        }
        let chunk_re = match filters.as_slice() {
            [(re, true)] => {
                let p = re.as_str();
                let anchored_to_text = p.contains("\\A") || p.contains("\\z") || p.contains("(?");
                if anchored_to_text {
                    None
                } else {
                    regex::bytes::RegexBuilder::new(&format!("(?m:{p})"))
                        .size_limit(1 << 20)
                        .dfa_size_limit(1 << 20)
                        .build()
                        .ok()
                }
            }
            _ => None,
        };
        Some(LineFilter {
            input: input.clone(),
            filters,
            chunk_re,
            sink: plan.main.sink.clone(),
        })
    }

    fn keep(&self, line: &[u8]) -> bool {
        self.filters
            .iter()
            .all(|(re, keep)| re.is_match(line) == *keep)
    }

    /// Runs to the end of the input.
    pub fn run(&self) -> Result<Counts, String> {
        let mut input: Box<dyn Read> = match &self.input {
            None => Box::new(std::io::stdin().lock()),
            Some(p) => Box::new(
                std::fs::File::open(p)
                    .map_err(|e| format!("stage `lines`: cannot open {}: {e}", p.display()))?,
            ),
        };
        let stdout = std::io::stdout();
        let mut out: Box<dyn Write> = match &self.sink {
            None | Some(Sink::Print) => Box::new(stdout.lock()),
            Some(Sink::Discard) => Box::new(std::io::sink()),
            Some(Sink::File(p)) | Some(Sink::Jsonl(p)) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("cannot open {} for writing: {e}", p.display()))?,
            ),
        };
        let mut counts = Counts::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut kept: Vec<u8> = Vec::with_capacity(256 * 1024);
        let mut filled = 0;
        loop {
            if filled == buf.len() {
                // A line longer than the buffer: grow for it.
                buf.resize(buf.len() * 2, 0);
            }
            let n = input
                .read(&mut buf[filled..])
                .map_err(|e| format!("reading input: {e}"))?;
            let end = filled + n;
            let done = n == 0;
            let upto = if done {
                end
            } else {
                match memchr::memrchr(b'\n', &buf[..end]) {
                    Some(i) => i + 1,
                    None => {
                        filled = end;
                        continue;
                    }
                }
            };
            self.chunk(&buf[..upto], &mut kept, &mut counts);
            if !kept.is_empty() {
                out.write_all(&kept)
                    .map_err(|e| format!("writing output: {e}"))?;
                kept.clear();
            }
            if done {
                break;
            }
            buf.copy_within(upto..end, 0);
            filled = end - upto;
        }
        out.flush().map_err(|e| format!("writing output: {e}"))?;
        Ok(counts)
    }

    /// The kept lines of `chunk` (whole lines; the last may lack its `\n`), each with a
    /// `\n`, appended to `kept`.
    fn chunk(&self, chunk: &[u8], kept: &mut Vec<u8>, counts: &mut Counts) {
        if chunk.is_empty() {
            return;
        }
        counts.lines += memchr::memchr_iter(b'\n', chunk).count() as u64
            + u64::from(chunk.last() != Some(&b'\n'));
        let mut push = |line: &[u8], counts: &mut Counts| {
            kept.extend_from_slice(line);
            kept.push(b'\n');
            counts.kept += 1;
        };
        let line_end =
            |from: usize| memchr::memchr(b'\n', &chunk[from..]).map_or(chunk.len(), |i| from + i);
        match &self.chunk_re {
            Some(re) => {
                let mut pos = 0;
                while pos < chunk.len() {
                    let Some(m) = re.find_at(chunk, pos) else {
                        break;
                    };
                    let start =
                        memchr::memrchr(b'\n', &chunk[pos..m.start()]).map_or(pos, |i| pos + i + 1);
                    let end = line_end(m.start());
                    let line = &chunk[start..end];
                    if self.keep(line) {
                        push(line, counts);
                    }
                    pos = end + 1;
                }
            }
            None => {
                let mut pos = 0;
                while pos < chunk.len() {
                    let end = line_end(pos);
                    let line = &chunk[pos..end];
                    if self.keep(line) {
                        push(line, counts);
                    }
                    pos = end + 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lf(filters: &[(&str, bool)], chunked: bool) -> LineFilter {
        let filters: Vec<(Regex, bool)> = filters
            .iter()
            .map(|(p, k)| (Regex::new(p).unwrap(), *k))
            .collect();
        let chunk_re = (chunked && filters.len() == 1)
            .then(|| Regex::new(&format!("(?m:{})", filters[0].0.as_str())).unwrap());
        LineFilter {
            input: None,
            filters,
            chunk_re,
            sink: None,
        }
    }

    fn kept(f: &LineFilter, text: &[u8]) -> (Vec<u8>, Counts) {
        let mut out = Vec::new();
        let mut c = Counts::default();
        f.chunk(text, &mut out, &mut c);
        (out, c)
    }

    #[test]
    fn chunk_search_and_line_by_line_agree() {
        let text = b"17\n27\n3\n77x\n\n7\nlast7";
        for chunked in [true, false] {
            let (out, c) = kept(&lf(&[("7$", true)], chunked), text);
            assert_eq!(out, b"17\n27\n7\nlast7\n", "chunked {chunked}");
            assert_eq!(c, Counts { lines: 7, kept: 4 });
        }
        // A match that would span lines in the chunk is checked on its line.
        let (out, _) = kept(&lf(&[(r"3\s+7", true)], true), b"3\n77x\n3 7\n");
        assert_eq!(out, b"3 7\n");
        let (out, _) = kept(&lf(&[("7", true), ("^2", false)], false), text);
        assert_eq!(out, b"17\n77x\n7\nlast7\n");
    }

    #[test]
    fn bytes_that_are_not_utf8_pass() {
        let (out, _) = kept(&lf(&[("x", true)], true), b"\xff\xfex\n\xc3\n");
        assert_eq!(out, b"\xff\xfex\n");
    }
}
