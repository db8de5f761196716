//! Intake: each route file from bytes to the elements worth compiling. Reads
//! and parses the file (through the [`ParseCache`]), expands `${VAR}`, runs the
//! shape check, and queues every bot, route and `defaults:` block. An element
//! with shape errors of its own is queued without the values in error (each
//! removed, and recorded in its [`Taint`]), so the semantic checks of its other
//! fields still run; when what is left cannot stand (a required key is bad) it
//! is queued unparsed, and its name or id still counts for references and
//! uniqueness. Deserializing reports what the shape check cannot see (a
//! duration over its bound) the same way. Also the configuration hash, over
//! the bytes that were compiled, and [`current_hash`] to compare it with the disk.
//!
//! It never compiles an element and never judges a value beyond its shape.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::taint::Taint;
use super::{At, Compiler, Diagnostic, FileCtx, Severity};
use crate::config::model::Config;
use crate::config::yaml::SpanIndex;
use crate::config::{env, load as walk, raw, shape, yaml};
use crate::template::{self, Kind};

/// Parsed YAML by file path and content digest. Parsing is most of a load's cost;
/// everything after it (env expansion, checks, compilation) always runs.
#[derive(Default)]
pub struct ParseCache {
    entries: std::sync::Mutex<HashMap<PathBuf, ([u8; 32], Parsed)>>,
    /// Compiled templates by (source, kind, strict): most of a compile's cost.
    templates: std::sync::Mutex<HashMap<TemplateKey, template::Template>>,
}

pub(super) type TemplateKey = (String, Kind, bool);

type Parsed = (Value, Arc<SpanIndex>);

impl ParseCache {
    fn get(&self, path: &Path, digest: &[u8; 32]) -> Option<Parsed> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(path)
            .filter(|(d, _)| d == digest)
            .map(|(_, p)| p.clone())
    }

    fn put(&self, path: &Path, digest: [u8; 32], parsed: Parsed) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf(), (digest, parsed));
    }

    /// Forgets files that are not in `keep` (deleted or renamed) and templates not used.
    pub(super) fn retain(&self, keep: &[PathBuf], templates: &[TemplateKey]) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p, _| keep.contains(p));
        let used: HashSet<&TemplateKey> = templates.iter().collect();
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| used.contains(k));
    }

    pub(super) fn template(&self, key: &TemplateKey) -> Option<template::Template> {
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    pub(super) fn put_template(&self, key: TemplateKey, t: template::Template) {
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, t);
    }
}

impl Compiler<'_> {
    pub(super) fn add_file(&mut self, path: PathBuf) {
        let text = match std::fs::read(&path) {
            Ok(b) => match String::from_utf8(b) {
                Ok(t) => t,
                Err(_) => {
                    self.diags
                        .push(Diagnostic::error(&path, "file is not UTF-8 text"));
                    return;
                }
            },
            Err(e) => {
                self.diags
                    .push(Diagnostic::error(&path, format!("cannot read: {e}")));
                return;
            }
        };
        hash_route_file(&mut self.hasher, &path, text.as_bytes());
        let digest = crate::payload::sha256(text.as_bytes());
        let cached = self.opts.cache.and_then(|c| c.get(&path, &digest));
        let parsed = match cached {
            Some(hit) => Ok(hit),
            None => yaml::parse(&text).map(|(doc, index)| {
                let hit = (doc, Arc::new(index));
                if let Some(c) = self.opts.cache {
                    c.put(&path, digest, hit.clone());
                }
                hit
            }),
        };
        let (mut doc, index) = match parsed {
            Ok(x) => x,
            Err(e) => {
                self.diags.push(Diagnostic {
                    file: path,
                    line: e.pos.line,
                    col: e.pos.col,
                    path: String::new(),
                    severity: Severity::Error,
                    message: e.message,
                });
                return;
            }
        };
        let original = doc.clone();
        let used = RefCell::new(Vec::new());
        let recording = |name: &str| {
            let value = (self.opts.env)(name);
            used.borrow_mut().extend(value.clone());
            value
        };
        // `${file:PATH}`: relative to this route file; read on every load.
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let read = RefCell::new(Vec::new());
        let reading = |p: &str| {
            let full = dir.join(p);
            let bytes = std::fs::read(&full).map_err(|e| {
                env::FileError::Missing(format!("cannot be read ({}: {e})", super::shown(&full)))
            })?;
            read.borrow_mut().push((full, secret_digest(&bytes)));
            let value = env::file_value(bytes)?;
            used.borrow_mut().push(value.clone());
            Ok(value)
        };
        let expansion = env::expand_document_with(&mut doc, &recording, &reading);
        self.env_values.extend(used.into_inner());
        self.referenced.extend(read.into_inner());
        let file = self.files.len();
        self.files.push(FileCtx {
            path,
            text,
            index,
            // each value from the environment, as written (`${CRM_TOKEN}`): shown instead
            from_env: expansion
                .from_env
                .iter()
                .map(|p| {
                    let written = original.pointer(p).and_then(Value::as_str);
                    (p.clone(), written.unwrap_or("***").to_owned())
                })
                .collect(),
            unresolved: expansion.unresolved.iter().cloned().collect(),
            env_refs: env::reference_pointers(&original).into_iter().collect(),
        });
        for p in &expansion.problems {
            let at = At {
                file,
                pointer: p.pointer.clone(),
            };
            match &p.kind {
                env::EnvProblemKind::Missing(names) => {
                    let sev = if self.opts.require_env {
                        Severity::Error
                    } else {
                        Severity::Warning
                    };
                    let list = names
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let s = if names.len() == 1 { "" } else { "s" };
                    self.push(&at, false, sev, format!("environment variable{s} {list} not set and no default given (use ${{NAME:-default}} for one)"));
                }
                env::EnvProblemKind::File(written, env::FileError::Missing(why)) => {
                    let sev = if self.opts.require_env {
                        Severity::Error
                    } else {
                        Severity::Warning
                    };
                    self.push(
                        &at,
                        false,
                        sev,
                        format!("`${{file:{written}}}`: the file {why}"),
                    );
                }
                env::EnvProblemKind::File(written, env::FileError::Invalid(why)) => {
                    self.error(&at, format!("`${{file:{written}}}`: the file {why}"));
                }
                env::EnvProblemKind::Syntax(m) => self.error(&at, m.clone()),
            }
        }
        let problems = shape::check(&doc, &original, &expansion.unresolved);
        let mut bad: Vec<String> = Vec::new();
        for p in problems {
            let at = At {
                file,
                pointer: p.pointer.clone(),
            };
            self.push(&at, p.at_key, Severity::Error, p.message);
            bad.push(p.pointer);
        }
        let Value::Object(mut map) = doc else { return };
        if bad.iter().any(String::is_empty) {
            return;
        }
        if let Some(Value::Array(items)) = map.remove("bots") {
            for (i, item) in items.into_iter().enumerate() {
                let at = At {
                    file,
                    pointer: format!("/bots/{i}"),
                };
                let id = item.get("id").and_then(Value::as_str).map(str::to_owned);
                let parsed = self.parse_element::<raw::Bot>(&at, item, &bad, &original);
                self.bots.push((at, parsed, id));
            }
        }
        if let Some(Value::Array(items)) = map.remove("routes") {
            for (i, item) in items.into_iter().enumerate() {
                let at = At {
                    file,
                    pointer: format!("/routes/{i}"),
                };
                let name = item.get("name").and_then(Value::as_str).map(str::to_owned);
                let parsed = self.parse_element::<raw::Route>(&at, item, &bad, &original);
                self.routes.push((at, parsed, name));
            }
        }
        if let Some(d) = map.remove("defaults") {
            let at = At {
                file,
                pointer: "/defaults".into(),
            };
            if let Some((d, taint)) = self.parse_element::<raw::Defaults>(&at, d, &bad, &original) {
                self.defaults.push((at, d, taint));
            }
        }
    }

    /// The element at `at` without its values in error: those with shape errors
    /// (`bad`, already reported) and those deserializing refuses (reported here,
    /// quoting `original`, the text before `${VAR}` expansion). `None` when the
    /// element cannot stand without them.
    fn parse_element<T: serde::de::DeserializeOwned>(
        &mut self,
        at: &At,
        mut v: Value,
        bad: &[String],
        original: &Value,
    ) -> Option<(T, Taint)> {
        let mut taint = Taint::default();
        for b in bad {
            if *b == at.pointer {
                return None;
            }
            if let Some(rel) = b.strip_prefix(&at.pointer).filter(|r| r.starts_with('/')) {
                if !taint.remove(&mut v, rel) {
                    return None;
                }
                taint.errors = true;
            }
        }
        // Each round removes one value, so this ends; the bound is a backstop.
        for _ in 0..MAX_REPAIRS {
            let e = match serde_path_to_error::deserialize::<_, T>(&v) {
                Ok(t) => return Some((t, taint)),
                Err(e) => e,
            };
            let rel = path_pointer(e.path());
            let bad = At {
                file: at.file,
                pointer: format!("{}{rel}", at.pointer),
            };
            // A key we removed may be required: that is no problem of the author's.
            // A missing variable is reported already (a warning for `validate`).
            if !taint.explains(&rel) && !self.unresolved(&bad) {
                let got = shape::quote(original.pointer(&bad.pointer));
                self.error(&bad, format!("{}, got {got}", e.inner()));
                taint.errors = true;
            }
            if !taint.remove(&mut v, &rel) {
                return None;
            }
        }
        None
    }

    // ---------- whole configuration ----------

    /// The configuration hash: the route files read by this load, the schema
    /// files compiled (in path order, also returned), then the files read for
    /// `${file:…}` and downstream `tls` (their keyed digests, in path order).
    pub(super) fn config_hash(&self) -> (String, Vec<PathBuf>) {
        let mut schema_files: Vec<PathBuf> = self.schema_cache.keys().cloned().collect();
        schema_files.sort();
        let mut hasher = self.hasher.clone();
        for f in &schema_files {
            // the bytes that were compiled, not a fresh read (the file may have changed since)
            let digest = match self.schema_cache.get(f) {
                Some(Ok(schema)) => schema.digest,
                _ => [0; 32],
            };
            hash_schema_file(&mut hasher, f, digest);
        }
        for (f, digest) in &self.referenced {
            hash_schema_file(&mut hasher, f, *digest);
        }
        (hex::encode(hasher.finalize()), schema_files)
    }

    /// Reads a file a route references (a `tls` file), relative to the route
    /// file: its bytes, recorded for the hash and the watcher.
    pub(super) fn read_referenced(&mut self, at: &At, written: &str) -> std::io::Result<Vec<u8>> {
        let full = self.file_dir(at).join(written);
        let bytes = std::fs::read(&full)?;
        self.referenced.insert(full, secret_digest(&bytes));
        Ok(bytes)
    }
}

/// Most values removed from one element before giving up on it.
const MAX_REPAIRS: usize = 64;

/// A serde path (`downstream.timeout`, `schedule[1]`) as a JSON pointer.
fn path_pointer(path: &serde_path_to_error::Path) -> String {
    let mut pointer = String::new();
    for seg in path.iter() {
        match seg {
            serde_path_to_error::Segment::Seq { index } => {
                pointer.push_str(&format!("/{index}"));
            }
            serde_path_to_error::Segment::Map { key } => {
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
            }
            _ => {}
        }
    }
    pointer
}

fn hash_route_file(h: &mut Sha256, path: &Path, content: &[u8]) {
    h.update(path.to_string_lossy().as_bytes());
    h.update([0]);
    h.update(content);
    h.update([0]);
}

/// A digest of a file that may hold a secret, for the configuration hash
/// (shown by `/admin/status`): HMAC-SHA256 under a key made at random for this
/// process, so the hash changes with the secret but cannot be used to guess it.
pub(super) fn secret_digest(bytes: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(rand::random);
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(bytes);
    mac.finalize().into_bytes().into()
}

fn hash_schema_file(h: &mut Sha256, path: &Path, digest: [u8; 32]) {
    h.update(path.to_string_lossy().as_bytes());
    h.update(digest);
}

/// The hash `load` would give `config` if its files were read now: equal to
/// `config.hash` unless a file changed (or appeared or vanished) since.
pub fn current_hash(inputs: &[PathBuf], config: &Config) -> String {
    let mut ignored = Vec::new();
    let mut h = Sha256::new();
    for f in walk::collect_files(inputs, &mut ignored) {
        hash_route_file(&mut h, &f, &std::fs::read(&f).unwrap_or_default());
    }
    for f in &config.schema_files {
        hash_schema_file(
            &mut h,
            f,
            crate::payload::sha256(&std::fs::read(f).unwrap_or_default()),
        );
    }
    for f in &config.referenced_files {
        hash_schema_file(
            &mut h,
            f,
            secret_digest(&std::fs::read(f).unwrap_or_default()),
        );
    }
    hex::encode(h.finalize())
}
