//! The README's GNU parallel idioms, each run end to end with the same arguments by
//! `flowline` and, where it is installed, by GNU `parallel`: the same output bytes and the
//! same exit status.

use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;

use common::BIN;

struct Row {
    args: &'static [&'static str],
    stdin: &'static [u8],
    /// The output both must give (`None`: compared with parallel only, the bytes are
    /// computed by the row's setup).
    want: Option<&'static [u8]>,
    exit: i32,
}

fn run(prog: &str, dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut c = Command::new(prog);
    if prog == "parallel" {
        c.arg("--will-cite");
    }
    common::start_with(c, dir, args, stdin)
        .wait_with_output()
        .unwrap()
}

fn have_parallel() -> bool {
    Command::new("parallel")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn setup(dir: &Path) {
    std::fs::write(dir.join("list.txt"), "x\ny\n").unwrap();
    // Bytes that are not UTF-8, no final newline.
    let mut bin = Vec::new();
    let mut x: u32 = 7;
    for _ in 0..4 * 65536 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        bin.push((x >> 16) as u8);
    }
    std::fs::write(dir.join("random.bin"), bin).unwrap();
}

const ROWS: &[Row] = &[
    Row {
        args: &["-k", "echo", ":::", "a", "b", "c"],
        stdin: b"",
        want: Some(b"a\nb\nc\n"),
        exit: 0,
    },
    Row {
        args: &[
            "-k",
            "echo",
            "{.}",
            "{/}",
            "{//}",
            "{/.}",
            ":::",
            "dir/x.tar.gz",
            "/a.b",
            "c",
        ],
        stdin: b"",
        want: Some(b"dir/x.tar x.tar.gz dir x.tar\n/a a.b / a\nc c . c\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "echo", "{#}-{}", ":::", "a", "b"],
        stdin: b"",
        want: Some(b"1-a\n2-b\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "echo", "{2}", "{1}", ":::", "a", "b", ":::", "c", "d"],
        stdin: b"",
        want: Some(b"c a\nd a\nc b\nd b\n"),
        exit: 0,
    },
    Row {
        args: &[
            "-k", "echo", "{1}", "{2}", ":::", "a", "b", ":::+", "c", "d",
        ],
        stdin: b"",
        want: Some(b"a c\nb d\n"),
        exit: 0,
    },
    Row {
        args: &[
            "-k", "--colsep", ",", "echo", "{2}-{1}", ":::", "a,b", "x,y",
        ],
        stdin: b"",
        want: Some(b"b-a\ny-x\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "-N2", "echo", "{1}+{2}", ":::", "1", "2", "3", "4"],
        stdin: b"",
        want: Some(b"1+2\n3+4\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "-n", "2", "echo", ":::", "1", "2", "3"],
        stdin: b"",
        want: Some(b"1 2\n3\n"),
        exit: 0,
    },
    Row {
        args: &["-j1", "-k", "-X", "echo", ":::", "1", "2", "3"],
        stdin: b"",
        want: Some(b"1 2 3\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "echo", "$(({} + 1))", ":::", "5", "6"],
        stdin: b"",
        want: Some(b"6\n7\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "echo", ":::", "a b", "it's", "$(id)"],
        stdin: b"",
        want: Some(b"a b\nit's\n$(id)\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "-q", "printf", "<%s>\\n", "{}", ":::", "a b"],
        stdin: b"",
        want: Some(b"<a b>\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "--tag", "echo", "hi", ":::", "a", "b"],
        stdin: b"",
        want: Some(b"a\thi a\nb\thi b\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "--tagstring", "<{}>", "echo", ":::", "a"],
        stdin: b"",
        want: Some(b"<a>\ta\n"),
        exit: 0,
    },
    Row {
        args: &["--dry-run", "-k", "echo", "{}", ":::", "a b", "5"],
        stdin: b"",
        want: Some(b"echo 'a b'\necho 5\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "-v", "echo", ":::", "1"],
        stdin: b"",
        want: Some(b"echo 1\n1\n"),
        exit: 0,
    },
    Row {
        args: &["-j4", "-k", "echo", "in"],
        stdin: b"x\ny\n",
        want: Some(b"in x\nin y\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "-0", "echo"],
        stdin: b"a b\0c\0",
        want: Some(b"a b\nc\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "-a", "list.txt", "echo"],
        stdin: b"",
        want: Some(b"x\ny\n"),
        exit: 0,
    },
    Row {
        args: &["-k", "echo", "::::", "list.txt"],
        stdin: b"",
        want: Some(b"x\ny\n"),
        exit: 0,
    },
    // A silent job prints nothing; a missing final newline is not added.
    Row {
        args: &["-k", "true", ":::", "1", "2", "3"],
        stdin: b"",
        want: Some(b""),
        exit: 0,
    },
    Row {
        args: &["-k", "printf", "'a\\nb'", ":::", ""],
        stdin: b"",
        want: Some(b"a\nb"),
        exit: 0,
    },
    // Bytes through untouched: 256 KiB that are not UTF-8.
    Row {
        args: &["-k", "cat", ":::", "random.bin"],
        stdin: b"",
        want: None,
        exit: 0,
    },
    // Exit status: the number of failed jobs; a halting job's own code; 255 for a bad option.
    Row {
        args: &["-k", "test", "{}", "-lt", "2", ":::", "1", "2", "3"],
        stdin: b"",
        want: Some(b""),
        exit: 2,
    },
    Row {
        args: &[
            "-j1",
            "--halt",
            "now,fail=1",
            "exit",
            "{}",
            ":::",
            "0",
            "3",
            "0",
        ],
        stdin: b"",
        want: Some(b""),
        exit: 3,
    },
    Row {
        args: &[
            "-k",
            "--timeout",
            "1",
            "sleep {}; echo {}",
            ":::",
            "0.1",
            "5",
        ],
        stdin: b"",
        want: Some(b"0.1\n"),
        exit: 1,
    },
    Row {
        args: &["--no-such-option", "echo", ":::", "1"],
        stdin: b"",
        want: Some(b""),
        exit: 255,
    },
];

#[test]
fn the_readme_idioms_match_gnu_parallel() {
    let with_parallel = have_parallel();
    let mut problems = Vec::new();
    for row in ROWS {
        let d = tempfile::tempdir().unwrap();
        setup(d.path());
        let f = run(BIN, d.path(), row.args, row.stdin);
        let want: Vec<u8> = match row.want {
            Some(w) => w.to_vec(),
            None => std::fs::read(d.path().join("random.bin")).unwrap(),
        };
        if f.stdout != want || f.status.code() != Some(row.exit) {
            problems.push(format!(
                "flowline {:?}: exit {:?} (want {}), stdout {:?} (want {:?}); stderr {}",
                row.args,
                f.status.code(),
                row.exit,
                String::from_utf8_lossy(&f.stdout[..f.stdout.len().min(200)]),
                String::from_utf8_lossy(&want[..want.len().min(200)]),
                String::from_utf8_lossy(&f.stderr)
            ));
        }
        if with_parallel {
            let d = tempfile::tempdir().unwrap();
            setup(d.path());
            let p = run("parallel", d.path(), row.args, row.stdin);
            // parallel prints its usage on stdout after a bad option: the status is compared.
            let same_out = p.stdout == f.stdout || row.exit == 255;
            if !same_out || p.status.code() != f.status.code() {
                problems.push(format!(
                    "parallel {:?}: exit {:?}, stdout {:?}; flowline: exit {:?}, stdout {:?}",
                    row.args,
                    p.status.code(),
                    String::from_utf8_lossy(&p.stdout[..p.stdout.len().min(200)]),
                    f.status.code(),
                    String::from_utf8_lossy(&f.stdout[..f.stdout.len().min(200)]),
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `--joblog` with `--resume` skips the jobs the log has, by job number, as parallel.
#[test]
fn joblog_resume_skips_logged_jobs() {
    let mut outs = Vec::new();
    let progs: Vec<&str> = if have_parallel() {
        vec![BIN, "parallel"]
    } else {
        vec![BIN]
    };
    for prog in progs {
        let d = tempfile::tempdir().unwrap();
        let first = run(
            prog,
            d.path(),
            &["--joblog", "log", "-k", "echo", ":::", "a", "b"],
            b"",
        );
        assert_eq!(first.stdout, b"a\nb\n", "{prog}");
        let again = run(
            prog,
            d.path(),
            &[
                "--joblog", "log", "--resume", "-k", "echo", ":::", "a", "b", "c",
            ],
            b"",
        );
        outs.push((prog, again.stdout, again.status.code()));
    }
    for (prog, out, code) in &outs {
        assert_eq!((out.as_slice(), *code), (&b"c\n"[..], Some(0)), "{prog}");
    }
}

/// `--retries N` runs a failing job N times in all.
#[test]
fn retries_count_all_attempts() {
    let d = tempfile::tempdir().unwrap();
    let o = run(
        BIN,
        d.path(),
        &["--retries", "3", "echo x >> runs; false", ":::", "1"],
        b"",
    );
    assert_eq!(o.status.code(), Some(1));
    let runs = std::fs::read_to_string(d.path().join("runs")).unwrap();
    assert_eq!(runs.lines().count(), 3);
}

/// A failed job's stderr reaches stderr (and the dead-letter file); a command that cannot
/// start says so.
#[test]
fn failures_are_shown() {
    let d = tempfile::tempdir().unwrap();
    let o = run(BIN, d.path(), &["echo oops >&2; exit 4", ":::", "1"], b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("oops"));
    let dead = std::fs::read_to_string(d.path().join("flowline-failed.jsonl")).unwrap();
    assert!(
        dead.contains("oops") && dead.contains("\"exit\":4"),
        "{dead}"
    );
    let o = run(BIN, d.path(), &["no-such-command-here", ":::", "1"], b"");
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("cannot start `no-such-command-here`: No such file or directory"),
        "{e}"
    );
}

/// `--line-buffer` passes whole lines as they come; `-u` lets the job write directly.
#[test]
fn line_buffer_and_ungroup() {
    let d = tempfile::tempdir().unwrap();
    for mode in ["--line-buffer", "-u"] {
        let o = run(
            BIN,
            d.path(),
            &[mode, "-k", "printf 'a\\nb'", ":::", "1"],
            b"",
        );
        assert_eq!(o.stdout, b"a\nb", "{mode}");
    }
}

/// `--results`: the same files with the same bytes as parallel's, in a folder per argument
/// (values with `/` and `\\` escaped) and under a name with replacement strings.
#[test]
fn results_are_laid_out_as_parallel_lays_them_out() {
    let d = tempfile::tempdir().unwrap();
    let progs: &[&str] = if have_parallel() {
        &[BIN, "parallel"]
    } else {
        &[BIN]
    };
    let mut trees = Vec::new();
    for (i, prog) in progs.iter().enumerate() {
        let dir = format!("res{i}");
        let named = format!("named{i}/{{1}}-{{#}}");
        for args in [
            vec![
                "--results",
                &dir,
                "echo {1}-{2}",
                ":::",
                "a",
                "x/y",
                "b\\c",
                ":::",
                "1",
                "2",
            ],
            vec!["--results", &named, "echo", ":::", "a", "b"],
        ] {
            let o = run(prog, d.path(), &args, b"");
            assert_eq!(
                o.status.code(),
                Some(0),
                "{prog}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        trees.push(tree(&d.path().join(&dir)));
        trees.push(tree(&d.path().join(format!("named{i}"))));
    }
    assert_eq!(
        std::fs::read(d.path().join("res0/1/x\\_y/2/2/stdout")).unwrap(),
        b"x/y-2\n"
    );
    assert_eq!(
        std::fs::read(d.path().join("res0/1/a/2/1/seq")).unwrap(),
        b"1"
    );
    assert_eq!(std::fs::read(d.path().join("named0/b-2")).unwrap(), b"b\n");
    assert_eq!(trees[0].len(), 18, "{:?}", trees[0]);
    if trees.len() == 4 {
        assert_eq!(trees[0], trees[2], "folder layout differs from parallel's");
        assert_eq!(trees[1], trees[3], "named layout differs from parallel's");
    }
}

/// Every file below `root`: its path from `root` and its bytes.
fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap().path();
            if e.is_dir() {
                todo.push(e);
            } else {
                let rel = e.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&e).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `{%}` is the job's slot: never more distinct slots than jobs at a time.
#[test]
fn slots_stay_within_the_job_count() {
    let d = tempfile::tempdir().unwrap();
    let o = run(
        BIN,
        d.path(),
        &[
            "-j3",
            "echo {%}; sleep 0.05",
            ":::",
            "1",
            "2",
            "3",
            "4",
            "5",
            "6",
            "7",
            "8",
        ],
        b"",
    );
    assert_eq!(o.status.code(), Some(0));
    let mut slots: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect();
    slots.sort();
    slots.dedup();
    assert!(
        slots.iter().all(|s| ["1", "2", "3"].contains(&s.as_str())),
        "{slots:?}"
    );
}

/// `--timeout 300%`: once 3 jobs succeeded, a job taking over 3 times their median is
/// killed.
#[test]
fn timeout_relative_to_the_median() {
    let d = tempfile::tempdir().unwrap();
    let o = run(
        BIN,
        d.path(),
        &[
            "-j1",
            "-k",
            "--timeout",
            "300%",
            "sleep {}; echo {}",
            ":::",
            "0.1",
            "0.1",
            "0.1",
            "0.1",
            "30",
        ],
        b"",
    );
    assert_eq!(o.stdout, b"0.1\n0.1\n0.1\n0.1\n");
    assert_eq!(o.status.code(), Some(1));
}

/// Bad values are errors naming the option and the value, all of them at once, exit 255.
#[test]
fn bad_option_values_are_all_reported() {
    let d = tempfile::tempdir().unwrap();
    let o = run(
        BIN,
        d.path(),
        &[
            "-j",
            "x",
            "--halt",
            "later,fail=1",
            "--timeout",
            "NaN",
            "--colsep",
            "(",
            "echo",
            ":::",
            "1",
        ],
        b"",
    );
    assert_eq!(o.status.code(), Some(255));
    let e = String::from_utf8_lossy(&o.stderr);
    for want in [
        "--jobs `x`",
        "--halt `later,fail=1`",
        "--timeout `NaN`",
        "--colsep",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }
    assert!(o.stdout.is_empty());
}
