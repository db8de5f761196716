//! The elements of a configuration: the `defaults:` block (at most one), bots
//! (inbound auth, payload schema, intent and score pointers) and routes
//! (references, intent, deadline, templates, examples' payloads), then the
//! checks across them: unique bot ids and route names, known bots, one route
//! per (bot, intent). A duplicate is still compiled, so its other problems are
//! reported in the same run.
//!
//! An element with shape errors comes without its values in error and with
//! its [`Taint`]: it is compiled for the diagnostics of its other fields, never
//! kept, and comparisons with a removed value are skipped. It never reads
//! route files (`intake` does) and never renders a template (`examples` does).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use super::{At, Compiler, Severity, Taint, shown};
use crate::auth::{InboundAuth, StandardWebhooksSecret};
use crate::config::diagnostic;
use crate::config::model::*;
use crate::config::raw;
use crate::payload::PayloadSchema;
use crate::template::{self, Kind};

/// Compiled bots by id, with where each was defined.
pub(super) type Bots = BTreeMap<String, (At, BotParts)>;

/// Compiled routes by name, with where each was defined.
pub(super) type Routes = BTreeMap<String, (At, Route)>;

/// Inbound headers no template may read with the `header` helper, whatever the
/// bot (SPEC §7.2): they carry credentials.
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "cookie", "x-api-key"];

/// The headers of a bot's own auth mode (lower-case), which the templates of
/// its routes may not read.
fn auth_headers(auth: &InboundAuth) -> Vec<String> {
    match auth {
        InboundAuth::ApiKey { header, .. } | InboundAuth::Hmac { header, .. } => {
            vec![header.as_str().to_owned()]
        }
        InboundAuth::StandardWebhooks { .. } => {
            ["webhook-id", "webhook-timestamp", "webhook-signature"]
                .map(str::to_owned)
                .to_vec()
        }
        InboundAuth::Bearer { .. } | InboundAuth::Basic { .. } => vec!["authorization".into()],
        InboundAuth::None => vec![],
    }
}

impl Compiler<'_> {
    /// The `defaults:` block, with the values in error removed from it (its
    /// taint); a second one (in any file) is an error.
    pub(super) fn take_defaults(&mut self) -> (raw::Defaults, Taint) {
        match self.defaults.len() {
            0 => (raw::Defaults::default(), Taint::default()),
            _ => {
                let mut all = std::mem::take(&mut self.defaults);
                let (first_at, first, taint) = all.remove(0);
                self.defaults_at = Some(first_at.clone());
                // the line of the `defaults:` key, not of its first child
                let ffile = self.files[first_at.file].path.clone();
                let fpos = self.files[first_at.file].index.key(&first_at.pointer);
                for (at, _, _) in all {
                    let msg = format!(
                        "a `defaults:` block is already defined at {}:{}; at most one file may hold one",
                        shown(&ffile),
                        fpos.line
                    );
                    self.push(&at, true, Severity::Error, msg);
                }
                self.lint_defaults(&first_at, &first);
                self.defaults_tls_raw = first.downstream.as_ref().and_then(|d| d.tls.clone());
                (first, taint)
            }
        }
    }

    /// Compiles every bot; returns them by id, and the ids of all bots written
    /// (compiled or not), against which route references are checked.
    pub(super) fn compile_bots(&mut self) -> (Bots, Vec<String>) {
        let mut bots: Bots = BTreeMap::new();
        let raw_bots = std::mem::take(&mut self.bots);
        let all_bot_ids: Vec<String> = raw_bots
            .iter()
            .filter_map(|(_, _, id)| id.clone())
            .collect();
        for (at, parsed, _) in raw_bots {
            let Some((b, taint)) = parsed else { continue };
            self.lint_bot(&at, &b);
            if !taint.is_clean() {
                // compiled for the diagnostics of its other fields, never kept
                let _ = self.compile_bot(&at, b);
                continue;
            }
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
        (bots, all_bot_ids)
    }

    /// Compiles every route; a duplicate name is an error. `dtaint` is what was
    /// removed from the `defaults:` block; `bots` the compiled bots, whose auth
    /// headers their routes' templates may not read.
    pub(super) fn compile_routes(
        &mut self,
        defaults: &raw::Defaults,
        dtaint: &Taint,
        all_bot_ids: &[String],
        bots: &Bots,
    ) -> Routes {
        let auth: BTreeMap<&str, Vec<String>> = bots
            .iter()
            .map(|(id, (_, parts))| (id.as_str(), auth_headers(&parts.auth)))
            .collect();
        let mut routes: Routes = BTreeMap::new();
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
                    if let Some((r, taint)) = parsed {
                        let taint = taint.union(dtaint);
                        self.forbid_headers(&r, &auth);
                        self.lint_route(&at, &r, defaults);
                        let _ = self.compile_route(&at, r, defaults, &taint, all_bot_ids);
                    }
                    continue;
                }
                seen_names.insert(name.clone(), at.clone());
            }
            let Some((r, own)) = parsed else { continue };
            let taint = own.union(dtaint);
            self.forbid_headers(&r, &auth);
            self.lint_route(&at, &r, defaults);
            let route = self.compile_route(&at, r, defaults, &taint, all_bot_ids);
            // a route with values in error is compiled for the diagnostics of its
            // other fields only: claims and examples would judge it by stand-ins
            if let (Some(route), true) = (route, own.is_clean()) {
                routes.insert(route.name.clone(), (at, route));
            }
        }
        self.forbidden_headers.clear();
        routes
    }

    /// Sets the inbound headers the templates of `r` may not read: credentials,
    /// and the auth headers of the bots it serves (all bots without `bot`/`bots`).
    fn forbid_headers(&mut self, r: &raw::Route, auth: &BTreeMap<&str, Vec<String>>) {
        let mut forbidden: Vec<(String, String)> = CREDENTIAL_HEADERS
            .iter()
            .map(|h| (h.to_string(), "it carries credentials".to_string()))
            .collect();
        let served: Vec<&str> = match (&r.bot, &r.bots) {
            (Some(b), _) => vec![b.as_str()],
            (None, Some(bs)) => bs.iter().map(String::as_str).collect(),
            (None, None) => auth.keys().copied().collect(),
        };
        for bot in served {
            for h in auth.get(bot).into_iter().flatten() {
                if !forbidden.iter().any(|(f, _)| f == h) {
                    forbidden.push((h.clone(), format!("bot `{bot}` authenticates with it")));
                }
            }
        }
        self.forbidden_headers = forbidden;
    }

    /// Gives routes without `bot`/`bots` every bot, and fills each bot's route
    /// table; a second route for one (bot, intent) is an error.
    pub(super) fn claim_intents(
        &mut self,
        routes: &mut Routes,
        bots: &mut Bots,
        all_bot_ids: &[String],
    ) {
        let mut claims: HashMap<(String, String), At> = HashMap::new();
        let bot_ids: Vec<String> = bots.keys().cloned().collect();
        // In file order, so a clash is reported at the later definition.
        let mut in_file_order: Vec<&mut (At, Route)> = routes.values_mut().collect();
        in_file_order.sort_by_key(|(at, _)| (at.file, element_index(&at.pointer)));
        for (at, route) in in_file_order {
            if route.bots.is_empty() {
                route.bots = bot_ids.clone();
                for target in &mut route.also {
                    // not shared yet: the config is assembled after the claims
                    if let Some(t) = Arc::get_mut(target) {
                        t.bots = bot_ids.clone();
                    }
                }
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
        let rate_limit = self.rate_limit(&at.child("rate_limit"), b.rate_limit)?;
        let (file, pos) = self.pos_of(at);
        Some(BotParts {
            id: b.id,
            auth,
            schema,
            intent_path,
            score_path,
            rate_limit,
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
    pub(super) fn secret(&mut self, at: &At, value: String) -> Option<SecretString> {
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

    /// `taint`: the values removed from the route and from the `defaults:`
    /// block (pointers relative to the route, e.g. `/downstream/timeout`).
    fn compile_route(
        &mut self,
        at: &At,
        r: raw::Route,
        d: &raw::Defaults,
        taint: &Taint,
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
            (None, Some(bs)) if bs.is_empty() => {
                self.error(
                    &at.child("bots"),
                    "an empty list means no bot, not every bot: list the bots this route \
                     serves, or leave `bots` out for every bot",
                );
                vec![]
            }
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
        // a bad `mode` stands as sync: no warning that only a sync route deserves
        let mode_known = !taint.touches("/mode");
        if deadline.is_zero() {
            self.error(&at.child("deadline"), "must be greater than 0");
        } else if deadline >= Duration::from_secs(8) && mode == Mode::Sync && mode_known {
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
            taint,
        );
        let secret_parts = self.is_from_env(&at.child("body"))
            || self.is_from_env(&at.child("downstream").child("url"));
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
        let retry = self.compile_retry(
            &at.child("retry"),
            r.retry.as_ref(),
            d.retry.as_ref(),
            taint,
        );
        let breaker = self.compile_breaker(
            &at.child("breaker"),
            r.breaker.as_ref(),
            d.breaker.as_ref(),
            taint,
        );
        let breaker = match (breaker, &downstream) {
            (Some((cfg, Some(mut health))), Some(ds)) => {
                health.credentials = self.health_credentials(at, &health, ds);
                Some((cfg, Some(health)))
            }
            (b, _) => b,
        };
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
        let also = self.compile_also(
            at,
            r.also,
            &super::also::Parent {
                name: &r.name,
                bots: &bots,
                intent: &intent,
                schema: &schema,
                deadline,
                strict,
                log_fields: &log_fields,
                idempotency_key: &idempotency_key,
                body: &body,
                body_secret: self.is_from_env(&at.child("body")),
                retry: retry.as_ref(),
                breaker: breaker.as_ref(),
            },
            d,
            taint,
        );
        let examples = self.load_examples(at, r.examples);
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
            secret_parts,
            response,
            retry: retry?,
            breaker: breaker.as_ref()?.0.clone(),
            health: breaker?.1,
            fallback,
            on_failure,
            examples,
            also,
            also_of: None,
            source: Source {
                file,
                line: pos.line,
            },
        })
    }

    /// Compiles a template of the route being compiled: it must compile, keep a
    /// JSON body's shape, and read no forbidden header (SPEC §7.2). Every
    /// problem is reported at its position.
    pub(super) fn template(
        &mut self,
        at: &At,
        source: &str,
        kind: Kind,
        strict: bool,
    ) -> Option<template::Template> {
        let t = self.compile_template(at, source, kind, strict)?;
        let mut ok = true;
        for read in t.header_reads() {
            let message = match &read.name {
                None => "the `header` helper takes a literal header name (`{{header \"X-Trace\"}}`): with a computed one, no one can tell it never reads a credential".to_string(),
                Some(name) => {
                    let lower = name.to_ascii_lowercase();
                    let Some((_, why)) = self.forbidden_headers.iter().find(|(h, _)| *h == lower) else {
                        continue;
                    };
                    format!("the `header` helper may not read `{name}`: {why}")
                }
            };
            self.template_diag(at, read.line, read.col, Severity::Error, message);
            ok = false;
        }
        ok.then_some(t)
    }

    /// Compiles a template (or takes it from the cache), with its JSON shape checked.
    fn compile_template(
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
                let misplaced = t.shape_errors();
                for e in &misplaced {
                    self.template_diag(at, e.line, e.col, Severity::Error, e.message.clone());
                }
                if !misplaced.is_empty() {
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
}

/// Parts of a bot before its route table is complete.
pub(super) struct BotParts {
    pub(super) id: String,
    pub(super) auth: InboundAuth,
    pub(super) schema: Option<Arc<PayloadSchema>>,
    pub(super) intent_path: String,
    pub(super) score_path: String,
    pub(super) rate_limit: Option<crate::ratelimit::RateLimit>,
    pub(super) routes: BTreeMap<String, String>,
    pub(super) default_route: Option<String>,
    pub(super) source: Source,
}

impl BotParts {
    pub(super) fn into_bot(self) -> Bot {
        Bot {
            id: self.id,
            auth: self.auth,
            schema: self.schema,
            intent_path: self.intent_path,
            score_path: self.score_path,
            rate_limit: self.rate_limit,
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
