//! Route files → a validated, immutable [`Config`], collecting every problem.
//!
//! One function, [`load`], is shared by `gateway validate`, `serve` start-up
//! and hot reload. It never stops at the first problem: each file is parsed,
//! `${VAR}`-expanded and checked against the route-file schema; each valid
//! element is compiled (defaults, templates, payload schemas, references);
//! then cross-file checks run (unique names, bot references, one route per
//! (bot, intent)), the template-vs-schema check, and route examples.
//!
//! This module owns the state of one load (`Compiler`), its diagnostic
//! helpers, the order of the phases and the assembly of the [`Config`]. The
//! phases live in the sibling files:
//! - `intake`: reading, parsing (with the [`ParseCache`]), `${VAR}` expansion and
//!   the shape check of each file; which elements go on to be compiled; hashing
//! - `elements`: the `defaults:` block, bots and routes; unique ids and names,
//!   bot references, one route per (bot, intent)
//! - `downstream`: a route's `downstream`, outbound `auth`, `retry` and `breaker`
//! - `also`: a route's `also:` targets, each compiled into an async route `<route>/<name>`
//! - `fields`: template fields the payload schemas cannot provide (warnings)
//! - `examples`: route `examples`, rendered and matched
//! - `position`: JSON pointers and template line/col → what diagnostics show
//! - `taint`: what was removed from an element in error, so its other fields
//!   are still checked without misleading follow-ups
//!
//! It never does network I/O, never produces a config from a load with errors,
//! and never lets an environment value reach a diagnostic (they are redacted).

mod also;
mod downstream;
mod elements;
mod examples;
mod fields;
mod intake;
mod lint;
mod position;
mod taint;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::diagnostic::{self, Diagnostic, Severity};
use super::model::*;
use super::redact::Redactor;
use super::yaml::{Pos, SpanIndex};
use super::{load as walk, raw};
use crate::payload::PayloadSchema;
use intake::TemplateKey;
use position::locate_in_scalar;
use taint::Taint;

pub use intake::{ParseCache, current_hash};
pub use position::pointer_to_path;

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
        referenced: BTreeMap::new(),
        defaults_tls_raw: None,
        defaults_tls: None,
        templates_used: Vec::new(),
        forbidden_headers: Vec::new(),
        defaults_at: None,
        lint_allow: HashMap::new(),
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
    /// Pointers of the values that hold environment content, with each value as
    /// written (before `${VAR}` expansion), which is what may be shown.
    from_env: HashMap<String, String>,
    unresolved: HashSet<String>,
    /// Pointers of the values that reference a variable as written (`${…}`),
    /// set or not: a secret written without one is a lint warning.
    env_refs: HashSet<String>,
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

/// An element as written: where, parsed with its [`Taint`] (unless it cannot
/// stand without its values in error), and its name or id as written.
type Written<T> = (At, Option<(T, Taint)>, Option<String>);

/// The state of one load: filled file by file by `intake`, then compiled by `finish`.
struct Compiler<'a> {
    opts: &'a LoadOptions<'a>,
    files: Vec<FileCtx>,
    diags: Vec<Diagnostic>,
    /// Every bot written, in file order: parsed (without its values in error,
    /// see [`Taint`]) unless it cannot stand without them, and its id as written
    /// (for references and did-you-mean either way).
    bots: Vec<Written<raw::Bot>>,
    /// Every route written, as `bots`, with its name as written.
    routes: Vec<Written<raw::Route>>,
    /// The `defaults:` blocks that could be parsed (more than one is an error).
    defaults: Vec<(At, raw::Defaults, Taint)>,
    schema_cache: HashMap<PathBuf, Result<Arc<PayloadSchema>, String>>,
    hasher: Sha256,
    /// Every value read from the environment: secret until proven otherwise, so
    /// redacted from diagnostics (example diffs show rendered URLs and bodies).
    env_values: BTreeSet<String>,
    /// Files read for `${file:…}` and downstream `tls`, with their keyed digests
    /// (for the hash; their directories are watched).
    referenced: BTreeMap<PathBuf, [u8; 32]>,
    /// The `defaults:` block's `downstream.tls` (compiled once, on first use:
    /// `defaults_tls`; its paths relative to `defaults_at`'s file).
    defaults_tls_raw: Option<raw::DownstreamTls>,
    defaults_tls: Option<Result<Option<Arc<DownstreamTls>>, ()>>,
    /// Template cache keys used by this load (the rest is evicted).
    templates_used: Vec<TemplateKey>,
    /// While a route is compiled: the inbound headers (lower-case) its templates
    /// may not read with the `header` helper, and why.
    forbidden_headers: Vec<(String, String)>,
    /// Where the `defaults:` block in force was written (once taken): what its
    /// values are looked up by (e.g. whether a default header came from the
    /// environment).
    defaults_at: Option<At>,
    /// The lint rules each bot and route (by file and pointer) allows.
    lint_allow: HashMap<(usize, String), Vec<raw::LintRule>>,
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

    pub(super) fn is_from_env(&self, at: &At) -> bool {
        self.files[at.file].from_env.contains_key(&at.pointer)
    }

    /// The value at `at` as written, before `${VAR}` expansion, when it held a
    /// reference to a set variable (`None`: the value is as written).
    fn as_written(&self, at: &At) -> Option<&str> {
        self.files[at.file]
            .from_env
            .get(&at.pointer)
            .map(String::as_str)
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

    fn error_count(&self) -> usize {
        self.diags.iter().filter(|d| d.is_error()).count()
    }

    /// The phases across files, then the `Config` unless there was an error.
    fn finish(mut self) -> Loaded {
        let (defaults, dtaint) = self.take_defaults();
        let (mut bots, all_bot_ids) = self.compile_bots();
        let mut routes = self.compile_routes(&defaults, &dtaint, &all_bot_ids, &bots);
        self.claim_intents(&mut routes, &mut bots, &all_bot_ids);

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
            self.check_template_fields(at, route, None, &schemas);
            let bot_schemas: Vec<Option<Arc<PayloadSchema>>> = route
                .bots
                .iter()
                .filter_map(|b| bots.get(b).map(|(_, p)| p.schema.clone()))
                .collect();
            self.check_key_fields(at, route, route.schema.as_ref(), &bot_schemas);
            // a kept route has every target it wrote, in order
            for (i, target) in route.also.iter().enumerate() {
                let t_at = at.child("also").child(&i.to_string());
                self.check_template_fields(&t_at, target, Some(route), &schemas);
                let own_key = match (&target.idempotency_key, &route.idempotency_key) {
                    (Some(t), Some(r)) => t.source() != r.source(),
                    (t, _) => t.is_some(),
                };
                if own_key {
                    self.check_key_fields(&t_at, target, route.schema.as_ref(), &bot_schemas);
                }
            }
            // with values removed from `defaults:`, examples would run on stand-ins
            if self.opts.check_examples && dtaint.is_clean() {
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
        let redactor = Redactor::new(&self.env_values);
        redact(&mut diagnostics, &redactor);
        diagnostic::sort(&mut diagnostics);
        let has_errors = diagnostics.iter().any(Diagnostic::is_error);
        let config = (!has_errors).then(|| {
            let (hash, schema_files) = self.config_hash();
            Config {
                bots: bots
                    .into_iter()
                    .map(|(k, (_, p))| (k, Arc::new(p.into_bot())))
                    .collect(),
                routes: routes
                    .into_values()
                    .flat_map(|(_, r)| {
                        let targets: Vec<_> =
                            r.also.iter().map(|t| (t.name.clone(), t.clone())).collect();
                        std::iter::once((r.name.clone(), Arc::new(r))).chain(targets)
                    })
                    .collect(),
                hash,
                redactor,
                files: self.files.iter().map(|f| f.path.clone()).collect(),
                schema_files,
                referenced_files: self.referenced.keys().cloned().collect(),
            }
        });
        Loaded {
            config,
            diagnostics,
        }
    }
}

/// A path as the author knows it: relative to the working directory when inside it.
fn shown(p: &Path) -> String {
    diagnostic::display_path(p, &std::env::current_dir().unwrap_or_default())
}

/// Replaces every environment value (as is, JSON-escaped and percent-encoded) in messages with `***`.
fn redact(diags: &mut [Diagnostic], redactor: &Redactor) {
    for d in diags {
        d.message = redactor.redact(&d.message);
    }
}
