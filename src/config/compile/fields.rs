//! The template-vs-schema check: every field a route's templates read (URL,
//! body, idempotency key, header values) should be one the payload schemas
//! (the route's and its bots') can provide; otherwise a warning, with the
//! nearest defined path as a hint.
//!
//! Also the `optional-key-field` lint: every field `idempotency_key` reads
//! should be *required* by the schemas, since a payload without it renders an
//! empty key (422) or a key shared by unrelated calls (`{{sessionId}}-` for
//! every input of a session).
//!
//! It never makes an error (schemas may be looser than payloads), and never
//! follows a `$ref` outside the schema document.

use std::sync::Arc;

use serde_json::Value;

use super::{At, Compiler, Severity};
use crate::config::diagnostic;
use crate::config::model::Route;
use crate::config::raw::LintRule;
use crate::payload::PayloadSchema;
use crate::template;

impl Compiler<'_> {
    pub(super) fn check_template_fields(
        &mut self,
        at: &At,
        route: &Route,
        parent: Option<&Route>,
        schemas: &[Arc<PayloadSchema>],
    ) {
        if schemas.is_empty() {
            return;
        }
        // an `also` target's body and key taken from its route are checked there
        let own = |t: &template::Template, p: Option<&template::Template>| {
            p.is_none_or(|p| p.source() != t.source())
        };
        let mut templates: Vec<(At, &template::Template)> =
            vec![(at.child("downstream").child("url"), &route.downstream.url)];
        if let Some(b) = &route.body
            && own(b, parent.and_then(|p| p.body.as_ref()))
        {
            templates.push((at.child("body"), b));
        }
        if let Some(k) = &route.idempotency_key
            && own(k, parent.and_then(|p| p.idempotency_key.as_ref()))
        {
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

impl Compiler<'_> {
    /// `optional-key-field`: each field the idempotency key reads must be
    /// required by the route's schema, or by the schema of every bot it serves.
    /// Without any schema nothing is known, and nothing is said.
    pub(super) fn check_key_fields(
        &mut self,
        at: &At,
        route: &Route,
        route_schema: Option<&Arc<PayloadSchema>>,
        bot_schemas: &[Option<Arc<PayloadSchema>>],
    ) {
        let Some(key) = &route.idempotency_key else {
            return;
        };
        if route_schema.is_none() && bot_schemas.iter().all(Option::is_none)
            || self.lint_allowed(at, LintRule::OptionalKeyField)
        {
            return;
        }
        let required =
            |s: &Arc<PayloadSchema>, path: &[String]| requires(&s.json, &s.json, path, 0);
        for r in key.field_refs() {
            let by_route = route_schema.is_some_and(|s| required(s, &r.path));
            let by_bots = !bot_schemas.is_empty()
                && bot_schemas
                    .iter()
                    .all(|s| s.as_ref().is_some_and(|s| required(s, &r.path)));
            if by_route || by_bots {
                continue;
            }
            let field = r.path.join(".");
            let how = match r.path.as_slice() {
                [top] => format!(" (`\"required\": [\"{top}\"]`)"),
                _ => String::new(),
            };
            let m = format!(
                "[lint:{}] `idempotency_key` reads `{field}`, which the payload schema does not \
                 require: a payload without it gets an empty or shared key; make the route's \
                 `schema` require it{how}",
                LintRule::OptionalKeyField.name(),
            );
            let k_at = at.child("idempotency_key");
            self.template_diag(&k_at, r.line, r.col, Severity::Warning, m);
        }
    }
}

/// Does every payload valid under `node` have a value at `path`? Follows local
/// `$ref`s; `allOf` needs one branch to require it, `anyOf`/`oneOf` all; an
/// array index needs `minItems` above it.
pub(super) fn requires(root: &Value, node: &Value, path: &[String], depth: usize) -> bool {
    if depth > 32 {
        return false;
    }
    let node = match node.get("$ref").and_then(Value::as_str) {
        Some(r) => match r.strip_prefix('#').and_then(|p| root.pointer(p)) {
            Some(n) => n,
            None => return false,
        },
        None => node,
    };
    let Some((seg, rest)) = path.split_first() else {
        return true;
    };
    if let Some(Value::Array(branches)) = node.get("allOf")
        && branches.iter().any(|b| requires(root, b, path, depth + 1))
    {
        return true;
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = node.get(key)
            && !branches.is_empty()
            && branches.iter().all(|b| requires(root, b, path, depth + 1))
        {
            return true;
        }
    }
    if let Ok(i) = seg.parse::<u64>() {
        let min_items = node.get("minItems").and_then(Value::as_u64).unwrap_or(0);
        return min_items > i
            && node
                .get("items")
                .is_some_and(|items| requires(root, items, rest, depth + 1));
    }
    let listed = node
        .get("required")
        .and_then(Value::as_array)
        .is_some_and(|r| r.iter().any(|k| k.as_str() == Some(seg)));
    if !listed {
        return false;
    }
    match node.get("properties").and_then(|p| p.get(seg)) {
        Some(sub) => requires(root, sub, rest, depth + 1),
        None => rest.is_empty(),
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

#[cfg(test)]
mod tests {
    use super::requires;
    use serde_json::json;

    fn req(schema: &serde_json::Value, path: &str) -> bool {
        let path: Vec<String> = path.split('.').map(str::to_owned).collect();
        requires(schema, schema, &path, 0)
    }

    #[test]
    fn a_key_field_is_required_only_when_every_payload_has_it() {
        let s = json!({
            "required": ["inputId", "slots"],
            "properties": {
                "inputId": {"type": "string"},
                "sessionId": {"type": "string"},
                "slots": {"$ref": "#/$defs/slots"},
                "either": {"anyOf": [{"required": ["a"]}, {"required": ["a", "b"]}]}
            },
            "allOf": [{"required": ["either"]}],
            "$defs": {"slots": {
                "required": ["id"],
                "properties": {"id": {"type": "array", "minItems": 1, "items": {"required": ["k"]}}}
            }}
        });
        assert!(req(&s, "inputId"));
        assert!(!req(&s, "sessionId"), "listed, not required");
        assert!(req(&s, "slots.id.0.k"), "through $ref and minItems");
        assert!(!req(&s, "slots.id.1.k"), "minItems is 1");
        assert!(!req(&s, "slots.other"));
        assert!(req(&s, "either"), "required by an allOf branch");
        let t = json!({"anyOf": [{"required": ["a"]}, {"required": ["a", "b"]}]});
        assert!(req(&t, "a"), "every anyOf branch");
        assert!(!req(&t, "b"), "one anyOf branch only");
    }
}
