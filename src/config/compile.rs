//! Route files → a validated, immutable [`Config`], collecting every problem.
//!
//! One function, [`load`], is shared by `gateway validate`, `serve` start-up
//! and hot reload. It never stops at the first problem: each file is parsed,
//! `${VAR}`-expanded and checked against the route-file schema; each valid
//! element is compiled (defaults, templates, payload schemas, references);
//! then cross-file checks run (unique names, bot references, one route per
//! (bot, intent)), the template-vs-schema check, and route examples.
//! It never does network I/O.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::diagnostic::{self, Diagnostic, Severity};
use super::model::*;
use super::raw::{self, Dur, StatusPattern};
use super::yaml::{Pos, SpanIndex};
use super::{env, load as walk, shape, yaml};
use crate::auth::{InboundAuth, StandardWebhooksSecret};
use crate::breaker::{BreakerConfig, BreakerSettings, SlowCall};
use crate::downstream::retry::{Backoff, RetryPolicy};
use crate::payload::PayloadSchema;
use crate::template::{self, Kind};

/// How to load.
pub struct LoadOptions<'a> {
    /// The environment for `${VAR}`.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// A missing variable without default is an error (serve, `validate --require-env`);
    /// otherwise a warning.
    pub require_env: bool,
    /// Render route `examples` and compare (validate). `serve` and reload skip them:
    /// expected URLs are usually written for the `${VAR:-default}` values, which a
    /// real deployment overrides.
    pub check_examples: bool,
    /// Parsed files of earlier loads (a running gateway keeps one), so a reload
    /// re-parses only files whose bytes changed.
    pub cache: Option<&'a ParseCache>,
}

/// Parsed YAML by file path and content digest. Parsing is most of a load's cost;
/// everything after it (env expansion, checks, compilation) always runs.
#[derive(Default)]
pub struct ParseCache {
    entries: std::sync::Mutex<HashMap<PathBuf, ([u8; 32], Parsed)>>,
    /// Compiled templates by (source, kind, strict): most of a compile's cost.
    templates: std::sync::Mutex<HashMap<TemplateKey, template::Template>>,
}

type TemplateKey = (String, Kind, bool);

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
    fn retain(&self, keep: &[PathBuf], templates: &[TemplateKey]) {
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

    fn template(&self, key: &TemplateKey) -> Option<template::Template> {
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn put_template(&self, key: TemplateKey, t: template::Template) {
        self.templates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, t);
    }
}

/// The outcome of a load: a config when there were no errors, and every diagnostic.
pub struct Loaded {
    pub config: Option<Config>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Loaded {
    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }
}

/// Loads and compiles every route file under `inputs`.
pub fn load(inputs: &[PathBuf], opts: &LoadOptions) -> Loaded {
    let mut c = Compiler {
        opts,
        files: vec![],
        diags: vec![],
        bots: vec![],
        routes: vec![],
        defaults: vec![],
        schema_cache: HashMap::new(),
        hasher: Sha256::new(),
        env_values: BTreeSet::new(),
        templates_used: Vec::new(),
    };
    let files = walk::collect_files(inputs, &mut c.diags);
    for f in files {
        c.add_file(f);
    }
    c.finish()
}

struct FileCtx {
    path: PathBuf,
    text: String,
    index: Arc<SpanIndex>,
    from_env: HashSet<String>,
    unresolved: HashSet<String>,
}

/// Where a raw element came from: file index and JSON pointer of the element.
#[derive(Clone)]
struct At {
    file: usize,
    pointer: String,
}

impl At {
    fn child(&self, key: &str) -> At {
        At {
            file: self.file,
            pointer: format!("{}/{}", self.pointer, key),
        }
    }
}

struct Compiler<'a> {
    opts: &'a LoadOptions<'a>,
    files: Vec<FileCtx>,
    diags: Vec<Diagnostic>,
    bots: Vec<(At, Option<raw::Bot>, Option<String>)>,
    routes: Vec<(At, Option<raw::Route>, Option<String>)>,
    defaults: Vec<(At, raw::Defaults)>,
    schema_cache: HashMap<PathBuf, Result<Arc<PayloadSchema>, String>>,
    hasher: Sha256,
    /// Every value read from the environment: secret until proven otherwise, so
    /// redacted from diagnostics (example diffs show rendered URLs and bodies).
    env_values: BTreeSet<String>,
    /// Template cache keys used by this load (the rest is evicted).
    templates_used: Vec<TemplateKey>,
}

/// `/routes/0/breaker/failure_rate` → `routes[0].breaker.failure_rate`.
pub fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

impl Compiler<'_> {
    fn push(&mut self, at: &At, at_key: bool, severity: Severity, message: impl Into<String>) {
        let f = &self.files[at.file];
        let pos = if at_key {
            f.index.key(&at.pointer)
        } else {
            f.index.value(&at.pointer)
        };
        self.diags.push(Diagnostic {
            file: f.path.clone(),
            line: pos.line,
            col: pos.col,
            path: pointer_to_path(&at.pointer),
            severity,
            message: message.into(),
        });
    }

    fn error(&mut self, at: &At, message: impl Into<String>) {
        self.push(at, false, Severity::Error, message);
    }

    fn warn(&mut self, at: &At, message: impl Into<String>) {
        self.push(at, false, Severity::Warning, message);
    }

    /// A problem inside a template, at line/col of the template text.
    fn template_diag(
        &mut self,
        at: &At,
        tline: usize,
        tcol: usize,
        severity: Severity,
        message: String,
    ) {
        let f = &self.files[at.file];
        let pos = locate_in_scalar(&f.text, f.index.value(&at.pointer), tline, tcol);
        self.diags.push(Diagnostic {
            file: f.path.clone(),
            line: pos.line,
            col: pos.col,
            path: pointer_to_path(&at.pointer),
            severity,
            message,
        });
    }

    fn unresolved(&self, at: &At) -> bool {
        self.files[at.file].unresolved.contains(&at.pointer)
    }

    fn is_from_env(&self, at: &At) -> bool {
        self.files[at.file].from_env.contains(&at.pointer)
    }

    fn file_dir(&self, at: &At) -> PathBuf {
        self.files[at.file]
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    fn pos_of(&self, at: &At) -> (PathBuf, Pos) {
        let f = &self.files[at.file];
        (f.path.clone(), f.index.value(&at.pointer))
    }

    // ---------- per file ----------

    fn add_file(&mut self, path: PathBuf) {
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
        let expansion = env::expand_document(&mut doc, &recording);
        self.env_values.extend(used.into_inner());
        let file = self.files.len();
        self.files.push(FileCtx {
            path,
            text,
            index,
            from_env: expansion.from_env.iter().cloned().collect(),
            unresolved: expansion.unresolved.iter().cloned().collect(),
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
        let is_bad = |prefix: &str| {
            bad.iter()
                .any(|b| b == prefix || b.starts_with(&format!("{prefix}/")))
        };
        let Value::Object(mut map) = doc else { return };
        if is_bad("") && bad.iter().any(|b| b.is_empty()) {
            return;
        }
        if let Some(Value::Array(items)) = map.remove("bots") {
            for (i, item) in items.into_iter().enumerate() {
                let at = At {
                    file,
                    pointer: format!("/bots/{i}"),
                };
                let id = item.get("id").and_then(Value::as_str).map(str::to_owned);
                let parsed = if is_bad(&at.pointer) {
                    None
                } else {
                    self.deserialize::<raw::Bot>(&at, item)
                };
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
                let parsed = if is_bad(&at.pointer) {
                    None
                } else {
                    self.deserialize::<raw::Route>(&at, item)
                };
                self.routes.push((at, parsed, name));
            }
        }
        if let Some(d) = map.remove("defaults") {
            let at = At {
                file,
                pointer: "/defaults".into(),
            };
            if !is_bad(&at.pointer)
                && let Some(d) = self.deserialize::<raw::Defaults>(&at, d)
            {
                self.defaults.push((at, d));
            }
        }
    }

    fn deserialize<T: serde::de::DeserializeOwned>(&mut self, at: &At, v: Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(v) {
            Ok(t) => Some(t),
            Err(e) => {
                // The schema check should have caught this; report it anyway, located.
                let mut pointer = at.pointer.clone();
                for seg in e.path().iter() {
                    match seg {
                        serde_path_to_error::Segment::Seq { index } => {
                            pointer.push_str(&format!("/{index}"))
                        }
                        serde_path_to_error::Segment::Map { key } => {
                            pointer.push_str(&format!("/{key}"))
                        }
                        _ => {}
                    }
                }
                let at = At {
                    file: at.file,
                    pointer,
                };
                self.error(&at, "invalid value for this key");
                None
            }
        }
    }

    // ---------- whole configuration ----------

    fn finish(mut self) -> Loaded {
        // defaults: at most one file
        let defaults = match self.defaults.len() {
            0 => raw::Defaults::default(),
            _ => {
                let mut all = std::mem::take(&mut self.defaults);
                let (first_at, first) = all.remove(0);
                // the line of the `defaults:` key, not of its first child
                let ffile = self.files[first_at.file].path.clone();
                let fpos = self.files[first_at.file].index.key(&first_at.pointer);
                for (at, _) in all {
                    let msg = format!(
                        "a `defaults:` block is already defined at {}:{}; at most one file may hold one",
                        shown(&ffile),
                        fpos.line
                    );
                    self.push(&at, true, Severity::Error, msg);
                }
                first
            }
        };

        // bots
        let mut bots: BTreeMap<String, (At, BotParts)> = BTreeMap::new();
        let raw_bots = std::mem::take(&mut self.bots);
        let all_bot_ids: Vec<String> = raw_bots
            .iter()
            .filter_map(|(_, _, id)| id.clone())
            .collect();
        for (at, parsed, _) in raw_bots {
            let Some(b) = parsed else { continue };
            if let Some((first, _)) = bots.get(&b.id) {
                let (ffile, fpos) = self.pos_of(&first.child("id"));
                self.error(
                    &at.child("id"),
                    format!(
                        "duplicate bot id `{}`: first defined at {}:{}",
                        b.id,
                        shown(&ffile),
                        fpos.line
                    ),
                );
                // still compiled, so its other problems are reported in this run too
                let _ = self.compile_bot(&at, b);
                continue;
            }
            if let Some(parts) = self.compile_bot(&at, b) {
                bots.insert(parts.id.clone(), (at, parts));
            }
        }

        // routes
        let mut routes: BTreeMap<String, (At, Route)> = BTreeMap::new();
        let raw_routes = std::mem::take(&mut self.routes);
        let mut seen_names: HashMap<String, At> = HashMap::new();
        for (at, parsed, name) in raw_routes {
            if let Some(name) = &name {
                if let Some(first) = seen_names.get(name) {
                    let (ffile, fpos) = self.pos_of(&first.child("name"));
                    self.error(
                        &at.child("name"),
                        format!(
                            "duplicate route name `{name}`: first defined at {}:{}",
                            shown(&ffile),
                            fpos.line
                        ),
                    );
                    // still compiled, so its other problems are reported in this run too
                    if let Some(r) = parsed {
                        let _ = self.compile_route(&at, r, &defaults, &all_bot_ids);
                    }
                    continue;
                }
                seen_names.insert(name.clone(), at.clone());
            }
            let Some(r) = parsed else { continue };
            if let Some(route) = self.compile_route(&at, r, &defaults, &all_bot_ids) {
                routes.insert(route.name.clone(), (at, route));
            }
        }

        // (bot, intent) → route
        let mut claims: HashMap<(String, String), At> = HashMap::new();
        let bot_ids: Vec<String> = bots.keys().cloned().collect();
        // In file order, so a clash is reported at the later definition.
        let mut in_file_order: Vec<&mut (At, Route)> = routes.values_mut().collect();
        in_file_order.sort_by_key(|(at, _)| (at.file, element_index(&at.pointer)));
        for (at, route) in in_file_order {
            if route.bots.is_empty() {
                route.bots = bot_ids.clone();
                // bots that failed to compile are reported already: no warning on top
                if all_bot_ids.is_empty() {
                    let m = "no bot is defined, so this route serves nothing";
                    self.push(at, true, Severity::Warning, m);
                }
            }
            let intent = match &route.intent {
                Intent::Exact(i) => i.clone(),
                Intent::Default => "*".into(),
            };
            for bot in &route.bots {
                let Some((_, parts)) = bots.get_mut(bot) else {
                    continue;
                };
                if let Some(first) = claims.get(&(bot.clone(), intent.clone())) {
                    let (ffile, fpos) = self.pos_of(first);
                    let what = if intent == "*" {
                        "the default route (`*`)".to_string()
                    } else {
                        format!("intent `{intent}`")
                    };
                    let msg = format!(
                        "bot `{bot}` already has a route for {what}: the route at {}:{}",
                        shown(&ffile),
                        fpos.line
                    );
                    self.error(&at.child("intent"), msg);
                    continue;
                }
                claims.insert((bot.clone(), intent.clone()), at.clone());
                match &route.intent {
                    Intent::Exact(i) => {
                        parts.routes.insert(i.clone(), route.name.clone());
                    }
                    Intent::Default => parts.default_route = Some(route.name.clone()),
                }
            }
        }

        // template-vs-schema check and examples
        for (at, route) in routes.values() {
            let schemas: Vec<Arc<PayloadSchema>> = route
                .schema
                .iter()
                .cloned()
                .chain(
                    route
                        .bots
                        .iter()
                        .filter_map(|b| bots.get(b).and_then(|(_, p)| p.schema.clone())),
                )
                .collect();
            self.check_template_fields(at, route, &schemas);
            if self.opts.check_examples {
                self.check_examples(at, route, &bots);
            }
        }

        if let Some(cache) = self.opts.cache {
            cache.retain(
                &self
                    .files
                    .iter()
                    .map(|f| f.path.clone())
                    .collect::<Vec<_>>(),
                &self.templates_used,
            );
        }
        let mut diagnostics = std::mem::take(&mut self.diags);
        redact(&mut diagnostics, &self.env_values);
        diagnostic::sort(&mut diagnostics);
        let has_errors = diagnostics.iter().any(Diagnostic::is_error);
        let config = (!has_errors).then(|| {
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
            Config {
                bots: bots
                    .into_iter()
                    .map(|(k, (_, p))| (k, Arc::new(p.into_bot())))
                    .collect(),
                routes: routes
                    .into_iter()
                    .map(|(k, (_, r))| (k, Arc::new(r)))
                    .collect(),
                hash: hex::encode(hasher.finalize()),
                files: self.files.iter().map(|f| f.path.clone()).collect(),
                schema_files,
            }
        });
        Loaded {
            config,
            diagnostics,
        }
    }

    // ---------- bots ----------

    fn compile_bot(&mut self, at: &At, b: raw::Bot) -> Option<BotParts> {
        let auth = self.compile_inbound_auth(&at.child("auth"), b.auth)?;
        let schema = match &b.schema {
            Some(p) => Some(self.load_schema(&at.child("schema"), p)?),
            None => None,
        };
        let intent_path = b.intent_path.unwrap_or_else(|| "/intent".into());
        let score_path = b.score_path.unwrap_or_else(|| "/intentScore".into());
        for (key, p) in [("intent_path", &intent_path), ("score_path", &score_path)] {
            if !p.is_empty() && !p.starts_with('/') {
                self.error(
                    &at.child(key),
                    format!("expected a JSON Pointer like `/intent`, got `{p}`"),
                );
                return None;
            }
        }
        let (file, pos) = self.pos_of(at);
        Some(BotParts {
            id: b.id,
            auth,
            schema,
            intent_path,
            score_path,
            routes: BTreeMap::new(),
            default_route: None,
            source: Source {
                file,
                line: pos.line,
            },
        })
    }

    fn secrets(&mut self, at: &At, values: Vec<String>) -> Option<Vec<SecretString>> {
        let mut out = Vec::with_capacity(values.len());
        let mut ok = true;
        for (i, v) in values.into_iter().enumerate() {
            let item = at.child(&i.to_string());
            if v.is_empty() && !self.unresolved(&item) {
                self.error(&item, "must not be empty");
                ok = false;
            }
            out.push(SecretString::from(v));
        }
        ok.then_some(out)
    }

    /// One secret field (a token, a password): empty is an error unless a missing
    /// variable left it empty (already reported, a warning for `validate`).
    fn secret(&mut self, at: &At, value: String) -> Option<SecretString> {
        if value.is_empty() && !self.unresolved(at) {
            self.error(at, "must not be empty");
            return None;
        }
        Some(SecretString::from(value))
    }

    fn header_name(&mut self, at: &At, name: &str) -> Option<http::HeaderName> {
        match http::HeaderName::try_from(name) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error(at, format!("`{name}` is not a valid header name"));
                None
            }
        }
    }

    fn compile_inbound_auth(&mut self, at: &At, a: raw::InboundAuth) -> Option<InboundAuth> {
        if let Some(k) = a.api_key {
            let at = at.child("api_key");
            let header = self.header_name(
                &at.child("header"),
                k.header.as_deref().unwrap_or("X-API-Key"),
            )?;
            let keys = self.secrets(&at.child("keys"), k.keys)?;
            return Some(InboundAuth::ApiKey {
                header,
                keys: keys.into(),
            });
        }
        if let Some(b) = a.bearer {
            let tokens = self.secrets(&at.child("bearer").child("tokens"), b.tokens)?;
            return Some(InboundAuth::Bearer {
                tokens: tokens.into(),
            });
        }
        if let Some(b) = a.basic {
            let at = at.child("basic");
            let password = self.secret(&at.child("password"), b.password);
            if b.username.is_empty() {
                self.error(&at.child("username"), "must not be empty");
                return None;
            }
            return Some(InboundAuth::Basic {
                username: b.username,
                password: password?,
            });
        }
        if let Some(h) = a.hmac {
            let at = at.child("hmac");
            let header = self.header_name(
                &at.child("header"),
                h.header.as_deref().unwrap_or("X-Cognigy-Signature"),
            )?;
            let secrets = self.secrets(&at.child("secrets"), h.secrets)?;
            return Some(InboundAuth::Hmac { header, secrets });
        }
        if let Some(s) = a.standard_webhooks {
            let at = at.child("standard_webhooks");
            let mut secrets = Vec::new();
            for (i, v) in s.secrets.iter().enumerate() {
                let item = at.child("secrets").child(&i.to_string());
                if self.unresolved(&item) {
                    continue;
                }
                match StandardWebhooksSecret::parse(v) {
                    Ok(s) => secrets.push(s),
                    Err(e) => {
                        self.error(&item, e.to_string());
                        return None;
                    }
                }
            }
            let tolerance = s.tolerance.map(|d| d.0).unwrap_or(Duration::from_secs(300));
            return Some(InboundAuth::StandardWebhooks { secrets, tolerance });
        }
        Some(InboundAuth::None)
    }

    fn load_schema(&mut self, at: &At, rel: &str) -> Option<Arc<PayloadSchema>> {
        let path = self.file_dir(at).join(rel);
        let key = path.canonicalize().unwrap_or_else(|_| path.clone());
        let result = self
            .schema_cache
            .entry(key)
            .or_insert_with(|| PayloadSchema::load(&path).map(Arc::new))
            .clone();
        match result {
            Ok(s) => Some(s),
            Err(e) => {
                self.error(at, format!("{e}: `{rel}` (resolved to {})", path.display()));
                None
            }
        }
    }

    // ---------- routes ----------

    fn compile_route(
        &mut self,
        at: &At,
        r: raw::Route,
        d: &raw::Defaults,
        bot_ids: &[String],
    ) -> Option<Route> {
        let errors_before = self.error_count();
        let strict = r.strict.unwrap_or(false);
        let bots = match (r.bot, r.bots) {
            (Some(_), Some(_)) => {
                self.error(&at.child("bots"), "set either `bot` or `bots`, not both");
                vec![]
            }
            (Some(b), None) => vec![b],
            (None, Some(bs)) => bs,
            (None, None) => vec![],
        };
        for (i, b) in bots.iter().enumerate() {
            if !bot_ids.contains(b) {
                let hint = diagnostic::did_you_mean(b, bot_ids.iter().map(String::as_str))
                    .map(|m| format!("; did you mean `{m}`?"))
                    .unwrap_or_default();
                let at_ref = if self.files[at.file]
                    .index
                    .value(&format!("{}/bot", at.pointer))
                    != self.files[at.file].index.value(&at.pointer)
                {
                    at.child("bot")
                } else {
                    at.child("bots").child(&i.to_string())
                };
                self.error(&at_ref, format!("unknown bot `{b}`{hint}"));
            }
        }
        let intent = match r.intent.as_str() {
            "*" => Intent::Default,
            "" => {
                self.error(
                    &at.child("intent"),
                    "must not be empty; use \"*\" for the bot's default route",
                );
                Intent::Default
            }
            i => Intent::Exact(i.to_owned()),
        };
        if intent == Intent::Default && r.min_score.is_some() {
            self.warn(&at.child("min_score"), "ignored on the default route (`*`)");
        }
        let schema = match &r.schema {
            Some(p) => self.load_schema(&at.child("schema"), p),
            None => None,
        };
        let mode = r.mode.unwrap_or(Mode::Sync);
        let deadline = r
            .deadline
            .or(d.deadline)
            .map(|x| x.0)
            .unwrap_or(Duration::from_secs(7));
        if deadline.is_zero() {
            self.error(&at.child("deadline"), "must be greater than 0");
        } else if deadline >= Duration::from_secs(8) && mode == Mode::Sync {
            self.warn(
                &at.child("deadline"),
                "is not under Cognigy's default 8s HTTP Request timeout: the bot may give up first",
            );
        }
        let log_fields = r.log_fields.clone().unwrap_or_default();
        for (i, p) in log_fields.iter().enumerate() {
            if !p.starts_with('/') {
                self.error(
                    &at.child("log_fields").child(&i.to_string()),
                    format!("expected a JSON Pointer like `/sessionId`, got `{p}`"),
                );
            }
        }
        let idempotency_key = r
            .idempotency_key
            .as_deref()
            .and_then(|s| self.template(&at.child("idempotency_key"), s, Kind::Text, strict));
        let downstream = self.compile_downstream(
            &at.child("downstream"),
            r.downstream,
            d.downstream.as_ref(),
            strict,
            deadline,
        );
        let body = r
            .body
            .as_deref()
            .and_then(|s| self.template(&at.child("body"), s, Kind::Json, strict));
        let response = r.response.map(|resp| ResponseSpec {
            status: resp.status,
            body: resp.body.as_deref().and_then(|s| {
                self.template(&at.child("response").child("body"), s, Kind::Json, strict)
            }),
        });
        let fallback = r.fallback.map(|f| FallbackSpec {
            status: f.status.unwrap_or(200),
            body: f.body.as_deref().and_then(|s| {
                self.template(&at.child("fallback").child("body"), s, Kind::Json, strict)
            }),
        });
        let retry = self.compile_retry(&at.child("retry"), r.retry.as_ref(), d.retry.as_ref());
        let breaker =
            self.compile_breaker(&at.child("breaker"), r.breaker.as_ref(), d.breaker.as_ref());
        let on_failure = r.on_failure.unwrap_or(OnFailure::Respond);
        if mode == Mode::Async {
            for (key, set) in [
                ("response", response.is_some()),
                ("fallback", fallback.is_some()),
                ("on_failure", r.on_failure.is_some()),
            ] {
                if set {
                    self.warn(
                        &at.child(key),
                        format!("`{key}` only applies to sync routes; this route is async"),
                    );
                }
            }
        }
        let mut examples = Vec::new();
        for (i, ex) in r.examples.into_iter().flatten().enumerate() {
            let ex_at = at.child("examples").child(&i.to_string());
            let payload = match ex.payload {
                raw::ExamplePayload::Inline(m) => Value::Object(m),
                raw::ExamplePayload::Path(p) => {
                    let path = self.file_dir(at).join(&p);
                    match std::fs::read_to_string(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|t| {
                            serde_json::from_str(&t).map_err(|e| format!("not valid JSON: {e}"))
                        }) {
                        Ok(v) => v,
                        Err(e) => {
                            self.error(
                                &ex_at.child("payload"),
                                format!("example payload `{p}` cannot be used: {e}"),
                            );
                            continue;
                        }
                    }
                }
            };
            let headers = ex
                .headers
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            examples.push(Example {
                name: ex.name,
                payload,
                headers,
                expect: ex.expect,
            });
        }
        if self.error_count() > errors_before {
            return None;
        }
        let (file, pos) = self.pos_of(at);
        Some(Route {
            name: r.name,
            bots,
            intent,
            min_score: r.min_score,
            schema,
            mode,
            deadline,
            idempotency_key,
            strict,
            log_fields,
            downstream: downstream?,
            body,
            response,
            retry: retry?,
            breaker: breaker.as_ref()?.0.clone(),
            health: breaker?.1,
            fallback,
            on_failure,
            examples,
            source: Source {
                file,
                line: pos.line,
            },
        })
    }

    fn error_count(&self) -> usize {
        self.diags.iter().filter(|d| d.is_error()).count()
    }

    fn template(
        &mut self,
        at: &At,
        source: &str,
        kind: Kind,
        strict: bool,
    ) -> Option<template::Template> {
        let key = (source.to_owned(), kind, strict);
        if let Some(t) = self.opts.cache.and_then(|c| c.template(&key)) {
            self.templates_used.push(key);
            return Some(t);
        }
        match template::compile(source, kind, strict) {
            Ok(t) => {
                // A JSON template without expressions is served as is: it must be JSON now.
                if let (Kind::Json, Some(text)) = (kind, t.as_static())
                    && let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text)
                {
                    self.error(at, format!("is not valid JSON (it has no `{{{{…}}}}`, so it is sent as written): {e}"));
                    return None;
                }
                if let Some(c) = self.opts.cache {
                    c.put_template(key.clone(), t.clone());
                    self.templates_used.push(key);
                }
                Some(t)
            }
            Err(e) => {
                self.template_diag(at, e.line, e.col, Severity::Error, e.message);
                None
            }
        }
    }

    fn compile_downstream(
        &mut self,
        at: &At,
        ds: raw::Downstream,
        d: Option<&raw::DownstreamDefaults>,
        strict: bool,
        deadline: Duration,
    ) -> Option<Downstream> {
        let method = match ds
            .method
            .or(d.and_then(|d| d.method))
            .unwrap_or(raw::Method::POST)
        {
            raw::Method::GET => http::Method::GET,
            raw::Method::POST => http::Method::POST,
            raw::Method::PUT => http::Method::PUT,
            raw::Method::PATCH => http::Method::PATCH,
            raw::Method::DELETE => http::Method::DELETE,
        };
        let url_at = at.child("url");
        let origin = self.check_url_template(&url_at, &ds.url);
        let url = self.template(&url_at, &ds.url, Kind::Url, strict);
        let timeout = ds
            .timeout
            .or(d.and_then(|d| d.timeout))
            .map(|x| x.0)
            .unwrap_or(Duration::from_secs(5));
        if timeout.is_zero() {
            self.error(&at.child("timeout"), "must be greater than 0");
        } else if timeout > deadline {
            self.warn(
                &at.child("timeout"),
                format!(
                    "is longer than the route's deadline ({}); the deadline cuts each try short",
                    humantime::format_duration(deadline)
                ),
            );
        }
        // lower-case name → (where, name as written, value)
        let mut header_sources: BTreeMap<String, (At, String, String)> = BTreeMap::new();
        if let Some(dh) = d.and_then(|d| d.headers.as_ref()) {
            // defaults' headers are located in the defaults block; we only know they exist
            for (k, v) in dh {
                header_sources.insert(k.to_ascii_lowercase(), (at.clone(), k.clone(), v.clone()));
            }
        }
        for (k, v) in ds.headers.iter().flatten() {
            header_sources.insert(
                k.to_ascii_lowercase(),
                (at.child("headers").child(k), k.clone(), v.clone()),
            );
        }
        let mut headers = Vec::new();
        for (name, (h_at, written, value)) in header_sources {
            // a bad name is reported at the name (the key), not at its value
            let Ok(hn) = http::HeaderName::try_from(name.as_str()) else {
                let m = format!("`{written}` is not a valid header name");
                self.push(&h_at, true, Severity::Error, m);
                continue;
            };
            if matches!(
                name.as_str(),
                "host" | "content-length" | "transfer-encoding" | "connection"
            ) {
                let m = format!("`{written}` is set by the gateway and cannot be configured");
                self.push(&h_at, true, Severity::Error, m);
                continue;
            }
            if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                self.error(&h_at, "header values must not contain CR, LF or NUL");
                continue;
            }
            let secret = self.is_from_env(&h_at);
            if let Some(t) = self.template(&h_at, &value, Kind::Text, strict) {
                headers.push(HeaderSpec {
                    name: hn,
                    value: t,
                    secret,
                });
            }
        }
        let auth = match ds.auth.clone().or_else(|| d.and_then(|d| d.auth.clone())) {
            None => OutboundAuth::None,
            Some(a) => self.compile_outbound_auth(&at.child("auth"), a)?,
        };
        let mut success = StatusSet::default();
        let patterns = ds
            .success
            .or_else(|| d.and_then(|d| d.success.clone()))
            .unwrap_or_else(|| vec![StatusPattern::Class(2)]);
        for p in patterns {
            match p {
                StatusPattern::Exact(s) => success.insert(s),
                StatusPattern::Class(c) => success.insert_class(c),
            }
        }
        let max_in_flight = ds
            .max_in_flight
            .or(d.and_then(|d| d.max_in_flight))
            .unwrap_or(64);
        let origin = origin?;
        let base = url::Url::parse(&format!("{origin}/")).ok();
        Some(Downstream {
            method,
            url: url?,
            base,
            origin,
            timeout,
            headers,
            auth,
            success,
            max_in_flight,
        })
    }

    /// Checks a URL template: http(s), templates only in path and query. Returns the origin.
    fn check_url_template(&mut self, at: &At, url: &str) -> Option<String> {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) if !s.contains("{{") => (s, r),
            _ => {
                if self.unresolved(at) {
                    return Some(String::new());
                }
                self.error(
                    at,
                    "expected an absolute http:// or https:// URL with a fixed host",
                );
                return None;
            }
        };
        if !matches!(scheme, "http" | "https") {
            self.error(
                at,
                format!("expected an http or https URL, got scheme `{scheme}`"),
            );
            return None;
        }
        let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..auth_end];
        if let Some(i) = authority.find("{{") {
            self.template_diag(at, 1, scheme.len() + 3 + i + 1, Severity::Error,
                "templates may not set the scheme, host or port: the host comes from the file; put `{{…}}` in the path or query".into());
            return None;
        }
        let origin = format!("{scheme}://{authority}");
        if self.unresolved(at) {
            return Some(origin);
        }
        // Check the rest parses with placeholder values (a template that does not
        // compile is reported by the compile that follows).
        let probe = replace_templates(url);
        match url::Url::parse(&probe) {
            Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {
                if !u.username().is_empty() || u.password().is_some() {
                    self.error(at, "credentials in the URL are not allowed; use `auth`");
                    return None;
                }
                Some(origin)
            }
            Ok(_) => {
                self.error(at, "URL has no host");
                None
            }
            Err(e) => {
                self.error(at, format!("invalid URL: {e}"));
                None
            }
        }
    }

    fn compile_outbound_auth(&mut self, at: &At, a: raw::OutboundAuth) -> Option<OutboundAuth> {
        if let Some(o) = a.oauth2 {
            let at = at.child("oauth2");
            let tu = at.child("token_url");
            let token_url = if self.unresolved(&tu) {
                url::Url::parse("http://unresolved.invalid/").expect("static URL")
            } else {
                match url::Url::parse(&o.token_url) {
                    Ok(u)
                        if matches!(u.scheme(), "http" | "https")
                            && u.username().is_empty()
                            && u.password().is_none() =>
                    {
                        u
                    }
                    _ => {
                        let shown = if self.is_from_env(&tu) {
                            "the value from the environment".to_string()
                        } else {
                            format!("`{}`", o.token_url)
                        };
                        self.error(
                            &tu,
                            format!(
                                "expected an http or https URL without credentials, got {shown}"
                            ),
                        );
                        return None;
                    }
                }
            };
            let secret = self.secret(&at.child("client_secret"), o.client_secret)?;
            return Some(OutboundAuth::OAuth2(ClientCredentials {
                token_url,
                client_id: o.client_id,
                client_secret: secret,
                scopes: o.scopes.unwrap_or_default(),
                client_auth: match o.client_auth {
                    Some(raw::ClientAuth::Body) => ClientAuth::Body,
                    _ => ClientAuth::Basic,
                },
            }));
        }
        if let Some(b) = a.bearer {
            let token = self.secret(&at.child("bearer").child("token"), b.token)?;
            return Some(OutboundAuth::Bearer(token));
        }
        Some(OutboundAuth::None)
    }

    fn compile_retry(
        &mut self,
        at: &At,
        r: Option<&raw::Retry>,
        d: Option<&raw::Retry>,
    ) -> Option<RetryPolicy> {
        let pick = |f: fn(&raw::Retry) -> Option<Dur>| {
            r.and_then(f).or_else(|| d.and_then(f)).map(|x| x.0)
        };
        let attempts = r
            .and_then(|r| r.attempts)
            .or(d.and_then(|d| d.attempts))
            .unwrap_or(3);
        let initial = pick(|r| r.backoff.as_ref().and_then(|b| b.initial))
            .unwrap_or(Duration::from_millis(200));
        let max = pick(|r| r.backoff.as_ref().and_then(|b| b.max))
            .unwrap_or(Duration::from_secs(2).max(initial));
        let retry_after_max = pick(|r| r.retry_after_max).unwrap_or(Duration::from_secs(30));
        let schedule = r
            .and_then(|r| r.schedule.clone())
            .or_else(|| d.and_then(|d| d.schedule.clone()))
            .map(|s| s.into_iter().map(|x| x.0).collect())
            .unwrap_or_else(|| {
                [10, 60, 300, 1800, 7200, 21600, 43200]
                    .into_iter()
                    .map(Duration::from_secs)
                    .collect()
            });
        match Backoff::try_new(initial, max) {
            Ok(backoff) => Some(RetryPolicy {
                attempts,
                backoff,
                retry_after_max,
                schedule,
            }),
            Err(m) => {
                let key = if initial.is_zero() { "initial" } else { "max" };
                self.error(&at.child("backoff").child(key), m.to_string());
                None
            }
        }
    }

    fn compile_breaker(
        &mut self,
        at: &At,
        b: Option<&raw::Breaker>,
        d: Option<&raw::Breaker>,
    ) -> Option<(BreakerConfig, Option<HealthSettings>)> {
        let dur = |f: fn(&raw::Breaker) -> Option<Dur>| {
            b.and_then(f).or_else(|| d.and_then(f)).map(|x| x.0)
        };
        let num = |f: fn(&raw::Breaker) -> Option<u32>| b.and_then(f).or_else(|| d.and_then(f));
        let dflt = BreakerSettings::default();
        let open_for = dur(|b| b.open_for).unwrap_or(dflt.open_for);
        let settings = BreakerSettings {
            window: dur(|b| b.window).unwrap_or(dflt.window),
            min_calls: num(|b| b.min_calls).unwrap_or(dflt.min_calls),
            failure_rate: b
                .and_then(|b| b.failure_rate)
                .or(d.and_then(|d| d.failure_rate))
                .unwrap_or(dflt.failure_rate),
            consecutive_failures: num(|b| b.consecutive_failures)
                .unwrap_or(dflt.consecutive_failures),
            slow_call: b
                .and_then(|b| b.slow_call.clone())
                .or_else(|| d.and_then(|d| d.slow_call.clone()))
                .map(|s| SlowCall {
                    threshold: s.threshold.0,
                    rate: s.rate,
                }),
            open_for,
            open_for_max: dur(|b| b.open_for_max).unwrap_or(dflt.open_for_max.max(open_for)),
            half_open_probes: num(|b| b.half_open_probes).unwrap_or(dflt.half_open_probes),
            close_after: num(|b| b.close_after).unwrap_or(dflt.close_after),
        };
        let mut ok = true;
        let health = match b
            .and_then(|b| b.health.clone())
            .or_else(|| d.and_then(|d| d.health.clone()))
        {
            Some(h) => {
                let h_at = at.child("health").child("url");
                if !self.unresolved(&h_at)
                    && !url::Url::parse(&h.url).is_ok_and(|u| {
                        matches!(u.scheme(), "http" | "https") && u.host_str().is_some()
                    })
                {
                    self.error(&h_at, "expected an absolute http or https URL");
                    ok = false;
                }
                Some(HealthSettings {
                    url: h.url,
                    interval: h.interval.map(|x| x.0).unwrap_or(Duration::from_secs(10)),
                })
            }
            None => None,
        };
        match BreakerConfig::try_new(settings) {
            Ok(cfg) => ok.then_some((cfg, health)),
            Err(errors) => {
                for e in errors {
                    // field is the key under `breaker:`, e.g. `slow_call.rate`
                    let mut e_at = at.clone();
                    for seg in e.field.split('.') {
                        e_at = e_at.child(seg);
                    }
                    self.error(&e_at, e.message);
                }
                None
            }
        }
    }

    // ---------- template fields vs payload schema ----------

    fn check_template_fields(&mut self, at: &At, route: &Route, schemas: &[Arc<PayloadSchema>]) {
        if schemas.is_empty() {
            return;
        }
        let mut templates: Vec<(At, &template::Template)> =
            vec![(at.child("downstream").child("url"), &route.downstream.url)];
        if let Some(b) = &route.body {
            templates.push((at.child("body"), b));
        }
        if let Some(k) = &route.idempotency_key {
            templates.push((at.child("idempotency_key"), k));
        }
        let headers_at = at.child("downstream").child("headers");
        for h in &route.downstream.headers {
            // header names are stored lower-case; locate the key as written
            let pointer = self.files[at.file]
                .index
                .child_ignore_case(&headers_at.pointer, h.name.as_str())
                .unwrap_or_else(|| headers_at.child(h.name.as_str()).pointer);
            templates.push((
                At {
                    file: at.file,
                    pointer,
                },
                &h.value,
            ));
        }
        for (t_at, t) in templates {
            for r in t.field_refs() {
                let mut nearest = None;
                let provided =
                    schemas
                        .iter()
                        .any(|s| match provides(&s.json, &s.json, &r.path, 0) {
                            Provided::Yes => true,
                            Provided::No(n) => {
                                nearest = nearest.take().or(n);
                                false
                            }
                        });
                if !provided {
                    let field = r.path.join(".");
                    let hint = match nearest {
                        Some(n) => format!(" (nearest: `{n}`)"),
                        None => String::new(),
                    };
                    self.template_diag(&t_at, r.line, r.col, Severity::Warning,
                        format!("template reads `{field}`, which the payload schema does not define{hint}"));
                }
            }
        }
    }

    // ---------- examples ----------

    fn check_examples(&mut self, at: &At, route: &Route, bots: &BTreeMap<String, (At, BotParts)>) {
        let bot = route.bots.first().and_then(|b| bots.get(b)).map(|(_, p)| p);
        for (i, ex) in route.examples.iter().enumerate() {
            let ex_at = at.child("examples").child(&i.to_string());
            let expect_error = ex.expect.as_ref().and_then(|e| e.error).unwrap_or(false);
            let mut violations = Vec::new();
            for s in bot
                .and_then(|b| b.schema.as_ref())
                .into_iter()
                .chain(route.schema.as_ref())
            {
                violations.extend(s.violations(&ex.payload));
            }
            let rendered = if violations.is_empty() {
                let ctx = handlebars::Context::from(ex.payload.clone());
                let mut meta = template::RenderMeta::new(
                    bot.map(|b| b.id.as_str()).unwrap_or(""),
                    &route.name,
                );
                meta.set_header_pairs(&ex.headers);
                Some(crate::render::build(route, &ctx, &meta))
            } else {
                None
            };
            let name = &ex.name;
            match (rendered, expect_error) {
                (None, true) | (Some(Err(_)), true) => {}
                (None, false) => {
                    let list = violations.iter().map(|v| format!("{} {}", if v.path.is_empty() { "/" } else { &v.path }, v.message)).collect::<Vec<_>>().join("; ");
                    self.error(&ex_at.child("payload"), format!("example `{name}`: payload fails the schema: {list}"));
                }
                (Some(Err(e)), false) => self.error(&ex_at, format!("example `{name}`: {e}")),
                (Some(Ok(_)), true) => self.error(&ex_at.child("expect").child("error"), format!("example `{name}`: expected the route to refuse this payload, but it rendered a request")),
                (Some(Ok(req)), false) => {
                    let Some(expect) = &ex.expect else { continue };
                    let e_at = ex_at.child("expect");
                    if let Some(u) = &expect.url
                        && *u != req.url {
                            self.error(&e_at.child("url"), format!("example `{name}`: url differs\n  expected: {u}\n    actual: {}", req.url));
                        }
                    if let Some(m) = expect.method {
                        let m = format!("{m:?}");
                        if m != req.method.as_str() {
                            self.error(&e_at.child("method"), format!("example `{name}`: method differs: expected {m}, actual {}", req.method));
                        }
                    }
                    for (k, v) in expect.headers.iter().flatten() {
                        let actual = req.headers.iter().find(|(n, _, _)| n.as_str().eq_ignore_ascii_case(k)).map(|(_, v, secret)| if *secret { "***".to_string() } else { v.to_str().unwrap_or("").to_string() });
                        if actual.as_deref() != Some(v.as_str()) {
                            let msg = if crate::render::is_sensitive_header(k) {
                                // either value may be a literal secret
                                let sent = if actual.is_some() { "differs" } else { "is not sent" };
                                format!("example `{name}`: header `{k}` {sent} (values of sensitive headers are not shown)")
                            } else {
                                let actual = actual.unwrap_or_else(|| "(not sent)".into());
                                format!("example `{name}`: header `{k}` differs\n  expected: {v}\n    actual: {actual}")
                            };
                            self.error(&e_at.child("headers").child(k), msg);
                        }
                    }
                    if let Some(expected) = &expect.body {
                        let actual: Value = req.body.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
                        if let Some(diff) = subset_mismatch(expected, &actual, "") {
                            let mut d_at = e_at.child("body");
                            d_at.pointer.push_str(&diff.0);
                            self.error(&d_at, format!("example `{name}`: body differs at `{}`\n  expected: {}\n    actual: {}",
                                if diff.0.is_empty() { "/" } else { &diff.0 }, diff.1, diff.2));
                        }
                    }
                }
            }
        }
    }
}

fn hash_route_file(h: &mut Sha256, path: &Path, content: &[u8]) {
    h.update(path.to_string_lossy().as_bytes());
    h.update([0]);
    h.update(content);
    h.update([0]);
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
    hex::encode(h.finalize())
}

/// A path as the author knows it: relative to the working directory when inside it.
fn shown(p: &Path) -> String {
    diagnostic::display_path(p, &std::env::current_dir().unwrap_or_default())
}

/// Parts of a bot before its route table is complete.
struct BotParts {
    id: String,
    auth: InboundAuth,
    schema: Option<Arc<PayloadSchema>>,
    intent_path: String,
    score_path: String,
    routes: BTreeMap<String, String>,
    default_route: Option<String>,
    source: Source,
}

impl BotParts {
    fn into_bot(self) -> Bot {
        Bot {
            id: self.id,
            auth: self.auth,
            schema: self.schema,
            intent_path: self.intent_path,
            score_path: self.score_path,
            routes: self.routes,
            default_route: self.default_route,
            source: self.source,
        }
    }
}

/// `/routes/12` → 12: the position of an element in its file's list.
fn element_index(pointer: &str) -> usize {
    pointer
        .rsplit('/')
        .next()
        .and_then(|i| i.parse().ok())
        .unwrap_or(0)
}

/// Environment values shorter than this are not redacted: masking `1` or `en`
/// everywhere would garble messages, and such values are no secrets.
const MIN_REDACTED_LEN: usize = 4;

/// Replaces every environment value (as is and JSON-escaped) in messages with `***`.
fn redact(diags: &mut [Diagnostic], env_values: &BTreeSet<String>) {
    let mut needles: Vec<String> = env_values
        .iter()
        .filter(|v| v.len() >= MIN_REDACTED_LEN)
        .flat_map(|v| [v.clone(), template::json_string_escape(v)])
        .collect();
    // longest first, so a value containing another is masked whole
    needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    needles.dedup();
    for d in diags {
        for n in &needles {
            if d.message.contains(n.as_str()) {
                d.message = d.message.replace(n.as_str(), "***");
            }
        }
    }
}

/// `https://h/{{a}}/x?q={{b}}` → `https://h/x/x?q=x`, to check the URL's static shape.
fn replace_templates(url: &str) -> String {
    let mut out = String::new();
    let mut rest = url;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        out.push('x');
        rest = match rest[i..].find("}}") {
            Some(j) => rest[i + j + 2..].trim_start_matches('}'),
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// Does `expected` match `actual` as a subset? `None` if yes, else (pointer, expected, actual).
fn subset_mismatch(expected: &Value, actual: &Value, at: &str) -> Option<(String, String, String)> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let p = format!("{at}/{k}");
                match a.get(k) {
                    Some(av) => {
                        if let Some(d) = subset_mismatch(ev, av, &p) {
                            return Some(d);
                        }
                    }
                    None => return Some((p, ev.to_string(), "(missing)".into())),
                }
            }
            None
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => e
            .iter()
            .zip(a)
            .enumerate()
            .find_map(|(i, (ev, av))| subset_mismatch(ev, av, &format!("{at}/{i}"))),
        (e, a) if e == a => None,
        (e, a) => Some((at.to_string(), e.to_string(), a.to_string())),
    }
}

enum Provided {
    Yes,
    /// Not provided; the nearest defined path, if any.
    No(Option<String>),
}

/// Can a payload valid under `node` have a value at `path`?
fn provides(root: &Value, node: &Value, path: &[String], depth: usize) -> Provided {
    if depth > 32 {
        return Provided::Yes;
    }
    let node = match node.get("$ref").and_then(Value::as_str) {
        Some(r) => match r.strip_prefix('#').and_then(|p| root.pointer(p)) {
            Some(n) => n,
            None => return Provided::Yes, // external refs: not followed here
        },
        None => node,
    };
    let Some((seg, rest)) = path.split_first() else {
        return Provided::Yes;
    };
    let mut nearest: Option<String> = None;
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = node.get(key) {
            for b in branches {
                match provides(root, b, path, depth + 1) {
                    Provided::Yes => return Provided::Yes,
                    Provided::No(n) => nearest = nearest.or(n),
                }
            }
        }
    }
    let props = node.get("properties").and_then(Value::as_object);
    if let Some(sub) = props.and_then(|p| p.get(seg)) {
        return match provides(root, sub, rest, depth + 1) {
            Provided::Yes => Provided::Yes,
            Provided::No(n) => Provided::No(n.map(|n| format!("{seg}.{n}"))),
        };
    }
    if node.get("patternProperties").is_some() {
        return Provided::Yes;
    }
    if seg.bytes().all(|b| b.is_ascii_digit()) {
        if let Some(items) = node.get("items").filter(|i| i.is_object()) {
            return match provides(root, items, rest, depth + 1) {
                Provided::Yes => Provided::Yes,
                Provided::No(n) => Provided::No(n.map(|n| format!("{seg}.{n}"))),
            };
        }
        if node.get("type").and_then(Value::as_str) == Some("array") {
            return Provided::Yes;
        }
    }
    if let Some(ap) = node.get("additionalProperties").filter(|a| a.is_object()) {
        return provides(root, ap, rest, depth + 1);
    }
    match props {
        Some(p) if !p.is_empty() => {
            let n = diagnostic::did_you_mean(seg, p.keys().map(String::as_str))
                .map(str::to_owned)
                .or(nearest);
            Provided::No(n)
        }
        _ if nearest.is_some() => Provided::No(nearest),
        _ => Provided::Yes,
    }
}

/// File position of line `tline`, column `tcol` of the text of the scalar at `value`.
fn locate_in_scalar(text: &str, value: Pos, tline: usize, tcol: usize) -> Pos {
    let lines: Vec<&str> = text.lines().collect();
    let Some(first) = lines.get((value.line as usize).saturating_sub(1)) else {
        return value;
    };
    let rest: String = first
        .chars()
        .skip((value.col as usize).saturating_sub(1))
        .collect();
    let tline = tline.max(1) as u32;
    let tcol = tcol.max(1) as u32;
    if let Some(header) = block_scalar_header(&lines, value) {
        // every content line shares the first one's indentation
        return Pos {
            line: header + tline,
            col: value.col - 1 + tcol,
        };
    }
    match rest.chars().next() {
        Some('|' | '>') => {
            // block scalar: content starts on the next line, at its indentation
            let content_line = value.line + tline;
            let indent = lines
                .iter()
                .skip(value.line as usize)
                .find(|l| !l.trim().is_empty())
                .map(|l| l.len() - l.trim_start().len())
                .unwrap_or(0) as u32;
            Pos {
                line: content_line,
                col: indent + tcol,
            }
        }
        Some('"' | '\'') if tline == 1 => Pos {
            line: value.line,
            col: value.col + tcol,
        },
        _ if tline == 1 => Pos {
            line: value.line,
            col: value.col + tcol - 1,
        },
        _ => Pos {
            line: value.line + tline - 1,
            col: tcol,
        },
    }
}

/// serde-saphyr places a block scalar (`body: |`) at its first content line.
/// When `value` is such a line, the 1-based line number of the header above it
/// (template line 1 is the line after it).
fn block_scalar_header(lines: &[&str], value: Pos) -> Option<u32> {
    let at = (value.line as usize).checked_sub(1)?;
    let line = lines.get(at)?;
    let before: String = line
        .chars()
        .take((value.col as usize).saturating_sub(1))
        .collect();
    if !before.trim().is_empty() {
        return None;
    }
    // only blank lines may sit between the header and the first content line
    let (i, header) = lines[..at]
        .iter()
        .enumerate()
        .rev()
        .find(|(_, l)| !l.trim().is_empty())?;
    let code = header.split(" #").next().unwrap_or(header).trim_end();
    let indicator = code.rsplit([' ', '\t']).next()?;
    let mut chars = indicator.chars();
    (matches!(chars.next(), Some('|' | '>')) && chars.all(|c| matches!(c, '+' | '-' | '1'..='9')))
        .then_some(i as u32 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_position_in_block_scalar_includes_indentation() {
        let text = "routes:\n  - body: |\n      {\n        \"a\": \"{{{x}}}\"\n      }\n    body2: >-\n\n      {{y}}\n";
        let (_, index) = yaml::parse(text).unwrap();
        // `{{{x}}}` is at line 2, column 9 of the template; the block is indented by 6
        assert_eq!(
            locate_in_scalar(text, index.value("/routes/0/body"), 2, 9),
            Pos { line: 4, col: 15 }
        );
        // a leading blank line counts as template line 1
        assert_eq!(
            locate_in_scalar(text, index.value("/routes/0/body2"), 2, 1),
            Pos { line: 8, col: 7 }
        );
    }

    #[test]
    fn pointer_display() {
        assert_eq!(
            pointer_to_path("/routes/0/breaker/failure_rate"),
            "routes[0].breaker.failure_rate"
        );
        assert_eq!(
            pointer_to_path("/bots/1/auth/api_key/keys/0"),
            "bots[1].auth.api_key.keys[0]"
        );
        assert_eq!(pointer_to_path(""), "");
    }

    #[test]
    fn subset_matching() {
        let a = serde_json::json!({"a": 1, "b": {"c": [1, {"d": 2, "e": 3}]}, "x": "y"});
        assert!(subset_mismatch(&serde_json::json!({"b": {"c": [1, {"d": 2}]}}), &a, "").is_none());
        let d = subset_mismatch(&serde_json::json!({"b": {"c": [1, {"d": 5}]}}), &a, "").unwrap();
        assert_eq!(d.0, "/b/c/1/d");
        assert_eq!(
            subset_mismatch(&serde_json::json!({"z": 1}), &a, "")
                .unwrap()
                .2,
            "(missing)"
        );
    }

    #[test]
    fn scalar_positions() {
        let text =
            "body: |\n  {\n    \"a\": \"{{x}}\"\n  }\nurl: \"https://h/{{y}}\"\nplain: a{{z}}\n";
        assert_eq!(
            locate_in_scalar(text, Pos { line: 1, col: 7 }, 2, 11),
            Pos { line: 3, col: 13 }
        );
        assert_eq!(
            locate_in_scalar(text, Pos { line: 5, col: 6 }, 1, 11),
            Pos { line: 5, col: 17 }
        );
        assert_eq!(
            locate_in_scalar(text, Pos { line: 6, col: 8 }, 1, 2),
            Pos { line: 6, col: 9 }
        );
    }

    #[test]
    fn schema_field_check() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "slots": {"type": "object", "properties": {"customerId": {"type": "array", "items": {"type": "object", "properties": {"keyphrase": {"type": "string"}}}}}},
                "data": {"type": "object"},
                "ctx": {"$ref": "#/$defs/ctx"}
            },
            "$defs": {"ctx": {"type": "object", "properties": {"policyNumber": {"type": "string"}}}}
        });
        let p = |s: &str| s.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert!(matches!(
            provides(&schema, &schema, &p("slots.customerId.0.keyphrase"), 0),
            Provided::Yes
        ));
        assert!(matches!(
            provides(&schema, &schema, &p("data.anything.at.all"), 0),
            Provided::Yes
        ));
        assert!(matches!(
            provides(&schema, &schema, &p("ctx.policyNumber"), 0),
            Provided::Yes
        ));
        match provides(&schema, &schema, &p("slots.custmerId.0.keyphrase"), 0) {
            Provided::No(n) => assert_eq!(n.as_deref(), Some("slots.customerId")),
            Provided::Yes => panic!("should not be provided"),
        }
        match provides(&schema, &schema, &p("ctx.policyNumbr"), 0) {
            Provided::No(n) => assert_eq!(n.as_deref(), Some("ctx.policyNumber")),
            Provided::Yes => panic!("should not be provided"),
        }
    }
}
