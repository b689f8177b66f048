//! `--results NAME`: each job's output kept in files, laid out as GNU parallel lays them out,
//! so that scripts written for parallel's layout read flowline's.
//!
//! - `NAME` without replacement strings is a folder: a job with arguments `a` and `b` keeps
//!   its output in `NAME/1/a/2/b/` as the files `stdout`, `stderr` and `seq` (its job
//!   number). In a value, `\` is written `\\` and `/` is written `\_` (a value is one path
//!   component); an empty value is `\e`, and `.` and `..` are `\.` and `\.\.`, which would
//!   otherwise name another folder.
//! - `NAME` with replacement strings (`out/{1}-{2}`) names the files: the job's stdout in
//!   the expanded name, its stderr in that name with `.err`, its number with `.seq`; when
//!   the expanded name ends in `/` it is a folder holding `stdout`, `stderr` and `seq`.
//!   As in parallel, a `/` in a value makes folders (`out/{}` with `logs/a` writes
//!   `out/logs/a`); unlike parallel, an input cannot name a file outside: a `..` in a value
//!   is written `\.\.` and a value's leading `/` is dropped.
//!
//! The files are written when the job ends, whether it succeeded or not. A file that cannot
//! be written is said on stderr (once a run) and does not fail the job.

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use crate::template::Template;

/// Where `--results` keeps each job's output.
#[derive(Debug)]
pub struct Results {
    layout: Layout,
    warned: AtomicBool,
}

#[derive(Debug)]
enum Layout {
    /// `DIR/1/<arg 1>/2/<arg 2>/…/{stdout,stderr,seq}`.
    Dir(PathBuf),
    /// A name with replacement strings.
    Named(Template),
}

/// What one job left: its output, its error output, its number.
pub struct Kept<'a> {
    pub seq: u64,
    pub args: &'a [Vec<u8>],
    pub stdout: &'a [u8],
    pub stderr: &'a [u8],
}

impl Results {
    /// Reads `--results NAME`.
    pub fn new(name: &Path) -> Results {
        let named = name
            .to_str()
            .map(Template::parse)
            .filter(|t| t.has_replacements());
        Results {
            layout: match named {
                Some(t) => Layout::Named(t),
                None => Layout::Dir(name.to_path_buf()),
            },
            warned: AtomicBool::new(false),
        }
    }

    /// Writes one job's files.
    pub fn keep(&self, job: &Kept<'_>) {
        if let Err((path, e)) = self.write(job) {
            if !self.warned.swap(true, Relaxed) {
                eprintln!(
                    "flowline: --results: cannot write {}: {e} (the jobs go on; further such errors are not shown)",
                    path.display()
                );
            }
        }
    }

    /// The files of `job`: (stdout, stderr, seq).
    fn paths(&self, job: &Kept<'_>) -> (PathBuf, PathBuf, PathBuf) {
        let folder = |d: PathBuf| (d.join("stdout"), d.join("stderr"), d.join("seq"));
        match &self.layout {
            Layout::Dir(dir) => {
                let mut d = dir.clone();
                for (i, v) in job.args.iter().enumerate() {
                    d.push((i + 1).to_string());
                    d.push(std::ffi::OsString::from_vec(component(v)));
                }
                folder(d)
            }
            Layout::Named(t) => {
                let name = t.render_with(job.args, job.seq, 0, inside);
                if name.ends_with(b"/") {
                    return folder(PathBuf::from(std::ffi::OsStr::from_bytes(&name)));
                }
                let with = |suffix: &[u8]| {
                    let mut n = name.clone();
                    n.extend_from_slice(suffix);
                    PathBuf::from(std::ffi::OsString::from_vec(n))
                };
                (with(b""), with(b".err"), with(b".seq"))
            }
        }
    }

    fn write(&self, job: &Kept<'_>) -> Result<(), (PathBuf, std::io::Error)> {
        let (out, err, seq) = self.paths(job);
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| (parent.to_path_buf(), e))?;
        }
        let seq_text = job.seq.to_string();
        for (path, bytes) in [
            (out, job.stdout),
            (err, job.stderr),
            (seq, seq_text.as_bytes()),
        ] {
            std::fs::write(&path, bytes).map_err(|e| (path, e))?;
        }
        Ok(())
    }
}

/// A value as one path component, as parallel writes it: `\` → `\\`, `/` → `\_`; the
/// names that are not a component of their own (empty, `.`, `..`) escaped too.
fn component(v: &[u8]) -> Vec<u8> {
    match v {
        b"" => return b"\\e".to_vec(),
        b"." => return b"\\.".to_vec(),
        b".." => return b"\\.\\.".to_vec(),
        _ => {}
    }
    let mut out = Vec::with_capacity(v.len() + 4);
    for &b in v {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' => out.extend_from_slice(b"\\_"),
            _ => out.push(b),
        }
    }
    out
}

/// A value in a name with replacement strings: its folders kept, none above the name's own
/// (`..` escaped, a leading `/` dropped).
fn inside(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 4);
    for seg in v.split(|&b| b == b'/').skip_while(|s| s.is_empty()) {
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(if seg == b".." { b"\\.\\." } else { seg });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job<'a>(args: &'a [Vec<u8>]) -> Kept<'a> {
        Kept {
            seq: 7,
            args,
            stdout: b"out\n",
            stderr: b"err\n",
        }
    }

    #[test]
    fn a_folder_name_nests_each_argument_by_its_position() {
        let r = Results::new(Path::new("res"));
        let args = [b"a".to_vec(), b"x/y".to_vec()];
        let (o, e, s) = r.paths(&job(&args));
        assert_eq!(o, Path::new("res/1/a/2/x\\_y/stdout"));
        assert_eq!(e, Path::new("res/1/a/2/x\\_y/stderr"));
        assert_eq!(s, Path::new("res/1/a/2/x\\_y/seq"));
    }

    #[test]
    fn values_that_are_not_one_component_are_escaped() {
        assert_eq!(component(b"a\\b/c"), b"a\\\\b\\_c");
        assert_eq!(component(b""), b"\\e");
        assert_eq!(component(b"."), b"\\.");
        assert_eq!(component(b".."), b"\\.\\.");
        assert_eq!(component(b"../../etc"), b"..\\_..\\_etc");
    }

    #[test]
    fn a_name_with_replacement_strings_names_the_files() {
        let r = Results::new(Path::new("out/{1}-{#}"));
        let args = [b"a".to_vec()];
        let (o, e, s) = r.paths(&job(&args));
        assert_eq!(o, Path::new("out/a-7"));
        assert_eq!(e, Path::new("out/a-7.err"));
        assert_eq!(s, Path::new("out/a-7.seq"));
        let r = Results::new(Path::new("out/{}/"));
        let (o, _, s) = r.paths(&job(&args));
        assert_eq!(o, Path::new("out/a/stdout"));
        assert_eq!(s, Path::new("out/a/seq"));
        let nested = [b"logs/a".to_vec()];
        let (o, _, _) = Results::new(Path::new("out/{}")).paths(&job(&nested));
        assert_eq!(o, Path::new("out/logs/a"));
        let hostile = [b"/../../etc/x".to_vec()];
        let (o, _, _) = Results::new(Path::new("{}")).paths(&job(&hostile));
        assert_eq!(o, Path::new("\\.\\./\\.\\./etc/x"));
    }

    #[test]
    fn files_are_written_and_a_failure_does_not_panic() {
        let d = tempfile::tempdir().unwrap();
        let r = Results::new(&d.path().join("res"));
        let args = [b"a".to_vec()];
        r.keep(&job(&args));
        let base = d.path().join("res/1/a");
        assert_eq!(std::fs::read(base.join("stdout")).unwrap(), b"out\n");
        assert_eq!(std::fs::read(base.join("stderr")).unwrap(), b"err\n");
        assert_eq!(std::fs::read(base.join("seq")).unwrap(), b"7");
        // A file where the folder should be: said once, not a panic.
        std::fs::write(d.path().join("blocked"), b"").unwrap();
        let r = Results::new(&d.path().join("blocked"));
        r.keep(&job(&args));
        assert!(r.warned.load(Relaxed));
    }
}
