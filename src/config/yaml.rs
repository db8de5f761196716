//! The YAML layer: parses one route file into a JSON value plus a map from
//! every JSON pointer in it to the line and column where the author wrote it.
//!
//! Every YAML call of the crate lives here (STYLE: keep serde-saphyr in one
//! place). Later stages work on `serde_json::Value` and look positions up by
//! pointer, so any diagnostic about any value can say file:line:col.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_saphyr::Spanned;

/// 1-based position of a value in its file; (0, 0) when unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

/// Where each value (and each mapping key) of a parsed file was written.
#[derive(Debug, Default)]
pub struct SpanIndex {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
}

impl SpanIndex {
    /// Position of the value at `pointer`; falls back to the nearest ancestor.
    pub fn value(&self, pointer: &str) -> Pos {
        let mut p = pointer;
        loop {
            if let Some(pos) = self.values.get(p) {
                return *pos;
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return Pos::default(),
            }
        }
    }

    /// Pointer of the key under `parent` that equals `name` ignoring ASCII case
    /// (header names are case-insensitive and kept lower-case once compiled).
    pub fn child_ignore_case(&self, parent: &str, name: &str) -> Option<String> {
        self.keys
            .keys()
            .find(|p| {
                p.strip_prefix(parent)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|k| k.eq_ignore_ascii_case(name))
            })
            .cloned()
    }

    /// Position of the mapping key whose value is at `pointer` (falls back to the value).
    pub fn key(&self, pointer: &str) -> Pos {
        self.keys
            .get(pointer)
            .copied()
            .unwrap_or_else(|| self.value(pointer))
    }
}

/// A YAML syntax problem, located. The message never quotes file content
/// (a literal secret may sit on that line).
#[derive(Debug)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses `text` into JSON plus positions. Empty files give `null`.
pub fn parse(text: &str) -> Result<(Value, SpanIndex), SyntaxError> {
    if text.trim().is_empty() {
        return Ok((Value::Null, SpanIndex::default()));
    }
    let opts = serde_saphyr::Options::default();
    let node: Node = serde_saphyr::from_str_with_options(text, opts).map_err(|e| {
        let pos = e
            .location()
            .map(|l| Pos {
                line: l.line() as u32,
                col: l.column() as u32,
            })
            .unwrap_or_default();
        SyntaxError {
            pos,
            message: syntax_message(&e),
        }
    })?;
    let mut index = SpanIndex::default();
    let mut pointer = String::new();
    let value = node.into_json(&mut pointer, &mut index);
    Ok((value, index))
}

/// The parser's explanation without its source snippet (which could show a secret).
fn syntax_message(e: &serde_saphyr::Error) -> String {
    let full = e.to_string();
    // serde-saphyr renders "error: line X column Y: <what>" and then a source
    // snippet on later lines; keep only <what>.
    let first = full.lines().next().unwrap_or_default().trim();
    let first = first.strip_prefix("error:").unwrap_or(first).trim();
    let what = match (first.starts_with("line "), first.find(": ")) {
        (true, Some(i)) => &first[i + 2..],
        _ => first,
    };
    let what = what
        .split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or(what)
        .trim();
    if what.is_empty() {
        "invalid YAML".to_string()
    } else {
        format!("invalid YAML: {what}")
    }
}

/// One parsed YAML node with its position.
struct Node {
    pos: Pos,
    value: NodeValue,
}

enum NodeValue {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    fn into_json(self, pointer: &mut String, index: &mut SpanIndex) -> Value {
        index.values.insert(pointer.clone(), self.pos);
        match self.value {
            NodeValue::Null => Value::Null,
            NodeValue::Bool(b) => Value::Bool(b),
            NodeValue::Int(i) => Value::from(i),
            NodeValue::UInt(u) => Value::from(u),
            NodeValue::Float(f) => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            NodeValue::Str(s) => Value::String(s),
            NodeValue::Seq(items) => {
                let len = pointer.len();
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    pointer.push('/');
                    pointer.push_str(&i.to_string());
                    out.push(item.into_json(pointer, index));
                    pointer.truncate(len);
                }
                Value::Array(out)
            }
            NodeValue::Map(entries) => {
                let len = pointer.len();
                let mut out = serde_json::Map::with_capacity(entries.len());
                for (k, v) in entries {
                    let key = k.value.key_string();
                    pointer.push('/');
                    pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                    index.keys.insert(pointer.clone(), k.pos);
                    let v = v.into_json(pointer, index);
                    pointer.truncate(len);
                    out.insert(key, v);
                }
                Value::Object(out)
            }
        }
    }
}

impl NodeValue {
    fn key_string(&self) -> String {
        match self {
            NodeValue::Null => "null".into(),
            NodeValue::Bool(b) => b.to_string(),
            NodeValue::Int(i) => i.to_string(),
            NodeValue::UInt(u) => u.to_string(),
            NodeValue::Float(f) => f.to_string(),
            NodeValue::Str(s) => s.clone(),
            NodeValue::Seq(_) | NodeValue::Map(_) => "<complex key>".into(),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: Spanned<NodeValue> = Spanned::deserialize(d)?;
        let pos = Pos {
            line: s.referenced.line() as u32,
            col: s.referenced.column() as u32,
        };
        Ok(Node {
            pos,
            value: s.value,
        })
    }
}

impl<'de> Deserialize<'de> for NodeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = NodeValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<NodeValue, E> {
        Ok(NodeValue::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<NodeValue, E> {
        Ok(NodeValue::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<NodeValue, D::Error> {
        NodeValue::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<NodeValue, E> {
        Ok(NodeValue::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<NodeValue, E> {
        Ok(NodeValue::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<NodeValue, E> {
        Ok(NodeValue::UInt(v))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<NodeValue, E> {
        Ok(i64::try_from(v)
            .map(NodeValue::Int)
            .unwrap_or(NodeValue::Float(v as f64)))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<NodeValue, E> {
        Ok(u64::try_from(v)
            .map(NodeValue::UInt)
            .unwrap_or(NodeValue::Float(v as f64)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<NodeValue, E> {
        Ok(NodeValue::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<NodeValue, E> {
        Ok(NodeValue::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<NodeValue, E> {
        Ok(NodeValue::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NodeValue, A::Error> {
        let mut out = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            out.push(n);
        }
        Ok(NodeValue::Seq(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NodeValue, A::Error> {
        let mut out: Vec<(Node, Node)> = Vec::new();
        while let Some(k) = map.next_key::<Node>()? {
            let v = map.next_value::<Node>()?;
            out.push((k, v));
        }
        Ok(NodeValue::Map(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_values_and_keys() {
        let (v, idx) = parse("routes:\n  - name: a\n    retry:\n      attempts: 3\n").unwrap();
        assert_eq!(v["routes"][0]["retry"]["attempts"], 3);
        assert_eq!(
            idx.value("/routes/0/retry/attempts"),
            Pos { line: 4, col: 17 }
        );
        assert_eq!(idx.key("/routes/0/retry/attempts"), Pos { line: 4, col: 7 });
        assert_eq!(idx.value("/routes/0/name"), Pos { line: 2, col: 11 });
        // unknown pointer falls back to the closest known ancestor
        assert_eq!(idx.value("/routes/0/retry/nope"), Pos { line: 4, col: 7 });
    }

    #[test]
    fn child_key_found_ignoring_case() {
        let (_, idx) = parse("headers:\n  X-Session: a\n").unwrap();
        assert_eq!(
            idx.child_ignore_case("/headers", "x-session").as_deref(),
            Some("/headers/X-Session")
        );
        assert_eq!(idx.child_ignore_case("/headers", "x-other"), None);
        assert_eq!(idx.child_ignore_case("/head", "ers"), None);
    }

    #[test]
    fn duplicate_key_is_an_error_with_position() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.pos.line, 3, "{e:?}");
        assert!(e.message.contains("duplicate"), "{}", e.message);
    }

    #[test]
    fn syntax_error_does_not_echo_content() {
        let e = parse("token: \"hunter2\nkeys: [\n").unwrap_err();
        assert!(!e.message.contains("hunter2"), "{}", e.message);
        assert!(e.pos.line >= 1);
    }

    #[test]
    fn tab_indentation_is_an_error() {
        let e = parse("routes:\n\t- name: a\n").unwrap_err();
        assert_eq!(e.pos.line, 2, "{e:?}");
    }

    #[test]
    fn scalars_keep_their_types() {
        let (v, _) = parse("a: 1\nb: 1.5\nc: true\nd: ~\ne: \"5\"\nf: 5s\n").unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": 1, "b": 1.5, "c": true, "d": null, "e": "5", "f": "5s"})
        );
    }
}
