//! The pipe text, parsed into stages with the byte span of everything, so that any later
//! error can point at the spot.
//!
//! ```text
//! pipe   := stage ( '|' stage )* [ '|' 'branch' [ '|' ] arm+ ]
//! arm    := LABEL ':' stage ( '|' stage )*      -- arms follow each other with or without '|'
//! stage  := NAME [ '(' [ arg ( ',' arg )* ] ')' ]
//! arg    := "double quoted" | 'single quoted' | word
//! word   := any characters but blanks and , ( ) | " '
//! ```
//!
//! Nothing here trusts the text: every path ends in a stage list or a [`ParseError`] with a
//! position, and nothing indexes a string except at positions the scan itself produced.

use std::fmt;

/// A byte range of the pipe text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// One argument of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    /// The text, with quotes removed and escapes applied.
    pub text: String,
    /// Whether it was quoted (a quoted argument is never read as a number or a duration).
    pub quoted: bool,
    /// Where it is.
    pub span: Span,
}

/// One stage: a name and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The stage's name as written.
    pub name: String,
    /// Where the name is.
    pub span: Span,
    /// Its arguments (empty without parentheses).
    pub args: Vec<Arg>,
}

/// A labelled continuation after `branch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    /// The label (`success`, `error`, ...).
    pub label: String,
    /// Where the label is.
    pub span: Span,
    /// Its stages.
    pub stages: Vec<Stage>,
}

/// A parsed pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipe {
    /// The stages before any `branch`.
    pub stages: Vec<Stage>,
    /// The `branch` stage and its arms, if there is one.
    pub branch: Option<(Stage, Vec<Arm>)>,
}

/// A problem in the pipe text, at a byte position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Byte offset of the problem.
    pub pos: usize,
    /// What is wrong, naming the stage and argument when there is one.
    pub message: String,
}

impl ParseError {
    /// An error at `pos`.
    pub fn new(pos: usize, message: impl Into<String>) -> Self {
        ParseError {
            pos,
            message: message.into(),
        }
    }

    /// The message, the line of the pipe it is on and a caret under the position.
    pub fn render(&self, text: &str) -> String {
        let pos = floor_char_boundary(text, self.pos.min(text.len()));
        let line_start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
        let line_no = text[..pos].matches('\n').count() + 1;
        let col = text[line_start..pos].chars().count();
        // Tabs and control characters would shift the caret: show them as spaces.
        let shown: String = text[line_start..line_end]
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        format!(
            "error: {} (at line {line_no}, column {})\n  {shown}\n  {}^",
            self.message,
            col + 1,
            " ".repeat(col)
        )
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte {})", self.message, self.pos)
    }
}

impl std::error::Error for ParseError {}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Parses a pipe.
pub fn parse(text: &str) -> Result<Pipe, ParseError> {
    let mut p = Parser { text, pos: 0 };
    p.pipe()
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn is_word_char(c: char) -> bool {
    !(c.is_whitespace() || matches!(c, ',' | '(' | ')' | '|' | '"' | '\''))
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn skip_blanks(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    fn describe_here(&self) -> String {
        match self.peek() {
            None => "the end of the pipe".to_string(),
            Some(c) => format!("`{c}`"),
        }
    }

    /// A label is a name directly followed by `:`.
    fn at_label(&self) -> bool {
        let rest = &self.text[self.pos..];
        let mut chars = rest.char_indices();
        match chars.next() {
            Some((_, c)) if is_name_start(c) => {}
            _ => return false,
        }
        for (_, c) in chars {
            if is_name_char(c) {
                continue;
            }
            return c == ':';
        }
        false
    }

    fn pipe(&mut self) -> Result<Pipe, ParseError> {
        let mut stages = Vec::new();
        loop {
            self.skip_blanks();
            if self.at_label() {
                return Err(ParseError::new(
                    self.pos,
                    "a labelled continuation (`label:`) may only follow `branch`",
                ));
            }
            let stage = self.stage()?;
            self.skip_blanks();
            if stage.name == "branch" {
                let arms = self.arms(&stage)?;
                return Ok(Pipe {
                    stages,
                    branch: Some((stage, arms)),
                });
            }
            stages.push(stage);
            match self.peek() {
                None => {
                    return Ok(Pipe {
                        stages,
                        branch: None,
                    });
                }
                Some('|') => {
                    self.bump();
                }
                Some(_) => {
                    let last = &stages[stages.len() - 1].name;
                    return Err(ParseError::new(
                        self.pos,
                        format!(
                            "expected `|` after stage `{last}`, found {}",
                            self.describe_here()
                        ),
                    ));
                }
            }
        }
    }

    fn arms(&mut self, branch: &Stage) -> Result<Vec<Arm>, ParseError> {
        if self.peek() == Some('|') {
            self.bump();
            self.skip_blanks();
        }
        let mut arms: Vec<Arm> = Vec::new();
        loop {
            if self.peek().is_none() {
                if arms.is_empty() {
                    return Err(ParseError::new(
                        self.pos,
                        "`branch` needs at least one labelled continuation, like `error:retry(3) success:print`",
                    ));
                }
                return Ok(arms);
            }
            if !self.at_label() {
                return Err(ParseError::new(
                    self.pos,
                    format!(
                        "expected a label like `success:` or `error:` after `{}`, found {}",
                        branch.name,
                        self.describe_here()
                    ),
                ));
            }
            let start = self.pos;
            let label = self.name();
            let span = Span {
                start,
                end: self.pos,
            };
            self.bump(); // the ':'
            let mut stages = Vec::new();
            loop {
                self.skip_blanks();
                if self.at_label() {
                    return Err(ParseError::new(
                        self.pos,
                        format!("continuation `{label}:` is empty before the next label"),
                    ));
                }
                let stage = self.stage()?;
                if stage.name == "branch" {
                    return Err(ParseError::new(
                        stage.span.start,
                        "a continuation cannot `branch` again",
                    ));
                }
                stages.push(stage);
                self.skip_blanks();
                match self.peek() {
                    None => break,
                    Some('|') => {
                        self.bump();
                        self.skip_blanks();
                        if self.at_label() {
                            break;
                        }
                    }
                    Some(_) if self.at_label() => break,
                    Some(_) => {
                        return Err(ParseError::new(
                            self.pos,
                            format!(
                                "expected `|` or a label after stage `{}`, found {}",
                                stages[stages.len() - 1].name,
                                self.describe_here()
                            ),
                        ));
                    }
                }
            }
            arms.push(Arm {
                label,
                span,
                stages,
            });
        }
    }

    fn name(&mut self) -> String {
        let start = self.pos;
        if self.peek().is_some_and(is_name_start) {
            self.bump();
            while self.peek().is_some_and(is_name_char) {
                self.bump();
            }
        }
        self.text[start..self.pos].to_string()
    }

    fn stage(&mut self) -> Result<Stage, ParseError> {
        let start = self.pos;
        match self.peek() {
            None => {
                return Err(ParseError::new(
                    self.pos,
                    "expected a stage after `|`, found the end of the pipe",
                ));
            }
            Some('|') => return Err(ParseError::new(self.pos, "empty stage between two `|`")),
            Some(c) if !is_name_start(c) => {
                return Err(ParseError::new(
                    self.pos,
                    format!("expected a stage name (like `sh` or `lines`), found `{c}`"),
                ));
            }
            Some(_) => {}
        }
        let name = self.name();
        let span = Span {
            start,
            end: self.pos,
        };
        let save = self.pos;
        self.skip_blanks();
        let mut args = Vec::new();
        if self.peek() == Some('(') {
            let open = self.pos;
            self.bump();
            self.skip_blanks();
            if self.peek() == Some(')') {
                self.bump();
            } else {
                loop {
                    self.skip_blanks();
                    args.push(self.arg(&name, open)?);
                    self.skip_blanks();
                    match self.peek() {
                        Some(',') => {
                            self.bump();
                        }
                        Some(')') => {
                            self.bump();
                            break;
                        }
                        None => {
                            return Err(ParseError::new(
                                open,
                                format!("`(` of stage `{name}` is never closed"),
                            ));
                        }
                        Some(c) => {
                            return Err(ParseError::new(
                                self.pos,
                                format!(
                                    "expected `,` or `)` in the arguments of `{name}`, found `{c}` (quote an argument that holds blanks or punctuation)"
                                ),
                            ));
                        }
                    }
                }
            }
        } else {
            self.pos = save;
        }
        Ok(Stage { name, span, args })
    }

    fn arg(&mut self, stage: &str, open: usize) -> Result<Arg, ParseError> {
        let start = self.pos;
        match self.peek() {
            Some(q @ ('"' | '\'')) => {
                self.bump();
                let mut text = String::new();
                loop {
                    match self.bump() {
                        None => {
                            return Err(ParseError::new(
                                start,
                                format!("unterminated quote in the arguments of `{stage}`"),
                            ));
                        }
                        Some(c) if c == q => break,
                        // In double quotes `\"` and `\\` are escapes; any other backslash
                        // stays, so that regexes (`"\d+"`) read as written.
                        Some('\\') if q == '"' => match self.peek() {
                            Some(c @ ('"' | '\\')) => {
                                self.bump();
                                text.push(c);
                            }
                            _ => text.push('\\'),
                        },
                        Some(c) => text.push(c),
                    }
                }
                Ok(Arg {
                    text,
                    quoted: true,
                    span: Span {
                        start,
                        end: self.pos,
                    },
                })
            }
            Some(c) if is_word_char(c) => {
                while self.peek().is_some_and(is_word_char) {
                    self.bump();
                }
                Ok(Arg {
                    text: self.text[start..self.pos].to_string(),
                    quoted: false,
                    span: Span {
                        start,
                        end: self.pos,
                    },
                })
            }
            None => Err(ParseError::new(
                open,
                format!("`(` of stage `{stage}` is never closed"),
            )),
            Some(c) => Err(ParseError::new(
                self.pos,
                format!("expected an argument of `{stage}`, found `{c}`"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_pipe_with_fork_and_branch() {
        let p = parse("generator | fork(10) | task1 | task2 | branch | error:retry success:print")
            .unwrap();
        let names: Vec<_> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["generator", "fork", "task1", "task2"]);
        let (b, arms) = p.branch.unwrap();
        assert_eq!(b.name, "branch");
        assert_eq!(arms.len(), 2);
        assert_eq!(arms[0].label, "error");
        assert_eq!(arms[0].stages[0].name, "retry");
        assert_eq!(arms[1].label, "success");
    }

    #[test]
    fn arguments_quoted_and_bare() {
        let p = parse(r#"sh("curl -fsS {} \"x\"", 'a\b') | rate(20/s, 5) | retry(5, 200ms..10s)"#)
            .unwrap();
        assert_eq!(p.stages[0].args[0].text, r#"curl -fsS {} "x""#);
        assert_eq!(p.stages[0].args[1].text, r"a\b");
        assert_eq!(p.stages[1].args[0].text, "20/s");
        assert_eq!(p.stages[2].args[1].text, "200ms..10s");
        assert!(!p.stages[2].args[1].quoted);
    }

    #[test]
    fn arms_with_pipes_inside() {
        let p = parse("seq(3) | branch error:retry(2) | jsonl(r.jsonl) | success: print").unwrap();
        let (_, arms) = p.branch.unwrap();
        assert_eq!(arms[0].stages.len(), 2);
        assert_eq!(arms[1].label, "success");
        assert_eq!(arms[1].stages[0].name, "print");
    }

    #[test]
    fn errors_point_at_the_spot() {
        let e = parse("seq(3) | sh(\"x\" | print").unwrap_err();
        assert_eq!(e.pos, 16);
        let e = parse("seq(3) || print").unwrap_err();
        assert_eq!(e.pos, 8);
        assert!(e.message.contains("empty stage"));
        let e = parse("seq(3) | sh(\"x").unwrap_err();
        assert_eq!(e.pos, 12);
        let r = e.render("seq(3) | sh(\"x");
        assert!(r.ends_with("\n  seq(3) | sh(\"x\n              ^"), "{r}");
    }
}
