//! `${NAME}` and `${NAME:-default}` in route files, applied to string values
//! after YAML parsing (so a parse error can never show an expanded secret).
//!
//! `$${` writes a literal `${`. The environment is passed in as a lookup
//! function so tests and `validate` need no real environment.

use serde_json::Value;

/// What expansion of one string found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expansion {
    pub value: String,
    /// Names referenced without a default and not set.
    pub missing: Vec<String>,
    /// Whether any part of the value came from the environment (treat it as secret when shown).
    pub from_env: bool,
}

/// A `${` without a closing `}` or with an invalid name.
#[derive(Debug, PartialEq, Eq)]
pub struct EnvSyntaxError(pub String);

/// Expands one string.
pub fn expand(
    s: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Expansion, EnvSyntaxError> {
    if !s.contains('$') {
        return Ok(Expansion {
            value: s.to_owned(),
            ..Default::default()
        });
    }
    let mut out = Expansion::default();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.value.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(r) = after.strip_prefix("$${") {
            out.value.push_str("${");
            rest = r;
            continue;
        }
        if !after.starts_with("${") {
            out.value.push('$');
            rest = &after[1..];
            continue;
        }
        let Some(end) = after.find('}') else {
            return Err(EnvSyntaxError("`${` without a closing `}`".into()));
        };
        let inner = &after[2..end];
        let (name, default) = match inner.find(":-") {
            Some(j) => (&inner[..j], Some(&inner[j + 2..])),
            None => (inner, None),
        };
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(EnvSyntaxError(format!(
                "`${{{inner}}}` is not a valid variable reference: expected ${{NAME}} or ${{NAME:-default}} with NAME made of A-Z, 0-9 and _"
            )));
        }
        match (lookup(name), default) {
            (Some(v), _) if !(v.is_empty() && default.is_some()) => {
                out.value.push_str(&v);
                out.from_env = true;
            }
            (_, Some(d)) => out.value.push_str(d),
            (Some(v), None) => {
                out.value.push_str(&v);
                out.from_env = true;
            }
            (None, None) => out.missing.push(name.to_owned()),
        }
        rest = &after[end + 1..];
    }
    out.value.push_str(rest);
    Ok(out)
}

/// Whether `s` references a variable (`${NAME}` or `${NAME:-default}`) as
/// written, before expansion; `$${` is a literal and no reference.
pub fn has_reference(s: &str) -> bool {
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        let after = &rest[i..];
        if let Some(r) = after.strip_prefix("$${") {
            rest = r;
        } else if after.starts_with("${") {
            return true;
        } else {
            rest = &after[1..];
        }
    }
    false
}

/// The pointers of every string value of `doc` (as written) that references a variable.
pub fn reference_pointers(doc: &Value) -> Vec<String> {
    fn walk(v: &Value, pointer: &mut String, out: &mut Vec<String>) {
        match v {
            Value::String(s) if has_reference(s) => out.push(pointer.clone()),
            Value::Array(items) => {
                let len = pointer.len();
                for (i, item) in items.iter().enumerate() {
                    pointer.push('/');
                    pointer.push_str(&i.to_string());
                    walk(item, pointer, out);
                    pointer.truncate(len);
                }
            }
            Value::Object(map) => {
                let len = pointer.len();
                for (k, item) in map {
                    pointer.push('/');
                    pointer.push_str(&k.replace('~', "~0").replace('/', "~1"));
                    walk(item, pointer, out);
                    pointer.truncate(len);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(doc, &mut String::new(), &mut out);
    out
}

/// One expansion problem at a JSON pointer.
#[derive(Debug)]
pub struct EnvProblem {
    pub pointer: String,
    pub kind: EnvProblemKind,
}

#[derive(Debug)]
pub enum EnvProblemKind {
    Missing(Vec<String>),
    Syntax(String),
}

/// Result of expanding a whole document.
#[derive(Debug, Default)]
pub struct DocExpansion {
    pub problems: Vec<EnvProblem>,
    /// Pointers whose value includes environment content.
    pub from_env: Vec<String>,
    /// Pointers whose value references a missing variable (left unresolved).
    pub unresolved: Vec<String>,
}

/// Expands every string value (not keys) in `doc`, in place.
pub fn expand_document(doc: &mut Value, lookup: &dyn Fn(&str) -> Option<String>) -> DocExpansion {
    let mut acc = DocExpansion::default();
    let mut pointer = String::new();
    walk(doc, &mut pointer, lookup, &mut acc);
    acc
}

fn walk(
    v: &mut Value,
    pointer: &mut String,
    lookup: &dyn Fn(&str) -> Option<String>,
    acc: &mut DocExpansion,
) {
    match v {
        // most strings hold no reference: leave them as they are, without allocating
        Value::String(s) if !s.contains('$') => {}
        Value::String(s) => match expand(s, lookup) {
            Ok(e) => {
                if e.from_env {
                    acc.from_env.push(pointer.clone());
                }
                if !e.missing.is_empty() {
                    acc.unresolved.push(pointer.clone());
                    acc.problems.push(EnvProblem {
                        pointer: pointer.clone(),
                        kind: EnvProblemKind::Missing(e.missing),
                    });
                }
                *s = e.value;
            }
            Err(EnvSyntaxError(m)) => {
                acc.unresolved.push(pointer.clone());
                acc.problems.push(EnvProblem {
                    pointer: pointer.clone(),
                    kind: EnvProblemKind::Syntax(m),
                });
            }
        },
        Value::Array(items) => {
            let len = pointer.len();
            for (i, item) in items.iter_mut().enumerate() {
                pointer.push('/');
                pointer.push_str(&i.to_string());
                walk(item, pointer, lookup, acc);
                pointer.truncate(len);
            }
        }
        Value::Object(map) => {
            let len = pointer.len();
            for (k, item) in map.iter_mut() {
                pointer.push('/');
                if k.contains(['~', '/']) {
                    pointer.push_str(&k.replace('~', "~0").replace('/', "~1"));
                } else {
                    pointer.push_str(k);
                }
                walk(item, pointer, lookup, acc);
                pointer.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("crm.internal".into()),
            "EMPTY" => Some(String::new()),
            "TOKEN" => Some("s3cr3t".into()),
            _ => None,
        }
    }

    fn ex(s: &str) -> Expansion {
        expand(s, &env).unwrap()
    }

    #[test]
    fn plain_strings_are_untouched() {
        assert_eq!(ex("a $ b").value, "a $ b");
        assert!(!ex("abc").from_env);
    }

    #[test]
    fn set_variable_and_default() {
        assert_eq!(ex("https://${HOST}/x").value, "https://crm.internal/x");
        assert!(ex("${HOST}").from_env);
        assert_eq!(ex("${NOPE:-https://d}/x").value, "https://d/x");
        assert!(!ex("${NOPE:-d}").from_env);
        // an empty variable takes the default, like the shell's :-
        assert_eq!(ex("${EMPTY:-d}").value, "d");
        assert_eq!(ex("${EMPTY}").value, "");
    }

    #[test]
    fn missing_without_default_is_reported() {
        let e = ex("Bearer ${NOPE} ${ALSO_NOPE}");
        assert_eq!(e.missing, vec!["NOPE".to_string(), "ALSO_NOPE".into()]);
    }

    #[test]
    fn escapes_and_syntax_errors() {
        assert_eq!(ex("$${HOST}").value, "${HOST}");
        assert!(expand("${HOST", &env).is_err());
        assert!(expand("${1X}", &env).is_err());
        assert!(expand("${a-b}", &env).is_err());
    }

    #[test]
    fn references_as_written() {
        assert!(has_reference("${A}"));
        assert!(has_reference("Basic ${A:-x}"));
        assert!(has_reference("$${A} ${B}"));
        assert!(!has_reference("$${A}"));
        assert!(!has_reference("plain $ text"));
        let doc = serde_json::json!({"a": ["x", "${T}"], "b/c": "$${L}", "d": {"e": "${U:-u}"}});
        assert_eq!(
            reference_pointers(&doc),
            vec!["/a/1".to_string(), "/d/e".into()]
        );
    }

    #[test]
    fn document_expansion_tracks_pointers() {
        let mut doc =
            serde_json::json!({"a": {"t": "${TOKEN}", "n": 5, "l": ["${NOPE}"]}, "${HOST}": "k"});
        let r = expand_document(&mut doc, &env);
        assert_eq!(doc["a"]["t"], "s3cr3t");
        assert_eq!(r.from_env, vec!["/a/t".to_string()]);
        assert_eq!(r.unresolved, vec!["/a/l/0".to_string()]);
        // keys are not expanded
        assert!(doc.get("${HOST}").is_some());
    }
}
