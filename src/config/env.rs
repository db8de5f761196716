//! `${NAME}`, `${NAME:-default}` and `${file:PATH}` in route files, applied to
//! string values after YAML parsing (so a parse error can never show an
//! expanded secret).
//!
//! `$${` writes a literal `${`. The environment and the files are passed in as
//! lookup functions, so tests and `validate` need no real environment; this
//! module never reads a file itself (the caller resolves `PATH` against the
//! route file's directory and trims the trailing newline).

use serde_json::Value;

/// What expansion of one string found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expansion {
    pub value: String,
    /// Names referenced without a default and not set.
    pub missing: Vec<String>,
    /// `${file:PATH}` references that could not be read: the path as written and why.
    pub missing_files: Vec<(String, FileError)>,
    /// Whether any part of the value came from the environment or a `${file:…}`
    /// (treat it as secret when shown).
    pub from_env: bool,
}

/// Why a `${file:PATH}` could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileError {
    /// Not there or not readable: like an unset variable (a warning for `validate`
    /// without `--require-env`, an error for `serve`).
    Missing(String),
    /// There, but unusable (not UTF-8 text): always an error.
    Invalid(String),
}

/// A `${file:…}` lookup that has no files (the plain [`expand`]).
fn no_files(_: &str) -> Result<String, FileError> {
    Err(FileError::Missing("files are not read here".into()))
}

/// The value of a `${file:…}` from the file's bytes: UTF-8 text, one trailing
/// newline (`\n` or `\r\n`) trimmed.
pub fn file_value(bytes: Vec<u8>) -> Result<String, FileError> {
    let mut s =
        String::from_utf8(bytes).map_err(|_| FileError::Invalid("is not UTF-8 text".into()))?;
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Ok(s)
}

/// A `${` without a closing `}` or with an invalid name.
#[derive(Debug, PartialEq, Eq)]
pub struct EnvSyntaxError(pub String);

/// Expands one string (no `${file:…}`: those are reported missing).
pub fn expand(
    s: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Expansion, EnvSyntaxError> {
    expand_with(s, lookup, &no_files)
}

/// Expands one string; `file` gives the value of a `${file:PATH}` (PATH as written).
pub fn expand_with(
    s: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    file: &dyn Fn(&str) -> Result<String, FileError>,
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
        if let Some(path) = inner.strip_prefix("file:") {
            if path.is_empty() {
                return Err(EnvSyntaxError(
                    "`${file:}` names no file: expected ${file:PATH}".into(),
                ));
            }
            match file(path) {
                Ok(v) => {
                    out.value.push_str(&v);
                    out.from_env = true;
                }
                Err(e) => out.missing_files.push((path.to_owned(), e)),
            }
            rest = &after[end + 1..];
            continue;
        }
        let (name, default) = match inner.find(":-") {
            Some(j) => (&inner[..j], Some(&inner[j + 2..])),
            None => (inner, None),
        };
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(EnvSyntaxError(format!(
                "`${{{inner}}}` is not a valid variable reference: expected ${{NAME}}, ${{NAME:-default}} or ${{file:PATH}}, with NAME made of A-Z, 0-9 and _"
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
    /// A `${file:PATH}` that could not be read: the path as written and why.
    File(String, FileError),
    Syntax(String),
}

/// Result of expanding a whole document.
#[derive(Debug, Default)]
pub struct DocExpansion {
    pub problems: Vec<EnvProblem>,
    /// Pointers whose value includes environment (or `${file:…}`) content.
    pub from_env: Vec<String>,
    /// Pointers whose value references a missing variable (left unresolved).
    pub unresolved: Vec<String>,
}

/// Expands every string value (not keys) in `doc`, in place.
pub fn expand_document(doc: &mut Value, lookup: &dyn Fn(&str) -> Option<String>) -> DocExpansion {
    expand_document_with(doc, lookup, &no_files)
}

/// [`expand_document`] with `${file:…}` values from `file`.
pub fn expand_document_with(
    doc: &mut Value,
    lookup: &dyn Fn(&str) -> Option<String>,
    file: &dyn Fn(&str) -> Result<String, FileError>,
) -> DocExpansion {
    let mut acc = DocExpansion::default();
    let mut pointer = String::new();
    walk(doc, &mut pointer, &Lookups { var: lookup, file }, &mut acc);
    acc
}

struct Lookups<'a> {
    var: &'a dyn Fn(&str) -> Option<String>,
    file: &'a dyn Fn(&str) -> Result<String, FileError>,
}

fn walk(v: &mut Value, pointer: &mut String, lookup: &Lookups, acc: &mut DocExpansion) {
    match v {
        // most strings hold no reference: leave them as they are, without allocating
        Value::String(s) if !s.contains('$') => {}
        Value::String(s) => match expand_with(s, lookup.var, lookup.file) {
            Ok(e) => {
                if e.from_env {
                    acc.from_env.push(pointer.clone());
                }
                if !e.missing.is_empty() || !e.missing_files.is_empty() {
                    acc.unresolved.push(pointer.clone());
                }
                if !e.missing.is_empty() {
                    acc.problems.push(EnvProblem {
                        pointer: pointer.clone(),
                        kind: EnvProblemKind::Missing(e.missing),
                    });
                }
                for (path, err) in e.missing_files {
                    acc.problems.push(EnvProblem {
                        pointer: pointer.clone(),
                        kind: EnvProblemKind::File(path, err),
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

    fn files(path: &str) -> Result<String, FileError> {
        match path {
            "secrets/key" => file_value(b"k3y-from-file\n".to_vec()),
            "/abs/crlf" => file_value(b"two\r\n".to_vec()),
            "bin" => file_value(vec![0xff, 0xfe]),
            _ => Err(FileError::Missing("not found".into())),
        }
    }

    #[test]
    fn file_references_take_the_content_without_one_trailing_newline() {
        let e = expand_with("Bearer ${file:secrets/key}", &env, &files).unwrap();
        assert_eq!(e.value, "Bearer k3y-from-file");
        assert!(e.from_env, "file content is secret like an env value");
        assert_eq!(
            expand_with("${file:/abs/crlf}", &env, &files)
                .unwrap()
                .value,
            "two"
        );
        // only one newline goes
        assert_eq!(file_value(b"a\n\n".to_vec()).unwrap(), "a\n");
        assert_eq!(file_value(b"a".to_vec()).unwrap(), "a");
        let e = expand_with("${file:nope}", &env, &files).unwrap();
        assert!(matches!(&e.missing_files[..], [(p, FileError::Missing(_))] if p == "nope"));
        let e = expand_with("${file:bin}", &env, &files).unwrap();
        assert!(matches!(&e.missing_files[..], [(_, FileError::Invalid(_))]));
        assert!(expand_with("${file:}", &env, &files).is_err());
        // the plain expand reads no files
        assert!(!ex("${file:secrets/key}").missing_files.is_empty());
        // an escaped reference stays literal
        assert_eq!(ex("$${file:x}").value, "${file:x}");
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
