//! Bot payloads: the nesting-depth limit, JSON Schema validation with every
//! violation's JSON pointer, and reading the intent and its score.
//!
//! Owns compiled payload schemas. Never fetches anything over the network:
//! `$ref`s resolve only to files inside the directory of the schema that
//! refers to them. Violation messages never quote payload values.

use std::path::{Path, PathBuf};

use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde_json::Value;

/// A compiled payload schema.
pub struct PayloadSchema {
    pub path: PathBuf,
    /// The schema document, for `validate`'s template-vs-schema check.
    pub json: Value,
    /// SHA-256 of the bytes compiled (part of the configuration hash).
    pub digest: [u8; 32],
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for PayloadSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadSchema")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// One schema violation: where in the payload, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

/// Most violations reported in one answer.
pub const MAX_VIOLATIONS: usize = 20;

impl PayloadSchema {
    /// Reads and compiles the schema at `path`.
    pub fn load(path: &Path) -> Result<PayloadSchema, String> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "schema file not found".to_string(),
            _ => format!("schema file cannot be read: {e}"),
        })?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| format!("schema file is not valid JSON: {e}"))?;
        let mut s = Self::compile(path, json)?;
        s.digest = sha256(text.as_bytes());
        Ok(s)
    }

    /// Compiles `json` as if it were read from `path` (relative `$ref`s resolve next to it).
    pub fn compile(path: &Path, json: Value) -> Result<PayloadSchema, String> {
        let abs = std::path::absolute(path).map_err(|e| e.to_string())?;
        let root = abs.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = url::Url::from_file_path(&abs)
            .map_err(|_| "schema path cannot be a URL".to_string())?;
        let validator = jsonschema::options()
            .with_base_uri(base.to_string())
            .with_retriever(LocalRetriever { root })
            .with_pattern_options(jsonschema::PatternOptions::regex())
            .build(&json)
            .map_err(|e| format!("JSON Schema does not compile: {e}"))?;
        let digest = sha256(json.to_string().as_bytes());
        Ok(PayloadSchema {
            path: path.to_path_buf(),
            json,
            digest,
            validator,
        })
    }

    /// Every violation of `payload` (at most [`MAX_VIOLATIONS`]).
    /// Every violation (at most a few); none for a valid payload. Checks
    /// `is_valid` first: collecting errors costs allocations that a valid
    /// payload (nearly every one) never needs.
    pub fn violations(&self, payload: &Value) -> Vec<Violation> {
        if self.validator.is_valid(payload) {
            return Vec::new();
        }
        self.validator
            .iter_errors(payload)
            .take(MAX_VIOLATIONS)
            .map(|e| {
                let mut path = e.instance_path().as_str().to_string();
                let message = match e.kind() {
                    ValidationErrorKind::Required { property } => {
                        let name = property.as_str().unwrap_or_default();
                        path.push('/');
                        path.push_str(&name.replace('~', "~0").replace('/', "~1"));
                        "is required".to_string()
                    }
                    kind => describe(kind, e.instance()),
                };
                Violation { path, message }
            })
            .collect()
    }

    pub fn is_valid(&self, payload: &Value) -> bool {
        self.validator.is_valid(payload)
    }
}

fn describe(kind: &ValidationErrorKind, instance: &Value) -> String {
    match kind {
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(ts) => ts
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            format!("expected {expected}, got {}", json_type(instance))
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            format!("unexpected properties: {}", unexpected.join(", "))
        }
        ValidationErrorKind::Enum { .. } => "is not one of the allowed values".into(),
        ValidationErrorKind::Constant { .. } => "is not the expected constant".into(),
        ValidationErrorKind::Pattern { pattern } => {
            format!("does not match the pattern `{pattern}`")
        }
        ValidationErrorKind::MinLength { limit } => {
            format!("must be at least {limit} characters long")
        }
        ValidationErrorKind::MaxLength { limit } => {
            format!("must be at most {limit} characters long")
        }
        ValidationErrorKind::Minimum { limit } => format!("must be at least {limit}"),
        ValidationErrorKind::Maximum { limit } => format!("must be at most {limit}"),
        ValidationErrorKind::ExclusiveMinimum { limit } => format!("must be greater than {limit}"),
        ValidationErrorKind::ExclusiveMaximum { limit } => format!("must be less than {limit}"),
        ValidationErrorKind::MinItems { limit } => format!("must have at least {limit} items"),
        ValidationErrorKind::MaxItems { limit } => format!("must have at most {limit} items"),
        ValidationErrorKind::Format { format } => format!("is not a valid {format}"),
        ValidationErrorKind::AnyOf { .. } | ValidationErrorKind::OneOfNotValid { .. } => {
            "does not match any of the allowed shapes".into()
        }
        ValidationErrorKind::OneOfMultipleValid { .. } => {
            "matches more than one of the allowed shapes".into()
        }
        other => format!("is invalid ({})", kind_name(other)),
    }
}

fn kind_name(kind: &ValidationErrorKind) -> String {
    let dbg = format!("{kind:?}");
    dbg.split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_string()
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Resolves `$ref`s to files under `root` only; refuses the network and other directories.
struct LocalRetriever {
    root: PathBuf,
}

impl jsonschema::Retrieve for LocalRetriever {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let s = uri.as_str();
        let url = url::Url::parse(s).map_err(|_| format!("cannot resolve `{s}`"))?;
        if url.scheme() != "file" {
            return Err(format!("`{s}` is not a local file: remote $refs are not fetched").into());
        }
        let path = url
            .to_file_path()
            .map_err(|_| format!("cannot resolve `{s}`"))?;
        let canon = path
            .canonicalize()
            .map_err(|_| format!("referenced schema `{}` not found", path.display()))?;
        let root = self
            .root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone());
        if !canon.starts_with(&root) {
            return Err(format!(
                "`{}` is outside the schema directory `{}`",
                path.display(),
                root.display()
            )
            .into());
        }
        let text = std::fs::read_to_string(&canon)?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Why a body is not a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Nested deeper than the limit: the depth reached (the limit + 1).
    TooDeep(usize),
    /// Not JSON: serde_json's message.
    Invalid(String),
}

/// Parses `body` as JSON nesting no deeper than `limit`: what [`check_depth`]
/// followed by `serde_json::from_slice` answers (a body too deep is
/// `TooDeep` whether it parses or not), with less work for a body that
/// parses: its depth is read from the value, and the scan runs only when
/// parsing fails. serde_json's own recursion limit (128) bounds the parse.
/// Valid UTF-8 (checked once, for the whole body) is parsed as `str`, whose
/// strings need no UTF-8 check each; anything else as bytes, for the same error.
pub fn parse_json(body: &[u8], limit: usize) -> Result<Value, JsonError> {
    let parsed = match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str::<Value>(text),
        Err(_) => serde_json::from_slice::<Value>(body),
    };
    match parsed {
        Ok(v) if nesting(&v) > limit => Err(JsonError::TooDeep(limit + 1)),
        Ok(v) => Ok(v),
        Err(e) => Err(match check_depth(body, limit) {
            Err(depth) => JsonError::TooDeep(depth),
            Ok(()) => JsonError::Invalid(e.to_string()),
        }),
    }
}

/// Arrays and objects nested in `v`, `v` included (0 for a scalar).
fn nesting(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(nesting).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

/// Checks that `body` nests no deeper than `limit` arrays/objects, without parsing it.
/// Returns the depth reached when over the limit.
pub fn check_depth(body: &[u8], limit: usize) -> Result<(), usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        match b {
            b'"' => {
                // Skip the string: most of a payload's bytes, so jump from one
                // quote or backslash to the next instead of looking at each byte.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', body.get(i..).unwrap_or_default()) {
                        None => return Ok(()), // unterminated: the JSON parser says so
                        Some(j) if body[i + j] == b'\\' => i += j + 2,
                        Some(j) => {
                            i += j;
                            break;
                        }
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return Err(depth);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The form media type a `Content-Type` value names (`application/x-www-form-urlencoded`
/// or `multipart/form-data`, parameters and case ignored), else `None`. Cognigy's
/// HTTP Request node sends a form unless its payload type is set to JSON; any
/// other type (or none) is judged by parsing the body.
pub fn form_media_type(content_type: Option<&[u8]>) -> Option<&'static str> {
    let value = content_type?;
    let essence = value.split(|&b| b == b';').next().unwrap_or_default();
    let essence = essence.trim_ascii();
    ["application/x-www-form-urlencoded", "multipart/form-data"]
        .into_iter()
        .find(|m| essence.eq_ignore_ascii_case(m.as_bytes()))
}

/// The intent at `pointer`: `None` when null, absent, empty or not a string.
pub fn intent<'a>(payload: &'a Value, pointer: &str) -> Option<&'a str> {
    lookup(payload, pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The intent score at `pointer`: a number or a numeric string (Cognigy sends both).
/// `NaN` and `±Infinity` (as strings, or a string too large for an `f64`) are no
/// score, like a missing one (SPEC §7.1): comparing them with `min_score` means nothing.
pub fn score(payload: &Value, pointer: &str) -> Option<f64> {
    let s = match lookup(payload, pointer)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    s.is_finite().then_some(s)
}

/// `payload.pointer(pointer)` (RFC 6901) without allocating: `Value::pointer`
/// makes two `String`s per token, a few thousand instructions per webhook for
/// the intent and score.
pub fn lookup<'a>(payload: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.is_empty() {
        return Some(payload);
    }
    pointer
        .strip_prefix('/')?
        .split('/')
        .try_fold(payload, |target, token| {
            let token = if token.contains('~') {
                std::borrow::Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
            } else {
                std::borrow::Cow::Borrowed(token)
            };
            match target {
                Value::Object(map) => map.get(token.as_ref()),
                // as serde_json reads an index: no sign, no leading zero
                Value::Array(list)
                    if !token.starts_with('+') && (token.len() == 1 || !token.starts_with('0')) =>
                {
                    token.parse::<usize>().ok().and_then(|i| list.get(i))
                }
                _ => None,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lookup_reads_what_value_pointer_reads() {
        let v = json!({
            "a": {"b": [10, {"c": "x"}], "": 1, "d/e": 2, "f~g": 3, "~1": 4},
            "n": null, "01": 5, "1": 6
        });
        for p in [
            "",
            "/",
            "/a",
            "/a/b",
            "/a/b/0",
            "/a/b/1/c",
            "/a/b/2",
            "/a/b/01",
            "/a/b/+1",
            "/a/b/-1",
            "/a/b/",
            "/a/",
            "/a/d~1e",
            "/a/f~0g",
            "/a/~01",
            "/a/~1",
            "/n",
            "/n/x",
            "/01",
            "/1",
            "a",
            "/a/b/1/c/d",
            "/a/b/00",
            "/a/b/18446744073709551616",
        ] {
            assert_eq!(lookup(&v, p), v.pointer(p), "{p}");
        }
    }

    #[test]
    fn form_bodies_are_named_by_their_media_type() {
        let form = Some("application/x-www-form-urlencoded");
        for (value, want) in [
            ("application/x-www-form-urlencoded", form),
            ("Application/X-WWW-Form-Urlencoded; charset=UTF-8", form),
            (
                " multipart/form-data; boundary=xyz",
                Some("multipart/form-data"),
            ),
            ("application/json", None),
            ("application/json; charset=utf-8", None),
            ("text/plain", None),
            ("application/x-www-form-urlencoded-not", None),
            ("", None),
        ] {
            assert_eq!(form_media_type(Some(value.as_bytes())), want, "{value:?}");
        }
        assert_eq!(form_media_type(None), None);
    }

    #[test]
    fn depth_limit_ignores_brackets_in_strings() {
        assert_eq!(check_depth(br#"{"a": [[1]]}"#, 3), Ok(()));
        assert_eq!(check_depth(br#"{"a": [[1]]}"#, 2), Err(3));
        assert_eq!(check_depth(br#"{"a": "[[[[\"[[["}"#, 1), Ok(()));
        assert_eq!(check_depth(&[b'['; 100], 64), Err(65));
    }

    /// The byte-at-a-time scan `check_depth` replaced: the reference it must agree with.
    fn depth_reference(body: &[u8], limit: usize) -> Result<(), usize> {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &b in body {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > limit {
                        return Err(depth);
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn depth_scan_agrees_with_the_reference(
            body in proptest::collection::vec(proptest::sample::select(b"{}[]\\\" a,".to_vec()), 0..64),
            limit in 0usize..6,
        ) {
            proptest::prop_assert_eq!(check_depth(&body, limit), depth_reference(&body, limit));
        }
    }

    /// What the webhook did before [`parse_json`]: the scan, then the parse.
    fn parse_reference(body: &[u8], limit: usize) -> Result<Value, JsonError> {
        check_depth(body, limit).map_err(JsonError::TooDeep)?;
        serde_json::from_slice(body).map_err(|e| JsonError::Invalid(e.to_string()))
    }

    #[test]
    fn parse_json_answers_as_scan_then_parse() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        for (body, limit) in [
            (br#"{"a": [[1]]}"#.to_vec(), 3),
            (br#"{"a": [[1]]}"#.to_vec(), 2),
            (br#"{"a": "[[[[\"[[["}"#.to_vec(), 1),
            (br#"{"a": [[1]]"#.to_vec(), 2),
            (br#"{"a": [[1]]"#.to_vec(), 1),
            (b"{\"a\": \"\xff\"}".to_vec(), 1),
            (b"{\"a\": [\"\xff\"]}".to_vec(), 0),
            (b"\"caf\xc3\xa9\" x".to_vec(), 0),
            (b"".to_vec(), 0),
            (b" 1 ".to_vec(), 0),
            (deep(64).into_bytes(), 64),
            (deep(65).into_bytes(), 64),
            (deep(129).into_bytes(), 64),
            (deep(129).into_bytes(), 200),
            (deep(128).into_bytes(), 200),
        ] {
            assert_eq!(
                parse_json(&body, limit),
                parse_reference(&body, limit),
                "{:?} at {limit}",
                String::from_utf8_lossy(&body)
            );
        }
        let payload =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/payload.json")).unwrap();
        assert_eq!(parse_json(&payload, 64), parse_reference(&payload, 64));
        assert!(parse_json(&payload, 64).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn parse_json_agrees_with_scan_then_parse(
            body in proptest::collection::vec(
                proptest::sample::select(b"{}[]\\\" a:,1\xff".to_vec()), 0..48),
            limit in 0usize..5,
        ) {
            proptest::prop_assert_eq!(parse_json(&body, limit), parse_reference(&body, limit));
        }
    }

    #[test]
    fn intent_and_score() {
        let p = json!({"intent": "x", "intentScore": "0.7", "e": "", "n": null, "s": 0.5});
        assert_eq!(intent(&p, "/intent"), Some("x"));
        assert_eq!(intent(&p, "/e"), None);
        assert_eq!(intent(&p, "/n"), None);
        assert_eq!(intent(&p, "/missing"), None);
        assert_eq!(score(&p, "/intentScore"), Some(0.7));
        assert_eq!(score(&p, "/s"), Some(0.5));
        assert_eq!(score(&p, "/intent"), None);
    }

    /// SPEC §7.1: a non-finite score is no score (so a `min_score` route is not
    /// taken on the strength of `"NaN"`, and nothing downstream sees infinity).
    #[test]
    fn non_finite_scores_count_as_no_score() {
        for s in [
            "NaN",
            "nan",
            "inf",
            "-inf",
            "+inf",
            "Infinity",
            "-Infinity",
            "infinity",
            " NaN ",
            "1e400",
            "-1e400",
        ] {
            let p = json!({ "intentScore": s });
            assert_eq!(score(&p, "/intentScore"), None, "{s:?}");
        }
        // numbers that are finite still count, as numbers and as strings
        let p = json!({"a": " 0.25 ", "b": 1e300, "c": "-0"});
        assert_eq!(score(&p, "/a"), Some(0.25));
        assert_eq!(score(&p, "/b"), Some(1e300));
        assert_eq!(score(&p, "/c"), Some(-0.0));
    }

    #[test]
    fn violations_have_pointers_and_no_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("defs.json"),
            r#"{"$defs": {"id": {"type": "string", "minLength": 3}}}"#,
        )
        .unwrap();
        let schema = json!({
            "type": "object",
            "required": ["sessionId", "slots"],
            "properties": {
                "sessionId": {"$ref": "defs.json#/$defs/id"},
                "slots": {"type": "object"},
                "intentScore": {"type": ["number", "string"]}
            }
        });
        let s = PayloadSchema::compile(&dir.path().join("main.json"), schema).unwrap();
        let v = s.violations(&json!({"sessionId": "ab", "intentScore": ["secret-value"]}));
        let paths: Vec<&str> = v.iter().map(|v| v.path.as_str()).collect();
        assert!(paths.contains(&"/slots"), "{v:?}");
        assert!(paths.contains(&"/sessionId"), "{v:?}");
        assert!(paths.contains(&"/intentScore"), "{v:?}");
        assert!(
            v.iter().all(|v| !v.message.contains("secret-value")),
            "{v:?}"
        );
    }

    #[test]
    fn remote_and_outside_refs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let remote = json!({"$ref": "https://example.com/schema.json"});
        let e = PayloadSchema::compile(&dir.path().join("a.json"), remote).unwrap_err();
        assert!(e.contains("not a local file"), "{e}");
        let outside = json!({"$ref": "../../../etc/passwd"});
        assert!(PayloadSchema::compile(&dir.path().join("a.json"), outside).is_err());
    }
}
