//! Finding route files: every `*.yaml` / `*.yml` under the given paths, at any
//! depth, skipping names that start with `.` (files and folders alike, so a
//! Kubernetes ConfigMap's `..data` is not read twice), in a stable order.

use std::path::{Path, PathBuf};

use super::diagnostic::Diagnostic;

/// Route files under `inputs` (files are taken as given), sorted, deduplicated.
pub fn collect_files(inputs: &[PathBuf], diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for input in inputs {
        match std::fs::metadata(input) {
            Ok(m) if m.is_dir() => walk(input, &mut out, diags),
            Ok(_) => out.push(input.clone()),
            Err(e) => diags.push(Diagnostic::error(input, format!("cannot read: {e}"))),
        }
    }
    out.sort();
    out.dedup();
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, diags: &mut Vec<Diagnostic>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            diags.push(Diagnostic::error(
                dir,
                format!("cannot read directory: {e}"),
            ));
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // follow symlinks (ConfigMaps link files into place)
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, out, diags),
            Ok(m) if m.is_file() && is_route_file(&path) => out.push(path),
            _ => {}
        }
    }
}

fn is_route_file(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_any_depth_and_skips_dot_names() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("a/b")).unwrap();
        std::fs::create_dir_all(p.join("..data")).unwrap();
        std::fs::create_dir_all(p.join(".git")).unwrap();
        for f in [
            "x.yaml",
            "a/y.yml",
            "a/b/z.yaml",
            "a/readme.md",
            ".hidden.yaml",
            "..data/x.yaml",
            ".git/c.yaml",
        ] {
            std::fs::write(p.join(f), "").unwrap();
        }
        let mut diags = vec![];
        let files = collect_files(&[p.to_path_buf()], &mut diags);
        let rel: Vec<String> = files
            .iter()
            .map(|f| f.strip_prefix(p).unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(rel, ["a/b/z.yaml", "a/y.yml", "x.yaml"]);
        assert!(diags.is_empty());
    }
}
