//! Finding route files: every `*.yaml` / `*.yml` under the given paths, at any
//! depth, skipping names that start with `.` (files and folders alike, so a
//! Kubernetes ConfigMap's `..data` is not read twice), in a stable order.
//!
//! Symlinks are followed (ConfigMaps link files into place), but each directory
//! is read at most once: the real tree first, then symlinked directories in
//! name order. A link that leads back to a directory above it (a loop) or to a
//! directory already read is not followed, and named in a warning.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use super::diagnostic::{self, Diagnostic, Severity};

/// Route files under `inputs` (files are taken as given), sorted, deduplicated.
pub fn collect_files(inputs: &[PathBuf], diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    let mut walk = Walk {
        out: Vec::new(),
        diags,
        read: HashMap::new(),
        links: VecDeque::new(),
    };
    for input in inputs {
        match std::fs::metadata(input) {
            Ok(m) if m.is_dir() => {
                let canonical = std::fs::canonicalize(input).unwrap_or_else(|_| input.clone());
                walk.dir(input, canonical);
            }
            Ok(_) => walk.out.push(input.clone()),
            Err(e) => walk
                .diags
                .push(Diagnostic::error(input, format!("cannot read: {e}"))),
        }
    }
    while let Some((link, parent)) = walk.links.pop_front() {
        walk.follow(link, &parent);
    }
    let mut out = walk.out;
    out.sort();
    out.dedup();
    out
}

/// One walk over the inputs.
struct Walk<'a> {
    out: Vec<PathBuf>,
    diags: &'a mut Vec<Diagnostic>,
    /// Directories read, by canonical path, with the path they were read as.
    read: HashMap<PathBuf, PathBuf>,
    /// Symlinked directories still to follow, with the canonical path of the
    /// directory holding the link: followed after the real tree, so a directory
    /// reachable both ways is read under its real name.
    links: VecDeque<(PathBuf, PathBuf)>,
}

impl Walk<'_> {
    /// Reads `dir` (whose canonical path is `canonical`) unless it was read already.
    fn dir(&mut self, dir: &Path, canonical: PathBuf) {
        if self.read.contains_key(&canonical) {
            return; // the same input given twice
        }
        self.read.insert(canonical.clone(), dir.to_path_buf());
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                self.diags.push(Diagnostic::error(
                    dir,
                    format!("cannot read directory: {e}"),
                ));
                return;
            }
        };
        let mut entries: Vec<std::fs::DirEntry> = entries.flatten().collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_symlink() {
                // what the link points at (a broken link is skipped)
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_dir() => self.links.push_back((path, canonical.clone())),
                    Ok(m) if m.is_file() && is_route_file(&path) => self.out.push(path),
                    _ => {}
                }
            } else if kind.is_dir() {
                self.dir(&path, canonical.join(&name));
            } else if kind.is_file() && is_route_file(&path) {
                self.out.push(path);
            }
        }
    }

    /// Follows the symlinked directory `link`, found in the directory whose
    /// canonical path is `parent`, unless that loops or reads a directory twice.
    fn follow(&mut self, link: PathBuf, parent: &Path) {
        let Ok(target) = std::fs::canonicalize(&link) else {
            return; // removed or broken since it was seen
        };
        let message = if parent.starts_with(&target) {
            let above = self.read.get(&target).unwrap_or(&target);
            format!(
                "symlink loop: this link leads back to `{}`, which holds it; not followed",
                shown(above)
            )
        } else if let Some(first) = self.read.get(&target) {
            format!(
                "this symlinked directory was already read as `{}`; not read again",
                shown(first)
            )
        } else {
            return self.dir(&link, target);
        };
        self.diags.push(Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(link, message)
        });
    }
}

/// A path as the author knows it: relative to the working directory when inside it.
fn shown(p: &Path) -> String {
    diagnostic::display_path(p, &std::env::current_dir().unwrap_or_default())
}

fn is_route_file(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::diagnostic::Severity;

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

    fn rel(files: &[PathBuf], root: &Path) -> Vec<String> {
        files
            .iter()
            .map(|f| f.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// `routes/a/loop -> ..` used to recurse until the path grew too long.
    #[cfg(unix)]
    #[test]
    fn symlink_loop_is_a_warning_not_an_endless_walk() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("routes");
        std::fs::create_dir_all(p.join("a")).unwrap();
        std::fs::write(p.join("x.yaml"), "").unwrap();
        std::fs::write(p.join("a/y.yaml"), "").unwrap();
        std::os::unix::fs::symlink("..", p.join("a/loop")).unwrap();
        // a link to itself, and a hidden loop (skipped like every dot-name)
        std::os::unix::fs::symlink(".", p.join("a/self")).unwrap();
        std::os::unix::fs::symlink("..", p.join("a/.hidden-loop")).unwrap();

        let mut diags = vec![];
        let files = collect_files(std::slice::from_ref(&p), &mut diags);
        assert_eq!(rel(&files, &p), ["a/y.yaml", "x.yaml"]);
        let mut shown: Vec<(PathBuf, Severity, String)> = diags
            .into_iter()
            .map(|d| (d.file, d.severity, d.message))
            .collect();
        shown.sort();
        assert_eq!(shown.len(), 2, "{shown:?}");
        for (file, severity, message) in &shown {
            assert_eq!(*severity, Severity::Warning, "{message}");
            assert!(message.contains("symlink loop"), "{message}");
            assert!(
                file.ends_with("a/loop") || file.ends_with("a/self"),
                "{file:?}"
            );
        }
    }

    /// Two links to one directory: its files are read once, through the first
    /// link in name order; the second is named in a warning.
    #[cfg(unix)]
    #[test]
    fn a_directory_linked_twice_is_read_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("routes");
        let shared = d.path().join("shared");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::write(shared.join("s.yaml"), "").unwrap();
        std::os::unix::fs::symlink(&shared, p.join("one")).unwrap();
        std::os::unix::fs::symlink(&shared, p.join("two")).unwrap();

        let mut diags = vec![];
        let files = collect_files(std::slice::from_ref(&p), &mut diags);
        assert_eq!(rel(&files, &p), ["one/s.yaml"]);
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert!(diags[0].file.ends_with("two"), "{:?}", diags[0]);
        assert_eq!(diags[0].severity, Severity::Warning);
        assert!(diags[0].message.contains("already read"), "{:?}", diags[0]);
    }
}
