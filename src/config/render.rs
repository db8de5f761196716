//! Renders the downstream request a route makes for a payload: method, URL,
//! headers and JSON body. Shared by `serve`, `validate`'s examples and
//! `gateway render`, so what validate checks is what serve sends.
//!
//! Owns SPEC §3's rendering rules: the body must parse as JSON, the URL keeps
//! the file's origin, header values carry no CR/LF/NUL, and the idempotency key
//! is sent as `Idempotency-Key` unless the route sets that header. Never
//! performs I/O; downstream auth is added by the caller at send time.

use handlebars::Context;
use http::{HeaderName, HeaderValue};

use crate::config::model::{Downstream, Route};
use crate::template::RenderMeta;

/// The request a route would send (without downstream auth).
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    pub method: http::Method,
    pub url: String,
    /// `url`, parsed once (the client sends this; parsing is not free).
    pub target: url::Url,
    /// Headers with a flag telling whether the value is secret (from the environment).
    pub headers: Vec<(HeaderName, HeaderValue, bool)>,
    /// Rendered JSON body (validated to parse).
    pub body: Option<String>,
    pub idempotency_key: Option<String>,
}

/// Why a request could not be rendered; names the route and the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route `{route}`: {part}: {message}")]
pub struct RenderFailure {
    pub route: String,
    pub part: &'static str,
    pub message: String,
}

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Parses a rendered URL: relative to the route's parsed origin when there is one
/// (the host was parsed and checked once, at load), else whole. A rest that
/// starts like a network-path reference (`//`, or `\` which special schemes
/// read as `/`) is parsed whole, where it can only be a path.
fn parse_within(
    base: Option<&url::Url>,
    url: &str,
    rest: &str,
) -> Result<url::Url, url::ParseError> {
    match base {
        Some(base) if !matches!(rest.as_bytes(), [b'/' | b'\\', b'/' | b'\\', ..]) => {
            base.join(rest)
        }
        _ => url::Url::parse(url),
    }
}

/// Parses a delivery's stored URL (rendered at acceptance for `ds`, whose
/// origin the fingerprint check has confirmed): relative to the parsed origin
/// when it starts with it, as at acceptance, else whole. Same result as a
/// whole parse, without parsing the host again on every delivery.
pub fn parse_stored(ds: &Downstream, url: &str) -> Result<url::Url, url::ParseError> {
    parse_under(ds.base.as_ref(), &ds.origin, url)
}

fn parse_under(
    base: Option<&url::Url>,
    origin: &str,
    url: &str,
) -> Result<url::Url, url::ParseError> {
    match url.strip_prefix(origin) {
        Some(rest) if matches!(rest.as_bytes().first(), None | Some(b'/' | b'?' | b'#')) => {
            parse_within(base, url, rest)
        }
        _ => url::Url::parse(url),
    }
}

/// Renders `route`'s request for the payload in `ctx`.
pub fn build(
    route: &Route,
    ctx: &Context,
    meta: &RenderMeta,
) -> Result<OutboundRequest, RenderFailure> {
    build_with(route, ctx, meta, true)
}

/// Renders `route`'s request for a stored delivery replayed: as [`build`],
/// without rendering the route's `idempotency_key` (the delivery keeps the key
/// it was accepted with; the sender adds it as `Idempotency-Key`).
pub fn build_replayed(
    route: &Route,
    ctx: &Context,
    meta: &RenderMeta,
) -> Result<OutboundRequest, RenderFailure> {
    build_with(route, ctx, meta, false)
}

fn build_with(
    route: &Route,
    ctx: &Context,
    meta: &RenderMeta,
    with_key: bool,
) -> Result<OutboundRequest, RenderFailure> {
    let fail = |part: &'static str, message: String| RenderFailure {
        route: route.name.clone(),
        part,
        message,
    };
    let ds = &route.downstream;

    let url = ds.url.render(ctx, meta).map_err(|m| fail("url", m))?;
    if !url.starts_with(&ds.origin)
        || !matches!(
            url.as_bytes().get(ds.origin.len()),
            None | Some(b'/' | b'?' | b'#')
        )
    {
        return Err(fail(
            "url",
            "rendered URL leaves the configured origin".into(),
        ));
    }
    let rest = &url[ds.origin.len()..];
    let parsed = parse_within(ds.base.as_ref(), &url, rest)
        .map_err(|e| fail("url", format!("rendered URL is invalid: {e}")))?;
    if let Some(base) = &ds.base
        && (parsed.host() != base.host() || parsed.port() != base.port())
    {
        return Err(fail(
            "url",
            "rendered URL leaves the configured origin".into(),
        ));
    }
    // URL parsers treat `.`/`..` segments, even percent-encoded (`%2E%2E`), as dot
    // segments and remove them. Refuse any rendered path that would be normalized.
    let path = rest.split(['?', '#']).next().unwrap_or("");
    if parsed.path() != if path.is_empty() { "/" } else { path } {
        return Err(fail(
            "url",
            "a value renders a `.` or `..` path segment, which would change the path".into(),
        ));
    }

    let idempotency_key = match route.idempotency_key.as_ref().filter(|_| with_key) {
        Some(t) => {
            let k = t
                .render(ctx, meta)
                .map_err(|m| fail("idempotency_key", m))?;
            if k.is_empty() {
                return Err(fail("idempotency_key", "rendered to an empty key".into()));
            }
            Some(k)
        }
        None => None,
    };

    let mut headers = Vec::with_capacity(ds.headers.len() + 2);
    for h in &ds.headers {
        let v = h
            .value
            .render(ctx, meta)
            .map_err(|m| fail("headers", format!("{}: {m}", h.name)))?;
        headers.push((
            h.name.clone(),
            header_value(&v).map_err(|m| fail("headers", format!("{}: {m}", h.name)))?,
            h.secret,
        ));
    }
    if let Some(k) = &idempotency_key
        && !headers.iter().any(|(n, _, _)| *n == IDEMPOTENCY_KEY)
    {
        let v = header_value(k).map_err(|m| fail("idempotency_key", m))?;
        headers.push((IDEMPOTENCY_KEY, v, false));
    }

    let body = match &route.body {
        Some(t) => {
            let text = t.render(ctx, meta).map_err(|m| fail("body", m))?;
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
                return Err(fail("body", format!("rendered body is not JSON: {e}")));
            }
            if !headers
                .iter()
                .any(|(n, _, _)| *n == http::header::CONTENT_TYPE)
            {
                headers.push((
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                    false,
                ));
            }
            Some(text)
        }
        None => None,
    };

    Ok(OutboundRequest {
        method: ds.method.clone(),
        url,
        target: parsed,
        headers,
        body,
        idempotency_key,
    })
}

/// Header names whose values are masked wherever a request is shown (`gateway
/// render`, `validate`'s example diffs), even when written literally in the file.
pub fn is_sensitive_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    if n == "idempotency-key" {
        return false;
    }
    n == "authorization"
        || n == "cookie"
        || n == "proxy-authorization"
        || ["key", "token", "secret", "password", "signature"]
            .iter()
            .any(|s| n.contains(s))
}

/// A header value with no CR, LF or NUL (and otherwise valid).
pub fn header_value(v: &str) -> Result<HeaderValue, String> {
    if v.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err("rendered value contains CR, LF or NUL".into());
    }
    HeaderValue::from_str(v).map_err(|_| "rendered value is not a valid header value".into())
}

#[cfg(test)]
mod tests {
    use super::{parse_under, parse_within};

    /// Parsing relative to the parsed origin gives exactly what parsing the whole
    /// URL gives, and nothing a value can render reaches another host.
    #[test]
    fn relative_parse_matches_a_whole_parse_and_keeps_the_host() {
        for origin in ["http://127.0.0.1:8080", "https://crm.example.com"] {
            let base = url::Url::parse(&format!("{origin}/")).unwrap();
            for rest in [
                "",
                "/",
                "/a/b?x=1&y=%2F#f",
                "?q=1",
                "#frag",
                "/a%2F..%2Fb",
                "//evil.example/x",
                "/\\evil.example/x",
                "\\\\evil.example",
                "/%2F%2Fevil.example",
                "/a b",
            ] {
                let url = format!("{origin}{rest}");
                let got = parse_within(Some(&base), &url, rest).map(|u| u.to_string());
                let whole = url::Url::parse(&url).map(|u| u.to_string());
                assert_eq!(got, whole, "{url}");
                if let Ok(u) = parse_within(Some(&base), &url, rest) {
                    assert_eq!((u.host(), u.port()), (base.host(), base.port()), "{url}");
                }
                // a stored URL: the same as a whole parse, under this origin or not
                for stored in [url.clone(), format!("http://other.example:81{rest}")] {
                    let got = parse_under(Some(&base), origin, &stored).map(|u| u.to_string());
                    let whole = url::Url::parse(&stored).map(|u| u.to_string());
                    assert_eq!(got, whole, "{stored}");
                }
            }
        }
    }
}
