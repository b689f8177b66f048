//! A test that the crate's modules import each other in layers, never in a cycle: a module
//! that needs another's type gets it from below, and what two modules share lives in the
//! lower one (an observer sees its run through `observe::RunView`, not the runtime's
//! `RunCtx`; a run takes a `runtime::Plan`, not the `plan::Pipeline` built over the runtime;
//! the report holds `failure::Failure`s, and the run's `error::Error` holds the report).
//!
//! The layers, from the bottom (a module imports from the layers below its own; a new item
//! goes in the lowest layer that has what it needs):
//!
//! 1. `util` (safe instants, jitter), `failure` (why an item failed: `ItemError`, `Failure`)
//! 2. `fault` (outages, transient errors), `report` (the run's counts and failure sample)
//! 3. `error` (what a run returns instead of a report)
//! 4. `policy` (what a stage's options build), `dead_letter` (where failures go)
//! 5. `observe` (watchers of a run, through `RunView`)
//! 6. `runtime` (chunks, hops, running a plan)
//! 7. `plan` (`Pipeline`), `store` (stores, guarded by the run's gate), `loader`
//! 8. `source` (over plan and store), `topology` (splits and joins of pipelines)
//! 9. `ops` (operators; a window's late side output is a topology split)
//! 10. `flow` (every operator and terminal), and the crate root, which use everything
//!
//! It reads the sources: every `crate::` path outside comments and outside the test module
//! at the end of a file, named by module or by a name the crate root re-exports. Every
//! top-level module is checked, except this test itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The modules kept in layers (each a directory or a file under `src/`), from the bottom.
const LAYERED: &[&str] = &[
    "util",
    "failure",
    "fault",
    "report",
    "error",
    "policy",
    "dead_letter",
    "observe",
    "runtime",
    "plan",
    "store",
    "loader",
    "source",
    "topology",
    "ops",
    "flow",
];

/// Module -> the modules its code names, each with one file that does.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// The crate root's re-exports (`pub use module::...::Name;`): name -> module.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for stmt in lib.split(';') {
        let Some(path) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let module = path.split("::").next().unwrap_or_default();
        if !LAYERED.contains(&module) {
            continue;
        }
        let last = path.rsplit("::").next().unwrap_or_default();
        for name in last.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
            if !name.is_empty() {
                names.insert(name.to_string(), module.to_string());
            }
        }
    }
    names
}

/// The names that follow each `crate::` in `code` (each one of a `crate::{a, b::c}` group).
fn crate_paths(code: &str) -> Vec<&str> {
    let mut names = Vec::new();
    for rest in code.split("crate::").skip(1) {
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(group.split(',').filter_map(|p| p.trim().split("::").next()));
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.push(&rest[..end]);
        }
    }
    names
}

/// A file's code without its comments and without its test module (the last item of a file).
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let next = lines.peek().map_or("", |l| l.trim());
        if line.trim() == "#[cfg(test)]" && next.contains("mod tests") {
            break;
        }
        if !line.trim_start().starts_with("//") {
            code.push_str(line);
            code.push('\n');
        }
    }
    code
}

fn scan(dir: &Path, src: &Path, names: &BTreeMap<String, String>, graph: &mut Graph) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scan(&path, src, names, graph);
            continue;
        }
        let rel = path.strip_prefix(src).unwrap();
        let from = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let from = from.trim_end_matches(".rs");
        if path.extension().is_none_or(|e| e != "rs")
            || !LAYERED.contains(&from)
            || path.file_name().is_some_and(|f| f == "tests.rs")
        {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&path).unwrap());
        for name in crate_paths(&code) {
            let to = if LAYERED.contains(&name) {
                name
            } else {
                match names.get(name) {
                    Some(m) => m.as_str(),
                    None => continue,
                }
            };
            if to != from {
                graph
                    .entry(from.to_string())
                    .or_default()
                    .entry(to.to_string())
                    .or_insert_with(|| rel.display().to_string());
            }
        }
    }
}

/// A cycle of `graph`, as the modules along it, if it has one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(m: &str, graph: &Graph, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> bool {
        if let Some(i) = path.iter().position(|p| p == m) {
            path.drain(..i);
            path.push(m.to_string());
            return true;
        }
        if done.contains(m) {
            return false;
        }
        path.push(m.to_string());
        for to in graph.get(m).into_iter().flat_map(|t| t.keys()) {
            if visit(to, graph, path, done) {
                return true;
            }
        }
        path.pop();
        done.insert(m.to_string());
        false
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| {
        let mut path = Vec::new();
        visit(m, graph, &mut path, &mut done).then_some(path)
    })
}

#[test]
fn every_module_but_the_crate_root_and_this_test_is_layered() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules: Vec<String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .map(|f| f.trim_end_matches(".rs").to_string())
        .filter(|m| m != "lib" && m != "layers")
        .collect();
    modules.sort();
    let mut listed: Vec<String> = LAYERED.iter().map(|m| m.to_string()).collect();
    listed.sort();
    assert_eq!(modules, listed, "every module of `src/` is in `LAYERED`");
}

#[test]
fn the_layered_modules_import_each_other_in_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let names = reexports(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut graph = Graph::new();
    scan(&src, &src, &names, &mut graph);
    assert!(
        graph
            .get("runtime")
            .is_some_and(|t| t.contains_key("report")),
        "the scan finds imports: {graph:?}"
    );
    if let Some(cycle) = cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| format!("{} -> {} (in {})", w[0], w[1], graph[&w[0]][&w[1]]))
            .collect();
        panic!(
            "the modules import each other in a cycle:\n{}",
            steps.join("\n")
        );
    }
}

#[test]
fn the_scan_reads_groups_and_reexports_and_skips_comments_and_tests() {
    let names = reexports("pub use runtime::run::{Run, Handle};\npub use policy::rate::Rate;");
    assert_eq!(names["Handle"], "runtime");
    let code = code_of(
        "use crate::{Run, util::time};\n// crate::plan in a comment\nfn f() { crate::Rate::x() }\n#[cfg(test)]\nmod tests {\n    use crate::ops;\n}\n",
    );
    assert_eq!(crate_paths(&code), ["Run", "util", "Rate"]);
    let mut graph = Graph::new();
    graph
        .entry("plan".into())
        .or_default()
        .insert("runtime".into(), "a".into());
    graph
        .entry("runtime".into())
        .or_default()
        .insert("report".into(), "b".into());
    assert_eq!(cycle(&graph), None);
    graph
        .entry("report".into())
        .or_default()
        .insert("plan".into(), "c".into());
    assert_eq!(
        cycle(&graph).unwrap(),
        ["plan", "runtime", "report", "plan"]
    );
}
