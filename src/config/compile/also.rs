//! A route's `also:` targets (SPEC §9): each compiles into an async [`Route`]
//! of its own, named `<route>/<name>`, so the runtime, the worker, metrics,
//! the status page and `/admin/deliveries` handle it as any async route (its
//! own breaker, bulkhead, rate limit, retry schedule and dedupe). A target
//! claims no intent: it is reached only through its route
//! ([`Route::also`]). Route names cannot hold a `/`, so no target name
//! collides with a route's.
//!
//! What a target does not set comes from its route: `body`,
//! `idempotency_key`, `retry` and `breaker` (when a target writes `retry` or
//! `breaker`, its fields win over the `defaults:` block's, as a route's do);
//! the payload schema, bots, intent, deadline, `strict` and `log_fields` are
//! always the route's. Its `downstream` is compiled and checked exactly as a
//! route's (the `defaults:` block applies).

use std::collections::HashMap;
use std::sync::Arc;

use super::{At, Compiler, Taint};
use crate::breaker::BreakerConfig;
use crate::config::model::*;
use crate::config::raw;
use crate::downstream::retry::RetryPolicy;
use crate::template::{Kind, Template};

/// What a target takes from the route it belongs to (already compiled).
pub(super) struct Parent<'p> {
    pub name: &'p str,
    pub bots: &'p [String],
    pub intent: &'p Intent,
    pub schema: &'p Option<Arc<crate::payload::PayloadSchema>>,
    pub deadline: std::time::Duration,
    pub strict: bool,
    pub log_fields: &'p [String],
    pub idempotency_key: &'p Option<Template>,
    pub body: &'p Option<Template>,
    /// The route's body came from the environment.
    pub body_secret: bool,
    pub retry: Option<&'p RetryPolicy>,
    pub breaker: Option<&'p (BreakerConfig, Option<HealthSettings>)>,
}

/// The name an `also` target is known by: `<route>/<name>`.
pub fn target_name(route: &str, name: &str) -> String {
    format!("{route}/{name}")
}

impl Compiler<'_> {
    /// Compiles the `also:` list of the route at `at`; a target in error is
    /// reported and left out (the route is then not kept either: the caller
    /// counts errors).
    pub(super) fn compile_also(
        &mut self,
        at: &At,
        written: Option<Vec<raw::AlsoTarget>>,
        parent: &Parent,
        d: &raw::Defaults,
        taint: &Taint,
    ) -> Vec<Arc<Route>> {
        let mut out = Vec::new();
        let mut seen: HashMap<String, At> = HashMap::new();
        for (i, t) in written.into_iter().flatten().enumerate() {
            let t_at = at.child("also").child(&i.to_string());
            if let Some(first) = seen.get(&t.name) {
                let (_, fpos) = self.pos_of(&first.child("name"));
                let m = format!(
                    "duplicate `also` target name `{}`: first defined at line {}",
                    t.name, fpos.line
                );
                self.error(&t_at.child("name"), m);
                continue;
            }
            seen.insert(t.name.clone(), t_at.clone());
            let taint = taint.for_item(&format!("/also/{i}"));
            if let Some(route) = self.compile_target(&t_at, t, parent, d, &taint) {
                out.push(Arc::new(route));
            }
        }
        out
    }

    fn compile_target(
        &mut self,
        at: &At,
        t: raw::AlsoTarget,
        parent: &Parent,
        d: &raw::Defaults,
        taint: &Taint,
    ) -> Option<Route> {
        let strict = parent.strict;
        let idempotency_key = match &t.idempotency_key {
            Some(s) => Some(self.template(&at.child("idempotency_key"), s, Kind::Text, strict)?),
            None => parent.idempotency_key.clone(),
        };
        let body = match &t.body {
            Some(s) => Some(self.template(&at.child("body"), s, Kind::Json, strict)?),
            None => parent.body.clone(),
        };
        let body_secret = match &t.body {
            Some(_) => self.is_from_env(&at.child("body")),
            None => parent.body_secret,
        };
        let secret_parts = body_secret || self.is_from_env(&at.child("downstream").child("url"));
        let downstream = self.compile_downstream(
            &at.child("downstream"),
            t.downstream,
            d.downstream.as_ref(),
            strict,
            parent.deadline,
            taint,
        );
        let retry = match (&t.retry, parent.retry) {
            (None, Some(r)) => Some(r.clone()),
            (own, _) => {
                self.compile_retry(&at.child("retry"), own.as_ref(), d.retry.as_ref(), taint)
            }
        };
        // An inherited breaker keeps the route's thresholds but not its health
        // probe: the probe's URL belongs to the route's downstream, not this one.
        let breaker = match (&t.breaker, parent.breaker) {
            (None, Some((b, _))) => Some((b.clone(), None)),
            (own, _) => self.compile_breaker(
                &at.child("breaker"),
                own.as_ref(),
                d.breaker.as_ref(),
                taint,
            ),
        };
        let downstream = downstream?;
        let (breaker, mut health) = breaker?;
        if let Some(h) = &mut health {
            h.credentials = self.health_credentials(at, h, &downstream);
        }
        let (file, pos) = self.pos_of(at);
        Some(Route {
            name: target_name(parent.name, &t.name),
            bots: parent.bots.to_vec(),
            intent: parent.intent.clone(),
            min_score: None,
            schema: parent.schema.clone(),
            mode: Mode::Async,
            deadline: parent.deadline,
            idempotency_key,
            strict,
            log_fields: parent.log_fields.to_vec(),
            downstream,
            body,
            secret_parts,
            response: None,
            retry: retry?,
            breaker,
            health,
            fallback: None,
            on_failure: OnFailure::Respond,
            examples: Vec::new(),
            also: Vec::new(),
            also_of: Some(parent.name.to_owned()),
            source: Source {
                file,
                line: pos.line,
            },
        })
    }
}
