//! Structural check of one route file against the route-file JSON Schema
//! (the same schema `gateway schema` prints and editors use), reporting every
//! problem at once: unknown keys with "did you mean", wrong types, bad
//! durations and statuses, ranges, "exactly one of" blocks.
//!
//! Messages quote what the author wrote (the pre-`${VAR}` text), never an
//! expanded value, so they cannot leak a secret from the environment.

use std::sync::LazyLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde_json::Value;

use super::raw::{self, DURATION_PATTERN, STATUS_CLASS_PATTERN};

/// One structural problem: where (JSON pointer, and whether the key or the value is meant) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError {
    pub pointer: String,
    /// Point at the key rather than the value (unknown keys).
    pub at_key: bool,
    pub message: String,
}

struct RouteFileSchema {
    json: Value,
    validator: jsonschema::Validator,
}

static SCHEMA: LazyLock<RouteFileSchema> = LazyLock::new(|| {
    let json = raw::route_file_schema();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&json)
        .expect("the route-file schema compiles");
    RouteFileSchema { json, validator }
});

/// Checks `doc` (expanded) against the route-file schema. `original` is the
/// document before `${VAR}` expansion, used to quote values; problems at
/// `unresolved` pointers (missing variables, reported elsewhere) are dropped.
pub fn check(doc: &Value, original: &Value, unresolved: &[String]) -> Vec<ShapeError> {
    let mut out = Vec::new();
    if doc.is_null() {
        // an empty file, or one holding only comments: nothing to check
        return out;
    }
    if !doc.is_object() {
        out.push(ShapeError {
            pointer: String::new(),
            at_key: false,
            message: "a route file must be a mapping with `bots`, `routes` and/or `defaults`"
                .into(),
        });
        return out;
    }
    for err in SCHEMA.validator.iter_errors(doc) {
        let pointer = err.instance_path().as_str().to_string();
        if unresolved.contains(&pointer) {
            continue;
        }
        let schema_path = err.schema_path().as_str().to_string();
        let quoted_value = quote(original.pointer(&pointer));
        let quoted = || quoted_value.clone();
        match err.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                let allowed = allowed_keys(&schema_path);
                for key in unexpected {
                    let hint = match super::diagnostic::did_you_mean(
                        key,
                        allowed.iter().map(String::as_str),
                    ) {
                        Some(m) => format!("; did you mean `{m}`?"),
                        None => format!("; expected one of: {}", allowed.join(", ")),
                    };
                    out.push(ShapeError {
                        pointer: format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1")),
                        at_key: true,
                        message: format!("unknown key `{key}`{hint}"),
                    });
                }
            }
            ValidationErrorKind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                out.push(ShapeError {
                    pointer,
                    at_key: true,
                    message: format!("missing required key `{name}`"),
                });
            }
            ValidationErrorKind::Type { kind } => {
                let expected = match kind {
                    TypeKind::Single(t) => t.to_string(),
                    TypeKind::Multiple(ts) => ts
                        .iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(" or "),
                };
                let got = type_name(original.pointer(&pointer).unwrap_or(doc));
                let expected = article(&expected);
                out.push(ShapeError {
                    pointer,
                    at_key: false,
                    message: format!("expected {expected}, got {got}"),
                });
            }
            ValidationErrorKind::Pattern { pattern } => {
                let what = if pattern == DURATION_PATTERN {
                    "a duration like 250ms, 5s, 2m or 1h".to_string()
                } else if pattern == STATUS_CLASS_PATTERN {
                    "a status like 409 or a class like 2xx".to_string()
                } else if pattern.starts_with("^[A-Za-z0-9]") {
                    "a name of letters, digits, `-`, `_` and `.`, starting with a letter or digit, at most 64 long".to_string()
                } else {
                    format!("text matching `{pattern}`")
                };
                out.push(ShapeError {
                    pointer,
                    at_key: false,
                    message: format!("expected {what}, got {}", quoted()),
                });
            }
            ValidationErrorKind::Minimum { .. } | ValidationErrorKind::Maximum { .. } => {
                let node = schema_node(parent(&schema_path));
                let (min, max) = (
                    node.and_then(|n| n.get("minimum")),
                    node.and_then(|n| n.get("maximum")),
                );
                let range = match (min, max) {
                    (Some(a), Some(b)) => format!("must be between {} and {}", num(a), num(b)),
                    (Some(a), None) => format!("must be at least {}", num(a)),
                    (None, Some(b)) => format!("must be at most {}", num(b)),
                    _ => "is out of range".into(),
                };
                out.push(ShapeError {
                    pointer,
                    at_key: false,
                    message: format!("{range}, got {}", quoted()),
                });
            }
            ValidationErrorKind::MinItems { limit } => {
                out.push(ShapeError {
                    pointer,
                    at_key: false,
                    message: format!(
                        "must list at least {limit} item{}",
                        if *limit == 1 { "" } else { "s" }
                    ),
                });
            }
            ValidationErrorKind::MinProperties { .. }
            | ValidationErrorKind::MaxProperties { .. } => {
                let node = schema_node(parent(&schema_path));
                let modes: Vec<String> = node
                    .and_then(|n| n.get("properties"))
                    .and_then(Value::as_object)
                    .map(|p| p.keys().map(|k| format!("`{k}`")).collect())
                    .unwrap_or_default();
                let found: Vec<String> = doc
                    .pointer(&pointer)
                    .and_then(Value::as_object)
                    .map(|o| o.keys().map(|k| format!("`{k}`")).collect())
                    .unwrap_or_default();
                let found = if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(" and ")
                };
                out.push(ShapeError {
                    pointer,
                    at_key: false,
                    message: format!(
                        "exactly one of {} must be set, found {found}",
                        modes.join(", ")
                    ),
                });
            }
            ValidationErrorKind::Enum { options } => {
                let opts: Vec<String> = options
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|o| {
                                format!(
                                    "`{}`",
                                    o.as_str()
                                        .map(str::to_owned)
                                        .unwrap_or_else(|| o.to_string())
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(ShapeError {
                    pointer,
                    at_key: false,
                    message: format!("expected one of {}, got {}", opts.join(", "), quoted()),
                });
            }
            ValidationErrorKind::AnyOf { .. } => {
                let node = schema_node(parent(&schema_path));
                let is_status = node
                    .and_then(|n| n.get("description"))
                    .and_then(Value::as_str)
                    .is_some_and(|d| d.contains("status"));
                let what = if is_status {
                    "a status like 409 or a class like 2xx".to_string()
                } else if schema_path.contains("payload") || pointer.ends_with("/payload") {
                    "a JSON file path or an inline payload mapping".to_string()
                } else {
                    "a value of one of the allowed forms".to_string()
                };
                out.push(ShapeError {
                    pointer,
                    at_key: false,
                    message: format!("expected {what}, got {}", quoted()),
                });
            }
            ValidationErrorKind::MinLength { .. } => {
                out.push(ShapeError {
                    pointer,
                    at_key: false,
                    message: "must not be empty".into(),
                });
            }
            other => {
                let keyword = schema_path
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let _ = other;
                out.push(ShapeError {
                    pointer,
                    at_key: false,
                    message: format!("does not match the route-file schema (`{keyword}`)"),
                });
            }
        }
    }
    out
}

fn parent(schema_path: &str) -> &str {
    schema_path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

fn schema_node(pointer: &str) -> Option<&'static Value> {
    SCHEMA.json.pointer(pointer)
}

fn allowed_keys(schema_path: &str) -> Vec<String> {
    schema_node(parent(schema_path))
        .and_then(|n| n.get("properties"))
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 => format!("{}", f as i64),
        Some(f) => f.to_string(),
        None => v.to_string(),
    }
}

/// Quotes a scalar the author wrote; structures are described by type only.
pub(crate) fn quote(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => {
            let s: String = s.chars().take(80).collect();
            format!("`{s}`")
        }
        Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
        Some(other) => type_name(other).to_string(),
        None => "nothing".into(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn article(t: &str) -> String {
    t.split(" or ")
        .map(|t| match t {
            "object" => "a mapping".to_string(),
            "array" => "a list".to_string(),
            "integer" => "an integer".to_string(),
            "null" => "null".to_string(),
            other => format!("a {other}"),
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errs(doc: Value) -> Vec<(String, String)> {
        check(&doc, &doc, &[])
            .into_iter()
            .map(|e| (e.pointer, e.message))
            .collect()
    }

    #[test]
    fn empty_or_comment_only_file_is_valid() {
        assert_eq!(errs(Value::Null), vec![]);
        let e = errs(json!(["a", "list"]));
        assert_eq!(e.len(), 1, "{e:?}");
    }

    #[test]
    fn every_problem_in_one_pass() {
        let doc = json!({"routes": [{
            "name": "a", "intent": "x", "retyr": {},
            "downstream": {"url": "https://h", "timeout": "5 sec"},
            "breaker": {"failure_rate": 1.5},
        }]});
        let e = errs(doc);
        assert!(
            e.contains(&(
                "/routes/0/retyr".into(),
                "unknown key `retyr`; did you mean `retry`?".into()
            )),
            "{e:?}"
        );
        assert!(
            e.contains(&(
                "/routes/0/downstream/timeout".into(),
                "expected a duration like 250ms, 5s, 2m or 1h, got `5 sec`".into()
            )),
            "{e:?}"
        );
        assert!(
            e.contains(&(
                "/routes/0/breaker/failure_rate".into(),
                "must be between 0 and 1, got 1.5".into()
            )),
            "{e:?}"
        );
        assert_eq!(e.len(), 3, "{e:?}");
    }

    #[test]
    fn exactly_one_auth_mode() {
        let e = errs(
            json!({"bots": [{"id": "b", "auth": {"api_key": {"keys": ["k"]}, "bearer": {"tokens": ["t"]}}}]}),
        );
        assert_eq!(e[0].0, "/bots/0/auth");
        assert!(e[0].1.starts_with("exactly one of `api_key`"), "{e:?}");
        assert!(e[0].1.ends_with("found `api_key` and `bearer`"), "{e:?}");
        let e = errs(json!({"bots": [{"id": "b", "auth": {}}]}));
        assert!(e[0].1.ends_with("found none"), "{e:?}");
    }

    #[test]
    fn types_enums_statuses_required() {
        let e = errs(
            json!({"routes": [{"name": "a", "intent": "x", "mode": "later",
            "downstream": {"url": "https://h", "success": ["2xx", 409, "6xx"], "max_in_flight": "many"}}]}),
        );
        assert!(
            e.contains(&(
                "/routes/0/mode".into(),
                "expected one of `sync`, `async`, got `later`".into()
            )),
            "{e:?}"
        );
        assert!(
            e.contains(&(
                "/routes/0/downstream/success/2".into(),
                "expected a status like 409 or a class like 2xx, got `6xx`".into()
            )),
            "{e:?}"
        );
        assert!(
            e.contains(&(
                "/routes/0/downstream/max_in_flight".into(),
                "expected an integer, got a string".into()
            )),
            "{e:?}"
        );
        let e = errs(json!({"routes": [{"name": "a", "downstream": {"url": "https://h"}}]}));
        assert_eq!(
            e,
            vec![(
                "/routes/0".to_string(),
                "missing required key `intent`".to_string()
            )]
        );
    }

    #[test]
    fn quotes_original_text_not_expanded_secret() {
        let original = json!({"routes": [{"name": "a", "intent": "x", "downstream": {"url": "https://h", "timeout": "${SECRET}"}}]});
        let expanded = json!({"routes": [{"name": "a", "intent": "x", "downstream": {"url": "https://h", "timeout": "hunter2"}}]});
        let e = check(&expanded, &original, &[]);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].message.contains("${SECRET}") && !e[0].message.contains("hunter2"),
            "{e:?}"
        );
    }
}
