//! What the end-to-end tests share: starting a program with its stdin given.

// Each test binary uses the part it needs.
#![allow(dead_code)]

pub mod keyed;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// The built `flowline`.
pub const BIN: &str = env!("CARGO_BIN_EXE_flowline");

/// `cmd` started in `dir` with `args`, `stdin` written to it and closed, its stdout and
/// stderr piped.
pub fn start_with(mut cmd: Command, dir: &Path, args: &[&str], stdin: &[u8]) -> Child {
    let mut child = cmd
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{:?} runs: {e}", cmd.get_program()));
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("write stdin");
    child
}

/// `flowline` started in `dir`.
pub fn start(dir: &Path, args: &[&str], stdin: &str) -> Child {
    start_with(Command::new(BIN), dir, args, stdin.as_bytes())
}

/// `flowline` run in `dir` to its end.
pub fn flowline(dir: &Path, args: &[&str], stdin: &str) -> Output {
    start(dir, args, stdin)
        .wait_with_output()
        .expect("flowline ends")
}

/// The path of the next HTTP/1.1 request on a keep-alive connection, its headers and body
/// read (`None` when the client closed it).
pub fn read_request(r: &mut impl std::io::BufRead) -> Option<String> {
    let mut request = String::new();
    if r.read_line(&mut request).unwrap_or(0) == 0 {
        return None;
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 {
            return None;
        }
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    let _ = r.read_exact(&mut body);
    Some(request.split_whitespace().nth(1).unwrap_or("/").to_string())
}
