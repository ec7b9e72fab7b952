//! The architecture's rules, checked on the source: no module cycles in any crate, its root
//! (`lib.rs`) included (a module's dependencies are the `crate::…` paths it names outside its
//! tests), quinn only in `quictun-quic`, and no quinn type in any public item there.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The code of a file without its test module (`#[cfg(test)] mod tests { … }`, at the end) and
/// comment lines.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]\nmod tests {").next().unwrap_or_default();
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The top-level modules named by `crate::…` paths in `code`, grouped imports included.
fn referenced_modules(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `quictun_crate::` and the like
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(group.split(',').map(|item| ident(item.trim())).filter(|n| !n.is_empty()));
        } else {
            names.insert(ident(rest));
        }
    }
    names
}

/// The names the crate root re-exports (`pub use module::{A, B}` and `pub use module::A`), and
/// the module each comes from.
fn root_reexports(root: &str) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    for line in root.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ").and_then(|p| p.strip_suffix(';')) else { continue };
        let Some((module, items)) = path.split_once("::") else { continue };
        if module.contains('_') && module.starts_with("quictun") {
            continue; // another crate's item
        }
        let items = items.trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let item = item.trim();
            let name = item.rsplit("::").next().unwrap_or(item);
            names.insert(ident(name), module.to_owned());
        }
    }
    names
}

/// The module graph of one crate: top-level module → the top-level modules it uses. The crate
/// root (`lib` or `main`) is a module like the others: a `crate::Name` path is an edge to the
/// module that defines `Name`, to the root when the root defines it, or to the module the root
/// re-exports it from.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = rust_files(src);
    let module_of = |file: &Path| {
        let relative = file.strip_prefix(src).unwrap();
        let first = relative.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        first.trim_end_matches(".rs").to_owned()
    };
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let root = ["lib", "main"].into_iter().find(|r| modules.contains(*r)).unwrap_or("lib").to_owned();
    let reexports =
        std::fs::read_to_string(src.join(format!("{root}.rs"))).map(|t| root_reexports(&t)).unwrap_or_default();
    let resolve = |name: String| match () {
        () if modules.contains(&name) => name,
        () if reexports.contains_key(&name) => reexports[&name].clone(),
        () => root.clone(),
    };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = module_of(&file);
        let uses = referenced_modules(&code(&file)).into_iter().map(resolve);
        graph.entry(module.clone()).or_default().extend(uses.filter(|m| *m != module));
    }
    graph
}

/// The cycles of `graph`: its strongly connected components of more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, node: &'a str) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            self.on_stack.insert(node);
            for next in self.graph.get(node).into_iter().flatten() {
                let next = next.as_str();
                if !self.graph.contains_key(next) {
                    continue;
                }
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(member) = self.stack.pop() {
                    self.on_stack.remove(member);
                    component.push(member.to_owned());
                    if member == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node.as_str()) {
            walk.visit(node);
        }
    }
    walk.found
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut graph = BTreeMap::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        graph.entry(from.to_owned()).or_insert_with(BTreeSet::new).insert(to.to_owned());
        graph.entry(to.to_owned()).or_insert_with(BTreeSet::new);
    }
    assert_eq!(cycles(&graph), vec![vec!["a".to_owned(), "b".into(), "c".into()]]);
    assert_eq!(
        referenced_modules("use crate::{a::X, b};\nlet x = crate::c::f();"),
        ["a", "b", "c"].map(String::from).into()
    );
}

#[test]
fn no_crate_has_a_module_cycle() {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(crates_dir()).unwrap() {
        let src = entry.unwrap().path().join("src");
        if src.is_dir() {
            for cycle in cycles(&module_graph(&src)) {
                found.push(format!("{}: {}", src.parent().unwrap().display(), cycle.join(" <-> ")));
            }
        }
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}

#[test]
fn the_crate_root_is_part_of_the_module_graph() {
    let root = "pub use options::{AgentOptions, default_bind};\npub use error::AgentError;\n";
    let names = root_reexports(root);
    assert_eq!(names["AgentOptions"], "options");
    assert_eq!(names["AgentError"], "error");
    // A root that defines what a module uses, while using that module, is a cycle.
    let dir = std::env::temp_dir().join(format!("quictun-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("lib.rs"), "mod a;\npub struct Root;\nfn f() { crate::a::g(); }\n").unwrap();
    std::fs::write(dir.join("a.rs"), "pub fn g() -> crate::Root { crate::Root }\n").unwrap();
    let found = cycles(&module_graph(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(found, vec![vec!["a".to_owned(), "lib".to_owned()]]);
}

#[test]
fn quinn_is_used_only_by_the_quic_transport() {
    let mut users = Vec::new();
    for entry in std::fs::read_dir(crates_dir()).unwrap() {
        let dir = entry.unwrap().path();
        if dir.ends_with("quictun-quic") || !dir.join("src").is_dir() {
            continue;
        }
        for file in rust_files(&dir.join("src")) {
            if code(&file).contains("quinn::") {
                users.push(file.display().to_string());
            }
        }
    }
    assert!(users.is_empty(), "quinn used outside quictun-quic: {users:?}");
}

/// The declarations of `code`'s public items (`pub`, not `pub(crate)`): a function's signature up
/// to its body, a struct's or an enum's whole definition, any other item up to its end.
fn public_declarations(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("pub ") {
        let before = rest[..at].chars().next_back();
        let item = &rest[at..];
        rest = &rest[at + 4..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '(') {
            continue;
        }
        if item.starts_with("pub struct") {
            // Its name and generics, and its public fields.
            let (head, body) = item.split_once(['{', ';', '(']).unwrap_or((item, ""));
            let body = body.split("\n}").next().unwrap_or_default();
            let fields = body.lines().map(str::trim).filter(|l| l.starts_with("pub ")).collect::<Vec<_>>().join("\n");
            found.push(format!("{head}\n{fields}"));
            continue;
        }
        let is_type = item.starts_with("pub enum");
        let end = if is_type {
            // The whole definition: to the brace that closes the first one (or a `;`).
            let mut depth = 0;
            item.char_indices()
                .find(|&(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ';' if depth == 0 => return true,
                        _ => {}
                    }
                    c == '}' && depth == 0
                })
                .map_or(item.len(), |(i, _)| i + 1)
        } else {
            item.find(['{', ';']).unwrap_or(item.len())
        };
        found.push(item[..end].to_owned());
    }
    found
}

#[test]
fn no_quinn_type_is_part_of_the_quic_crates_public_api() {
    assert_eq!(
        public_declarations("pub(crate) fn a(x: quinn::X) {}\npub fn b(\n    y: quinn::Y,\n) {}"),
        ["pub fn b(\n    y: quinn::Y,\n) "]
    );
    let src = crates_dir().join("quictun-quic/src");
    let mut exposed = Vec::new();
    for file in rust_files(&src) {
        for declaration in public_declarations(&code(&file)) {
            if declaration.contains("quinn") {
                exposed.push(format!("{}: {}", file.display(), declaration.lines().next().unwrap_or_default()));
            }
        }
    }
    assert!(exposed.is_empty(), "quinn in quictun-quic's public items:\n{}", exposed.join("\n"));
}
