//! The modules keep the dependency rules of docs/ARCHITECTURE.md: no import cycle between the
//! library's top-level modules, the format reaches neither the store nor planning, planning
//! reaches no file system and no store, the seam reaches nothing of ours but the error type,
//! nothing outside the test kit reaches it; and no source file is over 2,000 lines.
//!
//! The graph is read from the source: every `crate::…` path outside comments and outside code
//! compiled only for tests (`#[cfg(test)]` or `#[cfg(any(test, feature = "fuzzing"))]` items,
//! and unit-test files declared `#[cfg(test)] mod name;`), with names the crate root re-exports
//! resolved through `src/lib.rs`.

#![allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    reason = "a test reading its own sources: a panic is a failure"
)]
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest source file allowed, in lines.
const MAX_LINES: usize = 2000;

/// What each top-level module may reach (besides itself). A module missing here may reach
/// anything but the test kit, as long as no cycle forms.
const ALLOWED: &[(&str, &[&str])] = &[
    ("id", &[]),
    ("error", &["id"]),
    ("value", &[]),
    ("transfer", &["error", "id", "value"]),
    ("layout", &["id", "transfer"]),
    ("fs", &["error"]),
    ("format", &["error", "transfer", "value"]),
    ("reconcile", &["error", "transfer", "value"]),
    (
        "state_file",
        &["error", "format", "fs", "layout", "transfer"],
    ),
];

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn is_test_cfg(line: &str) -> bool {
    let t = line.trim();
    t == "#[cfg(test)]" || t == "#[cfg(any(test, feature = \"fuzzing\"))]"
}

/// The file's text without comments and without items compiled only for tests, and the names
/// of the unit-test modules it declares as files of their own.
fn production_text(src: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut test_mods = Vec::new();
    let lines: Vec<&str> = src.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if is_test_cfg(line) {
            // Skip the attribute and the item, statement, field, variant or arm after it.
            i += 1;
            let mut depth = 0i64;
            let mut opened = false;
            while i < lines.len() {
                let l = code_of(lines[i]);
                if !opened
                    && let Some(name) = l
                        .trim()
                        .strip_prefix("mod ")
                        .and_then(|r| r.strip_suffix(';'))
                {
                    test_mods.push(name.trim().to_string());
                }
                depth += braces(&l);
                opened |= l.contains('{');
                i += 1;
                if (opened && depth <= 0)
                    || (!opened && (l.trim_end().ends_with(';') || l.trim_end().ends_with(',')))
                {
                    break;
                }
            }
            continue;
        }
        out.push_str(&code_of(line));
        out.push('\n');
        i += 1;
    }
    (out, test_mods)
}

/// A line without its comment and without the contents of its string literals.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_str = false;
                    out.push('"');
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push('"');
            }
            '/' if chars.peek() == Some(&'/') => break,
            '\'' => {
                // A char literal such as '{' (a lifetime has no closing quote nearby).
                let rest: String = chars.clone().take(3).collect();
                if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                    out.push_str("' '");
                } else {
                    out.push('\'');
                }
            }
            _ => out.push(c),
        }
    }
    out
}

fn braces(l: &str) -> i64 {
    l.matches('{').count() as i64 - l.matches('}').count() as i64
}

/// The first path segment of every `crate::` path in `text` (`crate::{a::b, c}` gives a and c).
fn crate_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` or a name ending in "crate"
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut end = 0;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = k;
                    break;
                }
            }
            let mut depth = 0;
            let mut part = String::new();
            for c in group[..end].chars().chain(std::iter::once(',')) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(first_segment(&part));
                        part.clear();
                        continue;
                    }
                    _ => {}
                }
                part.push(c);
            }
        } else {
            found.push(first_segment(rest));
        }
    }
    found.retain(|s| !s.is_empty() && s != "self");
    found
}

fn first_segment(s: &str) -> String {
    s.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Names the crate root re-exports, and the module each comes from.
fn root_exports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let text: String = lib.lines().map(code_of).collect::<Vec<_>>().join(" ");
    for stmt in text.split(';') {
        let Some(path) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let module = first_segment(path);
        match path.find('{') {
            Some(open) => {
                for name in path[open + 1..].trim_end_matches('}').split(',') {
                    let name = first_segment(name.rsplit("::").next().unwrap_or(name));
                    if !name.is_empty() {
                        out.insert(name, module.clone());
                    }
                }
            }
            None => {
                let name = first_segment(path.rsplit("::").next().unwrap_or(path));
                out.insert(name, module);
            }
        }
    }
    out
}

/// The library's top-level modules and what each reaches outside test-only code.
fn module_graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let src = root.join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read src/lib.rs");
    let exports = root_exports(&lib);
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    // Unit-test files, declared `#[cfg(test)] mod name;` in their parent.
    let mut test_files = BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read source");
        let (_, mods) = production_text(&text);
        let dir = if f
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs")
        {
            f.parent().expect("parent").to_path_buf()
        } else {
            f.with_extension("")
        };
        for m in mods {
            test_files.insert(dir.join(format!("{m}.rs")));
            test_files.insert(dir.join(&m).join("mod.rs"));
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let first = rel
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if first == "lib" || first == "bin" || test_files.contains(f) {
            continue;
        }
        let text = std::fs::read_to_string(f).expect("read source");
        let (code, _) = production_text(&text);
        let deps = graph.entry(first.clone()).or_default();
        for seg in crate_paths(&code) {
            let module = if seg.chars().next().is_some_and(char::is_uppercase)
                || !src.join(format!("{seg}.rs")).exists() && !src.join(&seg).is_dir()
            {
                exports.get(&seg).cloned().unwrap_or_else(|| {
                    panic!(
                        "{}: crate::{seg} is neither a module nor a root re-export",
                        rel.display()
                    )
                })
            } else {
                seg
            };
            if module != first {
                deps.insert(module);
            }
        }
    }
    graph
}

/// A cycle in `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, graph, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_top_level_modules_import_each_other_without_a_cycle() {
    let graph = module_graph(&root());
    for (m, deps) in &graph {
        println!("{m} -> {deps:?}");
    }
    assert!(graph.contains_key("store") && graph.contains_key("format"));
    assert!(
        graph["store"].contains("index") && graph["index"].contains("format"),
        "the graph was read: {graph:?}"
    );
    if let Some(c) = find_cycle(&graph) {
        panic!("import cycle: {}", c.join(" -> "));
    }
}

/// The edges of `graph` that the rules do not allow.
fn broken_rules(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut broken = Vec::new();
    for (module, deps) in graph {
        let allowed = ALLOWED.iter().find(|(m, _)| m == module).map(|(_, a)| *a);
        for d in deps {
            let ok = match allowed {
                Some(a) => a.contains(&d.as_str()),
                None => d != "testkit" || module == "testkit",
            };
            if !ok {
                broken.push(format!("{module} -> {d}"));
            }
        }
    }
    broken
}

#[test]
fn each_module_reaches_only_what_its_rules_allow() {
    let broken = broken_rules(&module_graph(&root()));
    assert!(broken.is_empty(), "not allowed: {broken:?}");
}

#[test]
fn the_checker_sees_a_cycle_and_a_broken_rule() {
    // The checks above can fail: a graph with a cycle is reported, and so is one test-only
    // import left out of production text while a real one is read.
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let mut bad: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    bad.entry("format".into())
        .or_default()
        .insert("store".into());
    bad.entry("store".into())
        .or_default()
        .insert("testkit".into());
    bad.entry("index".into())
        .or_default()
        .insert("format".into());
    assert_eq!(broken_rules(&bad), ["format -> store", "store -> testkit"]);
    let src = "use crate::{a::X, b};\n#[cfg(test)]\nmod tests {\n    use crate::c;\n}\n// crate::d\nfn f() { crate::e::g(); }\n#[cfg(test)]\nmod more;\n";
    let (code, mods) = production_text(src);
    assert_eq!(crate_paths(&code), ["a", "b", "e"]);
    // A test-only variant or field ends at its comma: what follows is read.
    let src = "enum E {\n    #[cfg(test)]\n    Sim(crate::x::S),\n    Real,\n}\nimpl crate::y::T for E {}\n";
    assert_eq!(crate_paths(&production_text(src).0), ["y"]);
    assert_eq!(mods, ["more"]);
}

#[test]
fn no_source_file_is_over_two_thousand_lines() {
    let mut files = Vec::new();
    for dir in ["src", "tests", "benches", "examples", "fuzz/fuzz_targets"] {
        let d = root().join(dir);
        if d.is_dir() {
            rs_files(&d, &mut files);
        }
    }
    assert!(files.len() > 20, "the sources were found");
    let long: Vec<_> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).ok()?.lines().count();
            (n > MAX_LINES).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}
