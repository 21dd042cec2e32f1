//! The architecture as a test: every module of `src/` imports only modules of lower layers,
//! so dependencies run one way and no module imports one that imports it back.
//!
//! ```text
//! 0 simd, prelude  1 float  2 error  3 mask, softmax  4 entropy  5 spec  6 kernel
//! 7 attention, multihead  8 grad, rope  9 cache  10 sheet
//! ```
//!
//! (`guide` is documentation only.) An import is any `crate::module` or `crate::Item` path
//! in code, doc comments and `#[cfg(doc)]` imports aside; a root item counts as the module
//! that defines it (read from the `pub use` lines of `src/lib.rs`).

use std::collections::BTreeMap;
use std::path::Path;

const LAYERS: &[(&str, u32)] = &[
    ("simd", 0),
    ("prelude", 0),
    ("float", 1),
    ("error", 2),
    ("mask", 3),
    ("softmax", 3),
    ("entropy", 4),
    ("spec", 5),
    ("kernel", 6),
    ("attention", 7),
    ("multihead", 7),
    ("grad", 8),
    ("rope", 8),
    ("cache", 9),
    ("sheet", 10),
    ("ndarray", 10),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments, its `#[cfg(doc)]` imports and its test module.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    let mut out = String::new();
    let mut skip_doc_use = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        if t.starts_with("#[cfg(doc)]") {
            skip_doc_use = true;
            continue;
        }
        if skip_doc_use {
            if t.ends_with(';') {
                skip_doc_use = false;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn every_import_goes_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    // Root items to their modules, from lib.rs's `pub use module::{...}` lines.
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let mut item_module = BTreeMap::new();
    for chunk in lib.split("pub use ").skip(1) {
        let stmt = chunk.split(';').next().unwrap();
        let (module, items) = stmt.split_once("::").unwrap();
        for item in items
            .trim_matches(|c| c == '{' || c == '}' || char::is_whitespace(c))
            .split(',')
        {
            let item = item.trim();
            if !item.is_empty() {
                item_module.insert(item.to_string(), module.trim().to_string());
            }
        }
    }
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut checked = 0;
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = first.trim_end_matches(".rs");
        if module == "lib" || module == "guide" {
            continue;
        }
        let own = *layer
            .get(module)
            .unwrap_or_else(|| panic!("module `{module}` has no layer in tests/layering.rs"));
        let text = code(&std::fs::read_to_string(&file).unwrap());
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + 7..];
            // `crate::{A, b::C}`: every first path segment in the braces.
            let names: Vec<String> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .map(|p| p.trim().split("::").next().unwrap_or("").to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
                None => vec![
                    rest.chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect(),
                ],
            };
            for name in names {
                let target = if layer.contains_key(name.as_str()) {
                    name.clone()
                } else if let Some(m) = item_module.get(&name) {
                    m.clone()
                } else {
                    panic!(
                        "{}: `crate::{name}` is neither a module nor a root item",
                        rel.display()
                    );
                };
                if target == module {
                    continue;
                }
                let theirs = layer[target.as_str()];
                assert!(
                    theirs < own,
                    "{} (layer {own}) imports `crate::{name}` from `{target}` (layer {theirs}): \
                 dependencies must run down the layers",
                    rel.display()
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} imports found: is the parser broken?"
    );
}
