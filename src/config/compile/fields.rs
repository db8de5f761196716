//! The template-vs-schema check: every field a route's templates read (URL,
//! body, idempotency key, header values) should be one the payload schemas
//! (the route's and its bots') can provide; otherwise a warning, with the
//! nearest defined path as a hint.
//!
//! It never makes an error (schemas may be looser than payloads), and never
//! follows a `$ref` outside the schema document.

use std::sync::Arc;

use serde_json::Value;

use super::{At, Compiler, Severity};
use crate::config::diagnostic;
use crate::config::model::Route;
use crate::payload::PayloadSchema;
use crate::template;

impl Compiler<'_> {
    pub(super) fn check_template_fields(
        &mut self,
        at: &At,
        route: &Route,
        schemas: &[Arc<PayloadSchema>],
    ) {
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
}

pub(super) enum Provided {
    Yes,
    /// Not provided; the nearest defined path, if any.
    No(Option<String>),
}

/// Can a payload valid under `node` have a value at `path`?
pub(super) fn provides(root: &Value, node: &Value, path: &[String], depth: usize) -> Provided {
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
