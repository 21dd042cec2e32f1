//! Replays the fuzz corpus on stable: every file in `fuzz/corpus/<target>/` and
//! `fuzz/artifacts/<target>/` goes through the same property checks as the `cargo fuzz`
//! target `<target>` (the checks and the byte decoder are `fuzz/src/checks.rs`, included
//! here as a module; see `docs/robustness.md`, "Fuzzing and Miri").
//!
//! Inputs of bugs that are still open in the library are listed in `fuzz/known_open.txt`
//! (`<target>/<file>` per line, `#` comments): they are replayed too, and reported, but do
//! not fail this test; once they pass, the test says so, so that the line can be removed.

#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

fn known_open(root: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(root.join("known_open.txt"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn fuzz_corpus_replays_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let open = known_open(&root);
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let (mut replayed, mut failures, mut still_open, mut fixed) = (0, Vec::new(), 0, Vec::new());
    for (target, check) in checks::TARGETS {
        for dir in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            let mut files: Vec<_> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for path in files {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                if name.starts_with('.') {
                    continue;
                }
                let data = std::fs::read(&path).expect("readable corpus file");
                let key = format!("{target}/{name}");
                let result = panic::catch_unwind(AssertUnwindSafe(|| check(&data)));
                replayed += 1;
                match (result, open.contains(&key)) {
                    (Ok(()), false) => {}
                    (Ok(()), true) => fixed.push(key),
                    (Err(_), true) => still_open += 1,
                    (Err(e), false) => {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        let msg: String = msg.chars().take(2000).collect();
                        failures.push(format!("{dir}/{key}: {msg}"));
                    }
                }
            }
        }
    }
    panic::set_hook(hook);
    eprintln!("replayed {replayed} fuzz inputs; {still_open} known-open bug inputs still fail");
    for key in &fixed {
        eprintln!("note: {key} passes now: remove it from fuzz/known_open.txt");
    }
    assert!(
        replayed > 0,
        "no fuzz corpus found under {}",
        root.display()
    );
    assert!(
        failures.is_empty(),
        "{} fuzz inputs fail:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
