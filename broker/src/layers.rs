//! The broker's layers, and the test that keeps imports pointing down.
//!
//! From the bottom: the domain model (pure data and decisions, no I/O),
//! storage (redb, segments, the writer applying commands), the metrics
//! registry and configuration, the core (the broker's state and domain
//! operations, plugins' host side, timers), the wire (`server`: QUIC,
//! framing, handlers that decode a request, call the core and encode the
//! reply), and the command line. A module may use modules of its own layer
//! or below, never above; within the model layer the modules form no
//! circle. The test parses every `crate::` path (and every `super::` that
//! climbs out of a top-level module) in `broker/src`.

/// Top-level modules by layer, lowest first.
pub const LAYERS: &[(&str, &[&str])] = &[
    (
        "model",
        &[
            "clock",
            "command",
            "topics",
            "groups",
            "delivery",
            "producers",
            "transactions",
            "auth",
            "tls",
        ],
    ),
    ("storage", &["storage"]),
    ("instruments", &["metrics", "config"]),
    ("core", &["core"]),
    ("wire", &["server"]),
    ("command line", &["cli", "layers"]),
];

/// The layer index of a top-level module, if it is in [`LAYERS`].
pub fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("reading the source tree") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The module path of a file under `src`: `storage/writer/recovery.rs`
    /// is `["storage", "writer", "recovery"]`, `core/mod.rs` is `["core"]`.
    fn module_path(relative: &Path) -> Vec<String> {
        let mut parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let last = parts.pop().unwrap_or_default();
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" && stem != "lib" && stem != "main" {
            parts.push(stem.to_string());
        }
        parts
    }

    fn ident_at(text: &str) -> String {
        text.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    }

    /// Top-level modules a file's code names.
    fn references(source: &str, module: &[String]) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for line in source.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                let after = &rest[at + "crate::".len()..];
                // `$crate::` in a macro names another crate.
                let dollar = rest[..at].ends_with('$');
                if !dollar {
                    if let Some(group) = after.strip_prefix('{') {
                        let inner = group.split('}').next().unwrap_or("");
                        for item in inner.split(',') {
                            let name = ident_at(item.trim());
                            if !name.is_empty() {
                                found.insert(name);
                            }
                        }
                    } else {
                        let name = ident_at(after);
                        if !name.is_empty() {
                            found.insert(name);
                        }
                    }
                }
                rest = after;
            }
            // `super::super::x` climbing out of the top-level module.
            let mut rest = code;
            while let Some(at) = rest.find("super::") {
                let preceded = rest[..at]
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
                let mut after = &rest[at..];
                let mut climbs = 0;
                while let Some(next) = after.strip_prefix("super::") {
                    climbs += 1;
                    after = next;
                }
                if !preceded && climbs >= module.len() && !module.is_empty() {
                    let name = ident_at(after);
                    if !name.is_empty() {
                        found.insert(name);
                    }
                }
                rest = after;
            }
        }
        found
    }

    /// Edges between top-level modules: (from, to) → a file that shows it.
    fn import_graph() -> BTreeMap<(String, String), String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut edges = BTreeMap::new();
        for file in files {
            let relative = file.strip_prefix(&src).expect("under src");
            let module = module_path(relative);
            let Some(top) = module.first().cloned() else {
                continue; // lib.rs and main.rs only declare modules
            };
            let source = std::fs::read_to_string(&file).expect("reading a source file");
            for to in references(&source, &module) {
                if to != top && layer_of(&to).is_some() {
                    edges
                        .entry((top.clone(), to))
                        .or_insert_with(|| relative.display().to_string());
                }
            }
        }
        edges
    }

    #[test]
    fn every_top_level_module_has_a_layer() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
        let lib = std::fs::read_to_string(src).expect("reading lib.rs");
        for line in lib.lines() {
            if let Some(name) = line.trim().strip_prefix("pub mod ") {
                let name = name.trim_end_matches(';');
                assert!(
                    layer_of(name).is_some(),
                    "module {name} is in no layer of LAYERS"
                );
            }
        }
    }

    #[test]
    fn imports_point_down_only() {
        let edges = import_graph();
        assert!(
            edges.contains_key(&("core".into(), "storage".into())),
            "the parser must see the core's storage imports: {edges:?}"
        );
        let mut upward = Vec::new();
        for ((from, to), file) in &edges {
            let (f, t) = (layer_of(from).unwrap(), layer_of(to).unwrap());
            if t > f {
                upward.push(format!(
                    "{file}: {from} ({}) uses {to} ({})",
                    LAYERS[f].0, LAYERS[t].0
                ));
            }
        }
        assert!(
            upward.is_empty(),
            "imports pointing up:\n{}",
            upward.join("\n")
        );
        for forbidden in ["server", "core", "metrics", "config", "cli"] {
            assert!(
                !edges.contains_key(&("storage".into(), forbidden.into())),
                "storage uses {forbidden}"
            );
        }
        assert!(!edges.contains_key(&("core".into(), "server".into())));
    }

    #[test]
    fn only_the_core_seam_writes_to_the_store() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut writers = Vec::new();
        for file in files {
            let relative = file.strip_prefix(&src).expect("under src");
            // The seam itself, this test, and the offline replay, which
            // applies recorded commands to a store with no broker around it.
            let exempt = ["core/log.rs", "layers.rs", "cli/admin.rs"].map(Path::new);
            if relative.starts_with("storage") || exempt.contains(&relative) {
                continue;
            }
            let source = std::fs::read_to_string(&file).expect("reading a source file");
            let flat: String = source.split_whitespace().collect();
            if flat.contains("store.write(") || flat.contains("store.write_many(") {
                writers.push(relative.display().to_string());
            }
        }
        assert!(
            writers.is_empty(),
            "these write to the store past BrokerState::submit: {writers:?}"
        );
    }

    #[test]
    fn the_module_graph_has_no_circle() {
        let edges = import_graph();
        let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (from, to) in edges.keys() {
            graph.entry(from).or_default().push(to);
        }
        // Depth-first search; a node met again on the current path closes a circle.
        fn visit<'a>(
            node: &'a str,
            graph: &BTreeMap<&'a str, Vec<&'a str>>,
            path: &mut Vec<&'a str>,
            done: &mut BTreeSet<&'a str>,
        ) -> Option<Vec<&'a str>> {
            if let Some(at) = path.iter().position(|n| *n == node) {
                let mut circle = path[at..].to_vec();
                circle.push(node);
                return Some(circle);
            }
            if !done.insert(node) {
                return None;
            }
            path.push(node);
            for next in graph.get(node).into_iter().flatten() {
                if let Some(circle) = visit(next, graph, path, done) {
                    return Some(circle);
                }
            }
            path.pop();
            None
        }
        let mut done = BTreeSet::new();
        for node in graph.keys() {
            let circle = visit(node, &graph, &mut Vec::new(), &mut done);
            assert!(circle.is_none(), "circle: {}", circle.unwrap().join(" -> "));
        }
    }

    #[test]
    fn the_parser_finds_grouped_and_climbing_imports() {
        let module = vec!["storage".to_string(), "writer".to_string()];
        let found = references(
            "use crate::{server, topics::Topic};\nlet x = super::super::metrics::global(); // crate::cli\n$crate::ignored",
            &module,
        );
        let expected: BTreeSet<String> = ["server", "topics", "metrics"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(found, expected);
    }
}
