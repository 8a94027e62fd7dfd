//! The emulator's modules import only downwards: a service never imports another service or
//! the router, shared state never imports a service. Checked on the sources, so a new
//! `crate::` path that points up (or sideways between services) fails here, naming it.

/// Lowest first; a module may use modules of a strictly lower layer, or its own.
const LAYERS: [&[&str]; 8] = [
    &["util", "policy", "keystore", "tcg_log"],
    &["jwt", "pki", "admin"],
    &["snp"],
    &["tdx"],
    &["state", "vtpm"],
    &["context"],
    &["cose", "tenant"],
    &["maa", "keyvault", "imds"],
];
/// The router, the CLI and the fuzz harnesses on top may use anything.
const TOP: [&str; 5] = ["app", "main", "lib", "fuzzing", "layers"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// `crate::name` paths in `text` (the first segment only).
fn crate_paths(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(at, found)| {
            text[at + found.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn modules_import_only_downwards() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut violations = Vec::new();
    let mut seen = 0;
    for path in &files {
        // keyvault/target.rs belongs to `keyvault`; foo.rs to `foo`.
        let relative = path.strip_prefix(&src).expect("under src");
        let module = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("module name");
        if TOP.contains(&module.as_str()) {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            violations.push(format!(
                "{}: module {module} is in no layer",
                relative.display()
            ));
            continue;
        };
        seen += 1;
        let text = std::fs::read_to_string(path).expect("read source");
        for used in crate_paths(&text) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(layer) if layer < own => {}
                _ => violations.push(format!(
                    "{}: {module} uses crate::{used}",
                    relative.display()
                )),
            }
        }
    }
    assert!(
        seen >= 15,
        "only {seen} module files found under {}",
        src.display()
    );
    assert!(
        violations.is_empty(),
        "imports that point up or sideways:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_a_sideways_import() {
    assert_eq!(
        crate_paths("use crate::imds::x; crate::util::now()"),
        ["imds", "util"]
    );
    assert!(layer_of("keyvault") == layer_of("imds"));
}
