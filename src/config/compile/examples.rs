//! Route `examples`: their payloads are read (inline or from a JSON file next
//! to the route file) when the route compiles; `gateway validate` then checks
//! each against the bot and route schemas, renders the request the route
//! would send (the same `render::build` as `serve`), and compares it with
//! `expect` (URL, method, headers, body as a subset).
//!
//! It never sends anything, and never shows a sensitive header's value.

use serde_json::Value;

use super::elements::Bots;
use super::{At, Compiler};
use crate::config::model::*;
use crate::config::raw;
use crate::template;

impl Compiler<'_> {
    /// Reads each example's payload; one that cannot be read is an error and skipped.
    pub(super) fn load_examples(
        &mut self,
        at: &At,
        written: Option<Vec<raw::Example>>,
    ) -> Vec<Example> {
        let mut examples = Vec::new();
        for (i, ex) in written.into_iter().flatten().enumerate() {
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
        examples
    }

    pub(super) fn check_examples(&mut self, at: &At, route: &Route, bots: &Bots) {
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
                Some(crate::config::render::build(route, &ctx, &meta))
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
                    self.compare_request(&e_at, name, expect, &req);
                    for (tname, texpect) in expect.also.iter().flatten() {
                        let t_at = e_at.child("also").child(tname);
                        self.check_also_example(&t_at, name, route, tname, texpect, &ex.payload, &ex.headers, bot.map(|b| b.id.as_str()));
                    }
                }
            }
        }
    }

    /// An example's `expect.also.<name>`: the target's request for the payload.
    #[allow(clippy::too_many_arguments)]
    fn check_also_example(
        &mut self,
        t_at: &At,
        name: &str,
        route: &Route,
        tname: &str,
        expect: &raw::Expect,
        payload: &Value,
        headers: &[(String, String)],
        bot: Option<&str>,
    ) {
        let full = super::also::target_name(&route.name, tname);
        let Some(target) = route.also.iter().find(|t| t.name == full) else {
            let names: Vec<&str> = route
                .also
                .iter()
                .filter_map(|t| t.name.strip_prefix(&format!("{}/", route.name)))
                .collect();
            let known = if names.is_empty() {
                "the route has no `also` targets".to_string()
            } else {
                format!("its targets: {}", names.join(", "))
            };
            self.error(
                t_at,
                format!("example `{name}`: no `also` target named `{tname}`; {known}"),
            );
            return;
        };
        if expect.error.is_some() || expect.also.is_some() {
            self.error(t_at, format!("example `{name}`: an `also` target's expectation takes `method`, `url`, `headers` and `body` only"));
            return;
        }
        let ctx = handlebars::Context::from(payload.clone());
        let mut meta = template::RenderMeta::new(bot.unwrap_or(""), &target.name);
        meta.set_header_pairs(headers);
        match crate::config::render::build(target, &ctx, &meta) {
            Ok(req) => self.compare_request(t_at, name, expect, &req),
            Err(e) => self.error(t_at, format!("example `{name}`: target `{tname}`: {e}")),
        }
    }

    /// Compares a rendered request with an example's expectation at `e_at`.
    fn compare_request(
        &mut self,
        e_at: &At,
        name: &str,
        expect: &raw::Expect,
        req: &crate::config::render::OutboundRequest,
    ) {
        if let Some(u) = &expect.url
            && *u != req.url
        {
            self.error(
                &e_at.child("url"),
                format!(
                    "example `{name}`: url differs\n  expected: {u}\n    actual: {}",
                    req.url
                ),
            );
        }
        if let Some(m) = expect.method {
            let m = format!("{m:?}");
            if m != req.method.as_str() {
                self.error(
                    &e_at.child("method"),
                    format!(
                        "example `{name}`: method differs: expected {m}, actual {}",
                        req.method
                    ),
                );
            }
        }
        for (k, v) in expect.headers.iter().flatten() {
            let actual = req
                .headers
                .iter()
                .find(|(n, _, _)| n.as_str().eq_ignore_ascii_case(k))
                .map(|(_, v, secret)| {
                    if *secret {
                        "***".to_string()
                    } else {
                        v.to_str().unwrap_or("").to_string()
                    }
                });
            if actual.as_deref() != Some(v.as_str()) {
                let msg = if crate::config::render::is_sensitive_header(k) {
                    // either value may be a literal secret
                    let sent = if actual.is_some() {
                        "differs"
                    } else {
                        "is not sent"
                    };
                    format!(
                        "example `{name}`: header `{k}` {sent} (values of sensitive headers are not shown)"
                    )
                } else {
                    let actual = actual.unwrap_or_else(|| "(not sent)".into());
                    format!(
                        "example `{name}`: header `{k}` differs\n  expected: {v}\n    actual: {actual}"
                    )
                };
                self.error(&e_at.child("headers").child(k), msg);
            }
        }
        if let Some(expected) = &expect.body {
            let actual: Value = req
                .body
                .as_deref()
                .and_then(|b| serde_json::from_str(b).ok())
                .unwrap_or(Value::Null);
            if let Some(diff) = subset_mismatch(expected, &actual, "") {
                let mut d_at = e_at.child("body");
                d_at.pointer.push_str(&diff.0);
                self.error(
                    &d_at,
                    format!(
                        "example `{name}`: body differs at `{}`\n  expected: {}\n    actual: {}",
                        if diff.0.is_empty() { "/" } else { &diff.0 },
                        diff.1,
                        diff.2
                    ),
                );
            }
        }
    }
}

/// Does `expected` match `actual` as a subset? `None` if yes, else (pointer, expected, actual).
pub(super) fn subset_mismatch(
    expected: &Value,
    actual: &Value,
    at: &str,
) -> Option<(String, String, String)> {
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
