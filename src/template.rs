//! Handlebars templates as SPEC §3 defines them: what `{{x}}` means in a JSON
//! body, a URL and a header, the helpers, strictness, and which payload fields
//! a template reads (for `validate`'s template-vs-schema check). Also what
//! `validate` needs for SPEC §7.2, read from the parse tree without rendering:
//! expressions placed where they could change a JSON body's shape
//! ([`Template::shape_errors`]) and the inbound headers a template reads
//! ([`Template::header_reads`]).
//!
//! Owns compiling and rendering. Never does I/O. Per-request data the helpers
//! need (`bot`, `route`, `header`, `now`) is passed in a [`RenderMeta`], set for
//! the duration of one synchronous render (rendering never awaits).

use std::cell::RefCell;
use std::sync::LazyLock;
use std::time::SystemTime;

use handlebars::template::{HelperTemplate, Parameter, TemplateElement};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderError,
    RenderErrorReason, Renderable, ScopedJson, StringOutput,
};
use serde_json::Value;

/// Where a template's output goes, which decides what `{{x}}` escapes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A JSON document: `{{x}}` is escaped for the inside of a JSON string; the
    /// result must parse as JSON; triple-stash is refused.
    Json,
    /// A URL: each `{{x}}` is percent-encoded as one path segment or query value.
    Url,
    /// A header value or idempotency key: written as is; CR/LF/NUL are refused by the caller.
    Text,
}

/// A compiled template.
#[derive(Debug, Clone)]
pub struct Template {
    kind: Kind,
    strict: bool,
    /// The text the template was compiled from (identifies it across reloads).
    source: std::sync::Arc<str>,
    /// Shared: a reload reuses compiled templates whose text did not change.
    inner: std::sync::Arc<handlebars::Template>,
    /// `Kind::Url`: the payload fields written as whole path values (a missing
    /// one would render an empty path segment, which handlebars does not escape).
    url_path_fields: std::sync::Arc<[Vec<String>]>,
    /// The template as [`Piece`]s, when every element is one (see [`fast_pieces`]).
    fast: Option<std::sync::Arc<[Piece]>>,
}

/// One element of a template simple enough to render without handlebars'
/// machinery: what nearly every route template is made of. See [`fast_pieces`].
#[derive(Debug)]
enum Piece {
    /// Literal text.
    Text(String),
    /// `{{a.b.0.c}}`: the value, escaped for the template's kind.
    Field(Vec<String>),
    /// `{{json a.b}}`: the value as JSON (escaped outside JSON templates).
    Json(Vec<String>),
    /// `{{default a.b <literal>}}`.
    Default(Vec<String>, Value),
    /// `{{now}}`, `{{bot}}`, `{{route}}`.
    Meta(MetaHelper),
    /// `{{header "<name>"}}`.
    Header(String),
}

/// A template that does not compile, with its 1-based line and column inside the template text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// A payload field a template reads, e.g. `slots.customerId.0.keyphrase`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRef {
    pub path: Vec<String>,
    /// 1-based line and column of the expression inside the template text.
    pub line: usize,
    pub col: usize,
}

/// A `{{header "…"}}` call (anywhere: an expression, a block's parameters, a
/// subexpression), at the 1-based line and column of its expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRead {
    /// The header name when it is a string literal; `None` when it is computed
    /// (a path or subexpression), so no one can tell which header it reads.
    pub name: Option<String>,
    pub line: usize,
    pub col: usize,
}

/// Per-request data for helpers. Cheap to clone (shared parts), since each
/// render hands a copy to the helpers.
#[derive(Debug, Clone)]
pub struct RenderMeta {
    pub bot: std::sync::Arc<str>,
    pub route: std::sync::Arc<str>,
    /// Inbound headers.
    pub headers: std::sync::Arc<http::HeaderMap>,
    pub now: SystemTime,
}

impl RenderMeta {
    pub fn new(bot: &str, route: &str) -> Self {
        RenderMeta {
            bot: bot.into(),
            route: route.into(),
            headers: Default::default(),
            now: SystemTime::now(),
        }
    }

    /// Sets the inbound headers from `(name, value)` pairs (invalid ones are skipped).
    pub fn set_header_pairs(&mut self, pairs: &[(String, String)]) {
        let mut map = http::HeaderMap::with_capacity(pairs.len());
        for (k, v) in pairs {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::try_from(k.as_str()),
                http::HeaderValue::try_from(v.as_str()),
            ) {
                map.append(k, v);
            }
        }
        self.headers = std::sync::Arc::new(map);
    }
}

thread_local! {
    static META: RefCell<Option<RenderMeta>> = const { RefCell::new(None) };
}

/// Compiles `source` as a template of `kind`.
pub fn compile(source: &str, kind: Kind, strict: bool) -> Result<Template, CompileError> {
    let inner = handlebars::Template::compile(source).map_err(|e| {
        let (line, col) = e.pos().unwrap_or((1, 1));
        CompileError {
            line,
            col,
            message: format!("template does not compile: {}", e.reason()),
        }
    })?;
    let url_path_fields = if kind == Kind::Url {
        url_path_fields(&inner).into()
    } else {
        std::sync::Arc::from([])
    };
    let fast = fast_pieces(&inner).map(Into::into);
    let t = Template {
        kind,
        strict,
        source: source.into(),
        inner: std::sync::Arc::new(inner),
        url_path_fields,
        fast,
    };
    if kind != Kind::Text
        && let Some((line, col)) = t.find_raw_expression()
    {
        return Err(CompileError {
                line,
                col,
                message: match kind {
                    Kind::Url => "triple-stash `{{{…}}}` would skip percent-encoding; use `{{…}}`".into(),
                    _ => "triple-stash `{{{…}}}` would write unescaped text into JSON; use `{{…}}` inside quotes or `{{json …}}`".into(),
                },
            });
    }
    if let Some((line, col)) = t.find_partial() {
        return Err(CompileError {
            line,
            col,
            message: "partials (`{{> …}}`) are not supported".into(),
        });
    }
    Ok(t)
}

impl Template {
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The output, when the template has no expressions at all (it renders to itself).
    pub fn as_static(&self) -> Option<&str> {
        self.inner
            .elements
            .iter()
            .all(|e| {
                matches!(
                    e,
                    TemplateElement::RawString(_) | TemplateElement::Comment(_)
                )
            })
            .then_some(&*self.source)
            .filter(|s| !s.contains('\\') && !s.contains("{{"))
    }

    /// Renders with `data` as the root. For `Kind::Json` the caller parses the result.
    pub fn render(&self, data: &Context, meta: &RenderMeta) -> Result<String, String> {
        let fast = self
            .fast
            .as_ref()
            .and_then(|p| render_pieces(p, self.kind, data.data(), meta));
        let out = match fast {
            Some(out) => out,
            None => self.render_handlebars(data, meta)?,
        };
        self.finish(out, data)
    }

    /// Handlebars' own render: for templates with blocks or other helpers, and
    /// whenever [`render_pieces`] meets a value it leaves to handlebars.
    fn render_handlebars(&self, data: &Context, meta: &RenderMeta) -> Result<String, String> {
        let reg = registry(self.kind, self.strict);
        META.with(|m| *m.borrow_mut() = Some(meta.clone()));
        let mut rc = RenderContext::new(None);
        let mut out = StringOutput::new();
        let result = self.inner.render(reg, data, &mut rc, &mut out);
        META.with(|m| *m.borrow_mut() = None);
        result.map_err(|e| render_error_message(&e))?;
        out.into_string().map_err(|e| e.to_string())
    }

    /// What follows either render: the URL checks of SPEC §7.2.
    fn finish(&self, out: String, data: &Context) -> Result<String, String> {
        if self.kind == Kind::Url {
            if let Some(f) = self
                .url_path_fields
                .iter()
                .find(|f| lookup(data.data(), f).is_none_or(Value::is_null))
            {
                return Err(format!(
                    "a value in the URL path renders empty (`{}` is missing)",
                    f.join(".")
                ));
            }
            return check_url_values(&out);
        }
        Ok(out)
    }

    /// Payload fields read at the top level of the template (inside `#if`/`#unless` too,
    /// but not inside `#each`/`#with`, where paths are relative to another value).
    pub fn field_refs(&self) -> Vec<FieldRef> {
        let mut out = Vec::new();
        collect_refs(&self.inner, None, &mut out);
        out
    }

    /// SPEC §7.2, for JSON templates (empty for other kinds): every expression
    /// that could change the shape of the JSON it renders. An escaped `{{x}}`
    /// (any helper but `json`: `{{now}}`, `{{header "X"}}`, `{{default a b}}`…)
    /// must stand inside a JSON string; `{{json x}}` must stand outside one.
    /// Block helpers may stand anywhere, but each branch must leave the string
    /// state as the other does (and an `#each` body as it found it), or what
    /// follows the block could not be judged.
    ///
    /// Decided from the parse tree and the literal text around each expression
    /// (`\"` escapes included), never by rendering.
    pub fn shape_errors(&self) -> Vec<CompileError> {
        if self.kind != Kind::Json {
            return Vec::new();
        }
        let mut scan = ShapeScan {
            source: &self.source,
            errors: Vec::new(),
        };
        scan.template(&self.inner, None, JsonState::default());
        scan.errors
    }

    /// Every `header` helper call, in source order.
    pub fn header_reads(&self) -> Vec<HeaderRead> {
        let mut out = Vec::new();
        collect_header_reads(&self.inner, None, &mut out);
        out
    }

    fn find_raw_expression(&self) -> Option<(usize, usize)> {
        find_element(&self.inner, None, &|e| {
            matches!(e, TemplateElement::HtmlExpression(_))
        })
    }

    fn find_partial(&self) -> Option<(usize, usize)> {
        find_element(&self.inner, None, &|e| {
            matches!(
                e,
                TemplateElement::PartialExpression(_) | TemplateElement::PartialBlock(_)
            )
        })
    }
}

/// The pieces of `t` when every element is literal text, a comment, or an
/// expression of a plain field path (`a.b.0.c`, no `this`, `..` or `@`), of
/// `json` on one, of `default` on one and a literal, of `now`, `bot`, `route`,
/// or of `header` with a literal name. Anything else (blocks, other helpers,
/// subexpressions, hashes): `None`, and handlebars renders it.
fn fast_pieces(t: &handlebars::Template) -> Option<Vec<Piece>> {
    let path = |p: &Parameter| match p {
        Parameter::Path(handlebars::Path::Relative((segs, raw))) if !is_helper_raw(raw) => segs
            .iter()
            .map(|s| match s {
                handlebars::PathSeg::Named(n) => Some(n.clone()),
                _ => None,
            })
            .collect::<Option<Vec<String>>>()
            .filter(|segs| !segs.is_empty()),
        _ => None,
    };
    let mut pieces = Vec::with_capacity(t.elements.len());
    for e in &t.elements {
        let piece = match e {
            TemplateElement::RawString(text) => Piece::Text(text.clone()),
            TemplateElement::Comment(_) => continue,
            TemplateElement::Expression(h) if h.hash.is_empty() && !h.block => {
                let name = helper_name(&h.name)?;
                match (name, h.params.as_slice()) {
                    ("now", []) => Piece::Meta(MetaHelper::Now),
                    ("bot", []) => Piece::Meta(MetaHelper::Bot),
                    ("route", []) => Piece::Meta(MetaHelper::Route),
                    ("header", [Parameter::Literal(Value::String(n))]) => Piece::Header(n.clone()),
                    ("json", [p]) => Piece::Json(path(p)?),
                    ("default", [a, Parameter::Literal(b)]) => Piece::Default(path(a)?, b.clone()),
                    (_, []) => Piece::Field(path(&h.name)?),
                    _ => return None,
                }
            }
            _ => return None,
        };
        pieces.push(piece);
    }
    Some(pieces)
}

fn is_helper_raw(raw: &str) -> bool {
    BUILTIN_HELPERS.contains(&raw)
}

/// Renders `pieces` exactly as handlebars renders the template they came
/// from (same value text, same escaping), or `None` when a value is missing,
/// or an array or object where text is written: handlebars then renders it
/// (strict mode's error, `[object]`, …), so there is one behaviour.
fn render_pieces(pieces: &[Piece], kind: Kind, root: &Value, meta: &RenderMeta) -> Option<String> {
    let mut out = String::with_capacity(
        pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.len(),
                _ => 16,
            })
            .sum(),
    );
    let escape = |out: &mut String, text: &str| match kind {
        Kind::Json => json_string_escape_into(out, text),
        Kind::Url => out.push_str(&url_value_marked(text)),
        Kind::Text => out.push_str(text),
    };
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Field(path) => escape(&mut out, &scalar(lookup(root, path)?)?),
            Piece::Json(path) => {
                let v = lookup(root, path)?;
                if kind == Kind::Json {
                    use std::fmt::Write as _;
                    // `Value`'s `Display` is its compact JSON text, written in place
                    write!(out, "{v}").ok()?;
                } else {
                    escape(&mut out, &v.to_string());
                }
            }
            Piece::Default(path, b) => {
                let a = lookup(root, path)?;
                let v = if a.is_null() || a.as_str() == Some("") {
                    b
                } else {
                    a
                };
                escape(&mut out, &scalar(v)?);
            }
            Piece::Meta(m) => escape(&mut out, &m.text(meta)),
            Piece::Header(name) => escape(&mut out, header_text(meta, name)),
        }
    }
    Some(out)
}

/// The text handlebars writes for a value (`JsonRender`), when it is a scalar.
fn scalar(v: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        Value::String(s) => Some(s.as_str().into()),
        Value::Number(n) => Some(n.to_string().into()),
        Value::Bool(b) => Some(if *b { "true" } else { "false" }.into()),
        Value::Null => Some("".into()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

fn find_element(
    t: &handlebars::Template,
    outer: Option<(usize, usize)>,
    pred: &dyn Fn(&TemplateElement) -> bool,
) -> Option<(usize, usize)> {
    for (i, e) in t.elements.iter().enumerate() {
        let pos = t.mapping.get(i).map(|m| (m.0, m.1)).or(outer);
        if pred(e) {
            return Some(pos.unwrap_or((1, 1)));
        }
        if let TemplateElement::HelperBlock(h) = e {
            for sub in [&h.template, &h.inverse].into_iter().flatten() {
                if let Some(p) = find_element(sub, pos, pred) {
                    return Some(p);
                }
            }
        }
    }
    None
}

/// Where the literal text of a JSON template stands: inside a string or not,
/// and whether the last character was a backslash inside a string.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct JsonState {
    in_string: bool,
    escaped: bool,
}

impl JsonState {
    /// The state after the literal `text`.
    fn feed(mut self, text: &str) -> Self {
        for c in text.chars() {
            if !self.in_string {
                self.in_string = c == '"';
            } else if self.escaped {
                self.escaped = false;
            } else if c == '\\' {
                self.escaped = true;
            } else if c == '"' {
                self.in_string = false;
            }
        }
        self
    }
}

/// The walk behind [`Template::shape_errors`].
struct ShapeScan<'a> {
    /// The template text, to quote expressions in messages.
    source: &'a str,
    errors: Vec<CompileError>,
}

impl ShapeScan<'_> {
    /// Scans `t` from `state`; returns the state after it.
    fn template(
        &mut self,
        t: &handlebars::Template,
        outer: Option<(usize, usize)>,
        mut state: JsonState,
    ) -> JsonState {
        for (i, e) in t.elements.iter().enumerate() {
            let pos = t
                .mapping
                .get(i)
                .map(|m| (m.0, m.1))
                .or(outer)
                .unwrap_or((1, 1));
            match e {
                TemplateElement::RawString(text) => state = state.feed(text),
                TemplateElement::Expression(h) => {
                    self.expression(h, pos, state);
                    // what it writes is escaped (or a whole JSON value): no pending `\`
                    state.escaped = false;
                }
                TemplateElement::HelperBlock(h) => state = self.block(h, pos, state),
                // triple-stash and partials are refused by `compile`; comments
                // and decorators write nothing here
                _ => {}
            }
        }
        state
    }

    fn expression(&mut self, h: &HelperTemplate, (line, col): (usize, usize), state: JsonState) {
        let is_json = helper_name(&h.name) == Some("json");
        let message = match (state.in_string, is_json) {
            (false, false) => format!(
                "`{}` stands outside a JSON string, where the text it writes could change the request's shape: put it inside quotes (`\"{{{{…}}}}\"`) or write `{{{{json …}}}}` for a JSON value",
                self.quote(line, col)
            ),
            (true, true) => format!(
                "`{}` writes JSON text into a JSON string: remove the quotes around it for a JSON value, or write `{{{{…}}}}` for the escaped text",
                self.quote(line, col)
            ),
            _ => return,
        };
        self.errors.push(CompileError { line, col, message });
    }

    /// A block: each branch from `entry`; they must end alike (an `#each` body,
    /// which may render any number of times, where it started).
    fn block(&mut self, h: &HelperTemplate, pos: (usize, usize), entry: JsonState) -> JsonState {
        let mut branch = |t: &Option<handlebars::Template>| match t {
            Some(t) => self.template(t, Some(pos), entry),
            None => entry,
        };
        let main = branch(&h.template);
        let inverse = branch(&h.inverse);
        let consistent = if helper_name(&h.name) == Some("each") {
            main == entry && inverse == entry
        } else {
            main == inverse
        };
        if !consistent {
            let (line, col) = pos;
            self.errors.push(CompileError {
                line,
                col,
                message: format!(
                    "`{}` leaves a JSON string open in one case and closed in another, so the text after it cannot be judged: open and close each string within the same branch",
                    self.quote(line, col)
                ),
            });
        }
        main
    }

    /// The expression starting at `line`/`col` of the source, as written (cut at 60 characters).
    fn quote(&self, line: usize, col: usize) -> String {
        let rest: String = self
            .source
            .lines()
            .nth(line.saturating_sub(1))
            .unwrap_or_default()
            .chars()
            .skip(col.saturating_sub(1))
            .collect();
        let end = rest.find("}}").map_or(rest.len(), |i| i + 2);
        let text = &rest[..end];
        if text.chars().count() > 60 {
            format!("{}…", text.chars().take(59).collect::<String>())
        } else {
            text.to_string()
        }
    }
}

/// The name of a helper call or a plain path (`{{now}}` parses as a path).
fn helper_name(p: &Parameter) -> Option<&str> {
    match p {
        Parameter::Name(n) => Some(n),
        Parameter::Path(handlebars::Path::Relative((_, raw))) => Some(raw),
        _ => None,
    }
}

fn collect_header_reads(
    t: &handlebars::Template,
    outer: Option<(usize, usize)>,
    out: &mut Vec<HeaderRead>,
) {
    for (i, e) in t.elements.iter().enumerate() {
        let pos = t
            .mapping
            .get(i)
            .map(|m| (m.0, m.1))
            .or(outer)
            .unwrap_or((1, 1));
        match e {
            TemplateElement::Expression(h) | TemplateElement::HtmlExpression(h) => {
                helper_header_reads(h, pos, out);
            }
            TemplateElement::HelperBlock(h) => {
                helper_header_reads(h, pos, out);
                for sub in [&h.template, &h.inverse].into_iter().flatten() {
                    collect_header_reads(sub, Some(pos), out);
                }
            }
            _ => {}
        }
    }
}

fn helper_header_reads(h: &HelperTemplate, (line, col): (usize, usize), out: &mut Vec<HeaderRead>) {
    if helper_name(&h.name) == Some("header") && !h.params.is_empty() {
        let name = match &h.params[0] {
            Parameter::Literal(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        out.push(HeaderRead { name, line, col });
    }
    for p in h.params.iter().chain(h.hash.values()) {
        if let Parameter::Subexpression(s) = p
            && let TemplateElement::Expression(inner) = s.as_element()
        {
            helper_header_reads(inner, (line, col), out);
        }
    }
}

const BUILTIN_HELPERS: &[&str] = &[
    "if", "unless", "each", "with", "lookup", "raw", "log", "eq", "ne", "gt", "gte", "lt", "lte",
    "and", "or", "not", "len", "json", "now", "uuid", "bot", "route", "header", "default",
];

/// The plain `{{field}}` expressions of a URL template's path: top-level ones
/// before the first literal `?` or `#` (and before any block, whose text may
/// start the query).
fn url_path_fields(t: &handlebars::Template) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for e in &t.elements {
        match e {
            TemplateElement::RawString(s) if s.contains(['?', '#']) => break,
            TemplateElement::RawString(_) | TemplateElement::Comment(_) => {}
            TemplateElement::Expression(h) => {
                let mut refs = Vec::new();
                helper_refs(h, 1, 1, &mut refs);
                out.extend(refs.into_iter().map(|r| r.path));
            }
            _ => break,
        }
    }
    out
}

/// The value at `path` (object keys and array indexes) in `root`.
fn lookup<'a>(root: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(root, |v, k| match v {
        Value::Object(m) => m.get(k),
        Value::Array(a) => a.get(k.parse::<usize>().ok()?),
        _ => None,
    })
}

fn collect_refs(t: &handlebars::Template, outer: Option<(usize, usize)>, out: &mut Vec<FieldRef>) {
    for (i, e) in t.elements.iter().enumerate() {
        let (line, col) = t
            .mapping
            .get(i)
            .map(|m| (m.0, m.1))
            .or(outer)
            .unwrap_or((1, 1));
        match e {
            TemplateElement::Expression(h) | TemplateElement::HtmlExpression(h) => {
                helper_refs(h, line, col, out);
            }
            TemplateElement::HelperBlock(h) => {
                helper_refs(h, line, col, out);
                let name = h.name.as_name().unwrap_or_default();
                if matches!(name, "if" | "unless") {
                    for sub in [&h.template, &h.inverse].into_iter().flatten() {
                        collect_refs(sub, Some((line, col)), out);
                    }
                } else if let Some(inv) = &h.inverse {
                    // `{{else}}` of #each/#with runs in the outer context
                    collect_refs(inv, Some((line, col)), out);
                }
            }
            _ => {}
        }
    }
}

fn helper_refs(h: &HelperTemplate, line: usize, col: usize, out: &mut Vec<FieldRef>) {
    let is_helper_call = !h.params.is_empty() || !h.hash.is_empty() || h.block;
    match &h.name {
        // `{{now}}` parses as a path: helper names are not fields
        Parameter::Path(p) if !is_helper_call && !is_helper_name(p) => {
            push_path_ref(p, line, col, out)
        }
        Parameter::Name(n) if !is_helper_call && !BUILTIN_HELPERS.contains(&n.as_str()) => {
            push_raw_ref(n, line, col, out)
        }
        _ => {}
    }
    for p in h.params.iter().chain(h.hash.values()) {
        param_refs(p, line, col, out);
    }
}

fn param_refs(p: &Parameter, line: usize, col: usize, out: &mut Vec<FieldRef>) {
    match p {
        Parameter::Path(path) => push_path_ref(path, line, col, out),
        Parameter::Name(n) if !BUILTIN_HELPERS.contains(&n.as_str()) => {
            push_raw_ref(n, line, col, out)
        }
        Parameter::Subexpression(s) => {
            for p in s.params().into_iter().flatten() {
                param_refs(p, line, col, out);
            }
        }
        _ => {}
    }
}

fn is_helper_name(p: &handlebars::Path) -> bool {
    matches!(p, handlebars::Path::Relative((_, raw)) if BUILTIN_HELPERS.contains(&raw.as_str()))
}

fn push_path_ref(p: &handlebars::Path, line: usize, col: usize, out: &mut Vec<FieldRef>) {
    if let handlebars::Path::Relative((_, raw)) = p {
        push_raw_ref(raw, line, col, out);
    }
}

fn push_raw_ref(raw: &str, line: usize, col: usize, out: &mut Vec<FieldRef>) {
    let raw = raw
        .strip_prefix("@root.")
        .or_else(|| raw.strip_prefix("@root/"))
        .unwrap_or(raw);
    if raw.starts_with('@')
        || raw.starts_with("..")
        || raw == "this"
        || raw.starts_with("this.")
        || raw.starts_with("./")
    {
        return;
    }
    let path: Vec<String> = split_path(raw);
    if !path.is_empty() {
        out.push(FieldRef { path, line, col });
    }
}

/// `a.b.[c d].0` → ["a", "b", "c d", "0"].
fn split_path(raw: &str) -> Vec<String> {
    let mut segs = Vec::new();
    let mut cur = String::new();
    let mut in_bracket = false;
    for c in raw.chars() {
        match c {
            '[' if !in_bracket => in_bracket = true,
            ']' if in_bracket => in_bracket = false,
            '.' | '/' if !in_bracket => {
                if !cur.is_empty() {
                    segs.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        segs.push(cur);
    }
    segs
}

fn render_error_message(e: &RenderError) -> String {
    match e.reason() {
        RenderErrorReason::MissingVariable(Some(path)) => {
            format!("field `{path}` is missing from the payload (strict)")
        }
        RenderErrorReason::MissingVariable(None) => {
            "a field is missing from the payload (strict)".into()
        }
        other => other.to_string(),
    }
}

// ---------- registries and helpers ----------

fn registry(kind: Kind, strict: bool) -> &'static Handlebars<'static> {
    static REGS: LazyLock<[Handlebars<'static>; 6]> = LazyLock::new(|| {
        [
            build_registry(Kind::Json, false),
            build_registry(Kind::Json, true),
            build_registry(Kind::Url, false),
            build_registry(Kind::Url, true),
            build_registry(Kind::Text, false),
            build_registry(Kind::Text, true),
        ]
    });
    let i = match kind {
        Kind::Json => 0,
        Kind::Url => 2,
        Kind::Text => 4,
    } + usize::from(strict);
    &REGS[i]
}

fn build_registry(kind: Kind, strict: bool) -> Handlebars<'static> {
    let mut r = Handlebars::new();
    r.set_strict_mode(strict);
    match kind {
        Kind::Json => r.register_escape_fn(json_string_escape),
        Kind::Url => r.register_escape_fn(url_value_marked),
        Kind::Text => r.register_escape_fn(handlebars::no_escape),
    }
    r.register_helper(
        "json",
        Box::new(JsonHelper {
            raw_output: kind == Kind::Json,
        }),
    );
    r.register_helper("now", Box::new(MetaHelper::Now));
    r.register_helper("uuid", Box::new(MetaHelper::Uuid));
    r.register_helper("bot", Box::new(MetaHelper::Bot));
    r.register_helper("route", Box::new(MetaHelper::Route));
    r.register_helper("header", Box::new(MetaHelper::Header));
    r.register_helper("default", Box::new(DefaultHelper));
    r
}

/// Escapes `s` for the inside of a JSON string literal.
pub fn json_string_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    json_string_escape_into(&mut out, s);
    out
}

/// [`json_string_escape`], appended to `out`.
fn json_string_escape_into(out: &mut String, s: &str) {
    // Most values have nothing to escape: copied whole, not char by char
    // (0xE2 leads U+2028 and U+2029, and other characters that the loop keeps).
    if !s
        .bytes()
        .any(|b| b < 0x20 || b == b'"' || b == b'\\' || b == 0xE2)
    {
        out.push_str(s);
        return;
    }
    escape_chars(out, s)
}

fn escape_chars(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
}

/// Everything but RFC 3986 unreserved characters is encoded, so a value can
/// never add a path segment, a query parameter, a fragment or user info.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes `s` as one URL path segment or query value. `.` and `..`
/// are encoded too, so a value cannot climb out of its path.
pub fn url_segment_escape(s: &str) -> String {
    if s == "." || s == ".." {
        return s.replace('.', "%2E");
    }
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// Marks each escaped URL value as `\u{1}<verdict><encoded>\u{2}`, so the
/// rendered URL can be checked by where each value landed (path or query):
/// verdict `e` empty, `d` a `.`/`..` segment when split at `/` or `\`, `o` ok.
/// The marks are control characters, which no encoded value and no valid URL
/// text contains; [`check_url_values`] removes them.
fn url_value_marked(s: &str) -> String {
    let verdict = if s.is_empty() {
        'e'
    } else if s.split(['/', '\\']).any(|p| p == "." || p == "..") {
        'd'
    } else {
        'o'
    };
    let encoded = url_segment_escape(s);
    let mut out = String::with_capacity(encoded.len() + 3);
    out.push('\u{1}');
    out.push(verdict);
    out.push_str(&encoded);
    out.push('\u{2}');
    out
}

/// SPEC §7.2: in the path (before the first literal `?` or `#`), a value may not
/// render empty (`DELETE …/contacts/` must never go out) nor hold a `.` or `..`
/// segment (servers that decode `%2F` before routing would climb up the path).
/// In the query, values may be empty. Returns the URL without the marks.
fn check_url_values(marked: &str) -> Result<String, String> {
    let mut out = String::with_capacity(marked.len());
    let mut in_query = false;
    let mut rest = marked;
    while let Some(start) = rest.find('\u{1}') {
        let literal = &rest[..start];
        in_query |= literal.contains(['?', '#']);
        out.push_str(literal);
        let after = &rest[start + 1..];
        let end = after.find('\u{2}').unwrap_or(after.len());
        let (verdict, value) = after[..end].split_at(after[..end].len().min(1));
        if !in_query {
            match verdict {
                "e" => return Err("a value in the URL path renders empty".into()),
                "d" => {
                    return Err("a value in the URL path holds a `.` or `..` segment".into());
                }
                _ => {}
            }
        }
        out.push_str(value);
        rest = after.get(end + 1..).unwrap_or("");
    }
    out.push_str(rest);
    Ok(out)
}

struct JsonHelper {
    /// In JSON templates the helper writes JSON; elsewhere its output is escaped like `{{x}}`.
    raw_output: bool,
}

impl HelperDef for JsonHelper {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let p = h
            .param(0)
            .ok_or_else(|| RenderErrorReason::ParamNotFoundForIndex("json", 0))?;
        if p.is_value_missing() && r.strict_mode() {
            return Err(RenderErrorReason::MissingVariable(p.relative_path().cloned()).into());
        }
        let text = if p.is_value_missing() {
            "null".to_string()
        } else {
            p.value().to_string()
        };
        if self.raw_output {
            out.write(&text)?;
        } else {
            out.write(&r.get_escape_fn()(&text))?;
        }
        Ok(())
    }
}

/// The inbound header `name`'s value, or `""` (absent, or not visible ASCII).
fn header_text<'a>(meta: &'a RenderMeta, name: &str) -> &'a str {
    meta.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[derive(Debug)]
enum MetaHelper {
    Now,
    Uuid,
    Bot,
    Route,
    Header,
}

impl MetaHelper {
    /// The text of `now`, `uuid`, `bot` and `route` (`header` reads its parameter).
    fn text(&self, meta: &RenderMeta) -> String {
        match self {
            MetaHelper::Now => humantime::format_rfc3339_millis(meta.now).to_string(),
            MetaHelper::Uuid => uuid::Uuid::new_v4().to_string(),
            MetaHelper::Bot => meta.bot.to_string(),
            MetaHelper::Route => meta.route.to_string(),
            MetaHelper::Header => String::new(),
        }
    }
}

impl HelperDef for MetaHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        let s = META.with(|m| {
            let m = m.borrow();
            let Some(meta) = m.as_ref() else {
                return self.text(&RenderMeta::new("", ""));
            };
            match self {
                MetaHelper::Header => {
                    let name = h
                        .param(0)
                        .and_then(|p| p.value().as_str())
                        .unwrap_or_default();
                    header_text(meta, name).to_owned()
                }
                _ => self.text(meta),
            }
        });
        Ok(ScopedJson::Derived(Value::String(s)))
    }
}

/// `default a b`: `a` unless it is missing, null or `""`; then `b`.
struct DefaultHelper;

impl HelperDef for DefaultHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        let a = h
            .param(0)
            .ok_or_else(|| RenderErrorReason::ParamNotFoundForIndex("default", 0))?;
        let b = h
            .param(1)
            .ok_or_else(|| RenderErrorReason::ParamNotFoundForIndex("default", 1))?;
        let empty = a.is_value_missing() || a.value().is_null() || a.value().as_str() == Some("");
        Ok(ScopedJson::Derived(if empty {
            b.value().clone()
        } else {
            a.value().clone()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, kind: Kind, strict: bool, data: Value) -> Result<String, String> {
        let t = compile(src, kind, strict).map_err(|e| e.message)?;
        let mut meta = RenderMeta::new("support-bot", "crm-upsert");
        meta.set_header_pairs(&[("x-trace".into(), "abc\"def".into())]);
        meta.now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        t.render(&Context::from(data), &meta)
    }

    #[test]
    fn json_escaping_keeps_strings_strings() {
        let out = render(
            r#"{"a": "{{x}}"}"#,
            Kind::Json,
            false,
            json!({"x": "q\"uote\\ \n }, \"evil\": 1"}),
        )
        .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v, json!({"a": "q\"uote\\ \n }, \"evil\": 1"}));
    }

    #[test]
    fn json_escaping_copies_only_what_needs_no_escape() {
        for s in [
            "",
            "plain text, ünïcödé ✓ 🎉",
            "q\"uote",
            "back\\slash",
            "tab\t nl\n cr\r nul\0 esc\u{1b} del\u{7f}",
            "ls\u{2028} ps\u{2029} other E2: \u{2013}\u{20ac}",
        ] {
            let mut slow = String::new();
            escape_chars(&mut slow, s);
            assert_eq!(json_string_escape(s), slow, "{s:?}");
        }
        assert_eq!(json_string_escape("a\u{2028}\u{1}"), "a\\u2028\\u0001");
    }

    #[test]
    fn json_helper_writes_any_value_and_null_for_missing() {
        let out = render(
            r#"{"n": {{json notes}}, "m": {{json missing}}, "o": {{json obj}}}"#,
            Kind::Json,
            false,
            json!({"notes": "a\"b", "obj": {"k": [1, true]}}),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!({"n": "a\"b", "m": null, "o": {"k": [1, true]}})
        );
    }

    #[test]
    fn missing_renders_empty_unless_strict() {
        assert_eq!(
            render("[{{a.b}}]", Kind::Text, false, json!({})).unwrap(),
            "[]"
        );
        let e = render("[{{a.b}}]", Kind::Text, true, json!({})).unwrap_err();
        assert!(e.contains("a.b"), "{e}");
        let e = render("{{json a.b}}", Kind::Json, true, json!({})).unwrap_err();
        assert!(e.contains("a.b"), "{e}");
    }

    #[test]
    fn helpers() {
        let out = render(r#"{{bot}} {{route}} {{header "X-Trace"}} {{now}} {{default a "dflt"}} {{default b "dflt"}}"#,
            Kind::Text, false, json!({"b": "set"})).unwrap();
        assert_eq!(
            out,
            "support-bot crm-upsert abc\"def 2023-11-14T22:13:20.000Z dflt set"
        );
        let u = render("{{uuid}}", Kind::Text, false, json!({})).unwrap();
        assert_eq!(u.len(), 36);
        // header values are escaped in JSON
        let out = render(
            r#"{"t": "{{header "x-trace"}}"}"#,
            Kind::Json,
            false,
            json!({}),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap()["t"],
            "abc\"def"
        );
    }

    #[test]
    fn url_path_values_may_not_be_empty_or_climb() {
        let src = "https://crm.example.com/contacts/{{id}}/notes?q={{q}}#{{f}}";
        for id in ["", "..", ".", "../admin", "a/../b", "x\\..\\y", "./", "a/."] {
            let e =
                render(src, Kind::Url, false, json!({"id": id, "q": "1", "f": "x"})).unwrap_err();
            assert!(e.contains("URL path"), "{id:?}: {e}");
        }
        // a missing field is empty too
        assert!(render(src, Kind::Url, false, json!({"q": "1"})).is_err());
        // the query and the fragment may hold anything, empty included
        for q in ["", "..", "../x"] {
            let out = render(src, Kind::Url, false, json!({"id": "C-1", "q": q, "f": q})).unwrap();
            assert!(
                out.starts_with("https://crm.example.com/contacts/C-1/notes?q="),
                "{out}"
            );
        }
    }

    #[test]
    fn url_values_are_single_segments() {
        let src = "https://crm.example.com/c/{{id}}?q={{q}}";
        for (id, enc) in [
            ("ORD-88/19", "ORD-88%2F19"),
            ("a.b", "a.b"),
            ("...", "..."),
            ("a/b", "a%2Fb"),
            ("x?y#z", "x%3Fy%23z"),
            ("@evil.com", "%40evil.com"),
            ("%2F", "%252F"),
            ("C-1001", "C-1001"),
            ("ü", "%C3%BC"),
        ] {
            let out = render(src, Kind::Url, false, json!({"id": id, "q": "a&b=c"})).unwrap();
            assert_eq!(
                out,
                format!("https://crm.example.com/c/{enc}?q=a%26b%3Dc"),
                "{id}"
            );
        }
        // json helper output is encoded too
        let out = render(
            "https://h/{{json o}}",
            Kind::Url,
            false,
            json!({"o": {"a": "/"}}),
        )
        .unwrap();
        assert_eq!(out, "https://h/%7B%22a%22%3A%22%2F%22%7D");
    }

    #[test]
    fn triple_stash_refused_in_json_and_url_only() {
        let e = compile("{\n  \"a\": {{{x}}}\n}", Kind::Json, false).unwrap_err();
        assert_eq!((e.line, e.col), (2, 8));
        assert!(compile("https://h/{{{x}}}", Kind::Url, false).is_err());
        assert!(compile("{{{x}}}", Kind::Text, false).is_ok());
        // nested in a block
        assert!(compile("{{#if a}}{{{x}}}{{/if}}", Kind::Json, false).is_err());
    }

    /// `(line, col, start of message)` of every shape error of a JSON template.
    fn shape(src: &str) -> Vec<(usize, usize, String)> {
        compile(src, Kind::Json, false)
            .unwrap()
            .shape_errors()
            .into_iter()
            .map(|e| (e.line, e.col, e.message))
            .collect()
    }

    const OUTSIDE: &str = "stands outside a JSON string";
    const INSIDE: &str = "writes JSON text into a JSON string";

    fn kinds(src: &str) -> Vec<(usize, usize, &'static str)> {
        shape(src)
            .into_iter()
            .map(|(l, c, m)| {
                let kind = if m.contains(OUTSIDE) {
                    "outside"
                } else if m.contains(INSIDE) {
                    "json-inside"
                } else {
                    panic!("unexpected message {m}")
                };
                (l, c, kind)
            })
            .collect()
    }

    /// SPEC §7.2: `{{x}}` only inside a JSON string, `{{json x}}` only outside.
    #[test]
    fn json_templates_keep_their_shape() {
        // well placed: nothing to report
        for ok in [
            r#"{"a": "{{x}}", "b": {{json y}}, "c": "{{now}} {{uuid}} {{bot}} {{route}}"}"#,
            r#"{"{{key}}": {{json v}}}"#,
            r#"{"h": "{{header "X-Trace"}}", "d": "{{default a "b"}}", "l": "{{lookup a "b"}}"}"#,
            r#"{"q": "say \"{{word}}\" now", "e": "a\\", "f": "{{x}}"}"#,
            r#"[{{#each items}}{{#unless @first}},{{/unless}}{"n": "{{name}}", "i": {{json @index}}}{{/each}}]"#,
            r#"{"s": {{#if s}}"{{s}}"{{else}}null{{/if}}, "t": "{{#if t}}yes{{else}}no{{/if}}"}"#,
            r#"{"s": {{#if a}}"{{a}}"{{else if b}}{{json b}}{{else}}null{{/if}}}"#,
            r#"{"w": {{#with data}}{"n": "{{name}}"}{{/with}}, "c": "{{! a comment }}"}"#,
            "{\n  \"a\": \"{{~x~}}\",\n  \"b\": {{~json y~}}\n}",
            r#"{"raw": "\{{not an expression}}"}"#,
        ] {
            assert_eq!(kinds(ok), vec![], "{ok}");
        }
        // misplaced: each one, at its own line and column
        assert_eq!(
            kinds(r#"{"n": {{count}}, "s": "{{json s}}", "t": {{now}}}"#),
            vec![
                (1, 7, "outside"),
                (1, 24, "json-inside"),
                (1, 42, "outside")
            ]
        );
        assert_eq!(
            kinds("{\n  \"a\": \"x\\\"{{json y}}\",\n  \"b\": {{default a 1}}\n}"),
            vec![(2, 12, "json-inside"), (3, 8, "outside")]
        );
        // helpers that write text are escaped expressions too
        for src in [
            "{\"a\": {{uuid}}}",
            "{\"a\": {{bot}}}",
            "{\"a\": {{route}}}",
            "{\"a\": {{header \"X-Trace\"}}}",
            "{\"a\": {{lookup m \"k\"}}}",
            "{\"a\": {{@index}}}",
            "{\"a\": {{default (json x) \"y\"}}}",
        ] {
            assert_eq!(kinds(src), vec![(1, 7, "outside")], "{src}");
        }
        // inside blocks, and after a block whose branches both close their strings
        assert_eq!(
            kinds(r#"{"a": {{#if x}}{{x}}{{else}}"{{json y}}"{{/if}}, "b": {{z}}}"#),
            vec![
                (1, 16, "outside"),
                (1, 30, "json-inside"),
                (1, 55, "outside")
            ]
        );
        // messages name the expression and the fix
        let (_, _, m) = &shape(r#"{"n": {{data.count}}}"#)[0];
        assert!(
            m.contains("`{{data.count}}`") && m.contains("{{json"),
            "{m}"
        );
        let (_, _, m) = &shape(r#"{"n": "{{json data.notes}}"}"#)[0];
        assert!(m.contains("`{{json data.notes}}`"), "{m}");
        // other kinds have no JSON shape
        assert!(
            compile("https://h/{{json x}}", Kind::Url, false)
                .unwrap()
                .shape_errors()
                .is_empty()
        );
        assert!(
            compile("{{x}}", Kind::Text, false)
                .unwrap()
                .shape_errors()
                .is_empty()
        );
    }

    /// A block's branches must leave the JSON string state alike (an `#each`
    /// body as it found it); otherwise what follows cannot be judged.
    #[test]
    fn blocks_that_open_a_string_in_one_branch_only_are_refused() {
        let e = shape(r#"{"a": {{#if x}}"{{else}}{{/if}}{{y}}"}"#);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].0, e[0].1), (1, 7));
        assert!(e[0].2.contains("`{{#if x}}`"), "{e:?}");
        // #each repeats its body: the body must end where it started
        let e = shape(r#"[{{#each xs}}"{{this}}{{/each}}"]"#);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].0, e[0].1), (1, 2));
    }

    #[test]
    fn header_reads_are_found_with_positions() {
        let t = compile(
            "{\"a\": \"{{header \"X-Trace\"}}\",\n \"b\": \"{{default (header \"Cookie\") \"-\"}}\", \"c\": \"{{header name}}\"{{#if (header \"X-Api-Key\")}}{{/if}}}",
            Kind::Json,
            false,
        )
        .unwrap();
        let reads: Vec<(Option<String>, usize, usize)> = t
            .header_reads()
            .into_iter()
            .map(|h| (h.name, h.line, h.col))
            .collect();
        assert_eq!(
            reads,
            vec![
                (Some("X-Trace".into()), 1, 8),
                (Some("Cookie".into()), 2, 8),
                (None, 2, 50),
                (Some("X-Api-Key".into()), 2, 66),
            ]
        );
    }

    #[test]
    fn compile_errors_have_positions() {
        let e = compile("{\n  \"a\": \"{{x\"\n}", Kind::Json, false).unwrap_err();
        assert!(e.line >= 2, "{e:?}");
        assert!(e.message.starts_with("template does not compile"), "{e:?}");
    }

    #[test]
    fn field_refs_found_with_positions() {
        let t = compile("{\n \"a\": \"{{slots.customerId.0.keyphrase}}\",\n \"b\": {{json data.notes}},\n \"c\": \"{{default data.x \"y\"}}\"{{#if intent}}{{intentScore}}{{/if}}{{#each slots.DATE}}{{start}}{{/each}}\n}", Kind::Json, false).unwrap();
        let refs: Vec<String> = t.field_refs().iter().map(|r| r.path.join(".")).collect();
        assert_eq!(
            refs,
            [
                "slots.customerId.0.keyphrase",
                "data.notes",
                "data.x",
                "intent",
                "intentScore",
                "slots.DATE"
            ]
        );
        let r = &t.field_refs()[0];
        assert_eq!((r.line, r.col), (2, 8));
        let names: Vec<String> = compile("{{now}} {{bot}} {{@root.a}}", Kind::Text, false)
            .unwrap()
            .field_refs()
            .iter()
            .map(|r| r.path.join("."))
            .collect();
        assert_eq!(names, ["a"]);
    }

    // ---- the fast path renders what handlebars renders ----

    /// Templates of every piece kind (and some that must go to handlebars).
    const DIFF_TEMPLATES: &[(&str, Kind)] = &[
        (
            r#"{"id": "{{slots.customerId.0.keyphrase}}", "e": "{{context.email}}", "s": "{{default context.status "active"}}", "n": {{json context.notes}}, "c": "{{channel}}", "t": "{{now}}", "b": "{{bot}}/{{route}}", "h": "{{header "x-trace"}}"}"#,
            Kind::Json,
        ),
        (
            r#"{"n": {{json context}}, "d": "{{default x 7}}"}"#,
            Kind::Json,
        ),
        (
            "http://h/api/{{slots.customerId.0.keyphrase}}/x?e={{context.email}}&s={{default context.status \"a b\"}}&j={{json context.notes}}",
            Kind::Url,
        ),
        (
            "Bearer {{context.email}}-{{channel}}{{!-- c --}}",
            Kind::Text,
        ),
        ("{{x}}|{{json x}}|{{default x \"d\"}}", Kind::Text),
        ("{{#if x}}{{x}}{{/if}}", Kind::Text),
        ("{{this.x}}|{{./x}}|{{[x]}}", Kind::Text),
        // whitespace control and standalone comment lines: trimmed at compile time, the same text
        (
            "a  {{~x~}}  b\n  {{!-- c --}}\n  {{~channel}} \n{{! d }}\n{{x}}",
            Kind::Text,
        ),
    ];

    fn meta() -> RenderMeta {
        let mut meta = RenderMeta::new("support-bot", "crm-upsert");
        meta.set_header_pairs(&[("x-trace".into(), "abc\"d\\ef".into())]);
        meta.now = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        meta
    }

    #[test]
    fn plain_templates_take_the_fast_path_and_blocks_do_not() {
        for (src, kind) in &DIFF_TEMPLATES[..5] {
            assert!(compile(src, *kind, false).unwrap().fast.is_some(), "{src}");
        }
        // with every value present, no piece leaves the render to handlebars
        let (src, kind) = DIFF_TEMPLATES[0];
        let full = json!({"slots": {"customerId": [{"keyphrase": "C-1"}]}, "channel": "web",
            "context": {"email": "a@b", "status": null, "notes": {"n": [1, "x"]}}});
        let t = compile(src, kind, true).unwrap();
        let fast = render_pieces(t.fast.as_ref().unwrap(), kind, &full, &meta()).unwrap();
        assert!(
            fast.contains(r#""s": "active""#) && fast.contains(r#""n": {"n":[1,"x"]}"#),
            "{fast}"
        );
        assert!(
            fast.contains("2023-11-14T22:13:20.123Z") && fast.contains(r#"abc\"d\\ef"#),
            "{fast}"
        );
        for src in [
            "{{#if x}}{{x}}{{/if}}",
            "{{lookup a b}}",
            "{{../x}}",
            "{{@root.x}}",
            "{{default a b}}",
            "{{header x}}",
            "{{json (default a \"b\")}}",
            "{{uuid}}",
        ] {
            assert!(
                compile(src, Kind::Text, false).unwrap().fast.is_none(),
                "{src}"
            );
        }
    }

    /// A payload value of any JSON kind, with text that needs escaping.
    fn any_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let text = proptest::sample::select(vec![
            "",
            "a b",
            "q\"uote",
            "back\\slash",
            "line\nbreak",
            "\u{2028}",
            "ümlaut/é",
            ".",
            "..",
            "a/../b",
            "50%",
            "?x=1#f",
            "\u{1}",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            text.prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::btree_map("[a-c]", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn the_fast_path_renders_what_handlebars_renders(
            keyphrase in proptest::option::of(any_value()),
            email in proptest::option::of(any_value()),
            status in proptest::option::of(any_value()),
            notes in proptest::option::of(any_value()),
            channel in proptest::option::of(any_value()),
            x in proptest::option::of(any_value()),
            strict in proptest::prelude::any::<bool>(),
        ) {
            let mut context = serde_json::Map::new();
            for (k, v) in [("email", email), ("status", status), ("notes", notes)] {
                if let Some(v) = v {
                    context.insert(k.into(), v);
                }
            }
            let mut root = serde_json::Map::new();
            root.insert("context".into(), Value::Object(context));
            if let Some(k) = keyphrase {
                root.insert("slots".into(), json!({"customerId": [{"keyphrase": k}]}));
            }
            for (k, v) in [("channel", channel), ("x", x)] {
                if let Some(v) = v {
                    root.insert(k.into(), v);
                }
            }
            let data = Context::from(Value::Object(root));
            let meta = meta();
            for (src, kind) in DIFF_TEMPLATES {
                let t = compile(src, *kind, strict).unwrap();
                let slow = t.render_handlebars(&data, &meta).and_then(|o| t.finish(o, &data));
                proptest::prop_assert_eq!(t.render(&data, &meta), slow, "{} strict={}", src, strict);
            }
        }
    }
}
