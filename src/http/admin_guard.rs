//! The admin listener's gate (SPEC §7.4), run before anything else on every
//! admin request, signed in or not:
//! - **DNS rebinding:** a request whose `Host` is not an IP literal,
//!   `localhost` or a name given by `--admin-hostnames` is refused, on every
//!   route and method: a page on `evil.example` that rebinds its name to
//!   127.0.0.1 still sends `Host: evil.example`.
//! - **Cross-site requests:** a request that may change state (any method but
//!   GET, HEAD and OPTIONS) is refused when its `Origin` is present and not
//!   the listener's own, or its `Sec-Fetch-Site` is `cross-site` or
//!   `same-site`. Form posts need no CORS preflight, so without this any page
//!   the operator opens could reset breakers or replay deliveries.
//! - **Answer headers:** every answer says `X-Frame-Options: DENY`,
//!   `X-Content-Type-Options: nosniff` and a `Content-Security-Policy` that
//!   allows only the status page's own inline styles (by hash), forms to this
//!   origin, no scripts and no framing.
//!
//! Pure functions over headers, so each rule is tested alone; never echoes a
//! header's value in an answer (logs get it bounded and escaped).

use std::net::Ipv6Addr;
use std::sync::{Arc, LazyLock};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use super::error::ApiError;
use crate::telemetry::log_field::Bounded;

/// Why a request was refused (the `message` of the 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Host` names something the listener does not answer to.
    Host,
    /// `Origin` is another site's, or `Sec-Fetch-Site` says the request came
    /// from another site.
    CrossSite,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::Host => {
                "the admin listener answers only to IP addresses, localhost and the names given \
                 by --admin-hostnames (GATEWAY_ADMIN_HOSTNAMES)"
            }
            Refusal::CrossSite => {
                "cross-site requests may not change the admin listener's state; send it from \
                 the status page itself or without an Origin (curl, scripts)"
            }
        }
    }
}

/// The names (besides IP literals and `localhost`) the admin listener answers to.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    names: Vec<String>,
}

impl AllowedHosts {
    /// From `--admin-hostnames`: bare names (the CLI refuses schemes and
    /// ports), compared case-insensitively with the `Host` less its port.
    pub fn new<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Self {
        AllowedHosts {
            names: names
                .into_iter()
                .map(|n| n.as_ref().trim().to_ascii_lowercase())
                .filter(|n| !n.is_empty())
                .collect(),
        }
    }

    /// True when `host` (a `Host` header: name or IP, optional port) may be served.
    pub fn allows(&self, host: &str) -> bool {
        let Some(auth) = authority(host) else {
            return false;
        };
        let name = auth.host();
        if name.parse::<std::net::Ipv4Addr>().is_ok() {
            return true;
        }
        if let Some(v6) = name.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            return v6.parse::<Ipv6Addr>().is_ok();
        }
        name.eq_ignore_ascii_case("localhost")
            || self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// `host[:port]` parsed, or `None` when it is not one (user info, a bad port).
fn authority(s: &str) -> Option<http::uri::Authority> {
    if s.is_empty() || s.contains(['@', '/', '?', '#']) {
        return None;
    }
    let auth: http::uri::Authority = s.parse().ok()?;
    // a port, when written, must be a port
    (auth.as_str().len() == auth.host().len() || auth.port_u16().is_some()).then_some(auth)
}

/// The request's `Host`: the header, else the URI's authority (HTTP/2).
fn request_host<'a>(headers: &'a HeaderMap, uri: &'a http::Uri) -> Option<&'a str> {
    match headers.get(header::HOST) {
        Some(v) => Some(v.to_str().unwrap_or("\u{0}")),
        None => uri.authority().map(http::uri::Authority::as_str),
    }
}

/// Checks one request: `None` lets it through.
pub fn check(
    allowed: &AllowedHosts,
    method: &Method,
    headers: &HeaderMap,
    uri: &http::Uri,
) -> Option<Refusal> {
    let host = request_host(headers, uri);
    // A request without any Host cannot come from a browser (browsers always
    // send one), so it cannot be a rebinding attack: let it through.
    if let Some(h) = host
        && !allowed.allows(h)
    {
        return Some(Refusal::Host);
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.as_bytes();
        if site.eq_ignore_ascii_case(b"cross-site") || site.eq_ignore_ascii_case(b"same-site") {
            return Some(Refusal::CrossSite);
        }
    }
    let origin = headers.get(header::ORIGIN)?;
    match (origin.to_str().ok(), host) {
        (Some(o), Some(h)) if same_origin(o, h) => None,
        _ => Some(Refusal::CrossSite),
    }
}

/// True when `origin` (`scheme://host[:port]`) names the listener reached as
/// `host` (the `Host` header). The scheme may be http or https (a TLS proxy
/// in front); a missing port is the scheme's default on both sides.
fn same_origin(origin: &str, host: &str) -> bool {
    let (scheme, default_port) = match origin.split_once("://") {
        Some(("http", _)) => ("http", 80),
        Some(("https", _)) => ("https", 443),
        _ => return false,
    };
    let (Some(o), Some(h)) = (authority(&origin[scheme.len() + 3..]), authority(host)) else {
        return false;
    };
    o.host().eq_ignore_ascii_case(h.host())
        && o.port_u16().unwrap_or(default_port) == h.port_u16().unwrap_or(default_port)
}

/// The middleware: refuses with 403 `forbidden`, else serves and adds the
/// answer headers.
pub async fn guard(State(allowed): State<Arc<AllowedHosts>>, req: Request, next: Next) -> Response {
    if let Some(refusal) = check(&allowed, req.method(), req.headers(), req.uri()) {
        let host = request_host(req.headers(), req.uri()).unwrap_or("");
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::warn!(
            reason = ?refusal,
            method = %req.method(),
            path = %Bounded(req.uri().path()),
            host = %Bounded(host),
            origin = %Bounded(origin),
            "admin request refused"
        );
        let mut resp = ApiError::Forbidden {
            message: refusal.message(),
        }
        .into_response();
        add_headers(resp.headers_mut());
        return resp;
    }
    let mut resp = next.run(req).await;
    add_headers(resp.headers_mut());
    resp
}

fn add_headers(h: &mut HeaderMap) {
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // not `no-referrer`: with it Chromium sends `Origin: null` on the page's own
    // form posts, which the cross-site check must refuse
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CONTENT_SECURITY_POLICY, CSP.clone());
}

/// No scripts at all; styles only the inline `<style>` blocks of the status
/// page and the login form, each allowed by its SHA-256 (so an injected
/// `<style>` or `style=` attribute would not apply); forms only to this
/// origin; never framed; no `<base>`.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let hashes: Vec<String> = super::status_page::INLINE_STYLES
        .iter()
        .map(|css| {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(css.as_bytes());
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        })
        .collect();
    let policy = format!(
        "default-src 'none'; style-src {}; form-action 'self'; frame-ancestors 'none'; \
         base-uri 'none'",
        hashes.join(" ")
    );
    HeaderValue::from_str(&policy).expect("the policy is ASCII")
});

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, pairs: &[(&str, &str)]) -> (Method, HeaderMap) {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        (method, h)
    }

    fn run(allowed: &AllowedHosts, method: Method, pairs: &[(&str, &str)]) -> Option<Refusal> {
        let (m, h) = req(method, pairs);
        check(allowed, &m, &h, &http::Uri::from_static("/admin/reload"))
    }

    #[test]
    fn hosts_ip_literals_localhost_and_configured_names() {
        let a = AllowedHosts::new(["Gateway.Internal", " ops.example "]);
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9090",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:9090",
            "localhost",
            "LOCALHOST:9090",
            "gateway.internal",
            "gateway.internal:9090",
            "ops.example",
        ] {
            assert!(a.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9090",
            "localhost.",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "gateway.internal.evil",
            "",
            "[::1",
            "[evil]",
            "user@127.0.0.1",
            "127.0.0.1:99999",
        ] {
            assert!(!a.allows(bad), "{bad}");
        }
        assert!(!AllowedHosts::default().allows("gateway.internal"));
    }

    #[test]
    fn a_foreign_host_is_refused_on_every_method() {
        let a = AllowedHosts::default();
        for m in [Method::GET, Method::POST, Method::HEAD] {
            assert_eq!(
                run(&a, m, &[("host", "rebound.example:9090")]),
                Some(Refusal::Host)
            );
        }
        // no Host at all: not a browser
        assert_eq!(run(&a, Method::POST, &[]), None);
    }

    #[test]
    fn cross_site_posts_are_refused_same_origin_ones_served() {
        let a = AllowedHosts::default();
        let host = ("host", "127.0.0.1:9090");
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<Refusal>);
        let cases: &[Case] = &[
            (&[host], None),
            (&[host, ("origin", "http://127.0.0.1:9090")], None),
            (&[host, ("origin", "https://127.0.0.1:9090")], None),
            (
                &[
                    host,
                    ("origin", "http://127.0.0.1:9090"),
                    ("sec-fetch-site", "same-origin"),
                ],
                None,
            ),
            (&[host, ("sec-fetch-site", "none")], None),
            (
                &[host, ("origin", "http://evil.example")],
                Some(Refusal::CrossSite),
            ),
            (
                &[host, ("origin", "http://127.0.0.1:9091")],
                Some(Refusal::CrossSite),
            ),
            (
                &[host, ("origin", "http://127.0.0.1")],
                Some(Refusal::CrossSite),
            ),
            (&[host, ("origin", "null")], Some(Refusal::CrossSite)),
            (&[host, ("origin", "file://")], Some(Refusal::CrossSite)),
            (
                &[host, ("sec-fetch-site", "cross-site")],
                Some(Refusal::CrossSite),
            ),
            (
                &[host, ("sec-fetch-site", "same-site")],
                Some(Refusal::CrossSite),
            ),
            (
                &[
                    host,
                    ("origin", "http://127.0.0.1:9090"),
                    ("sec-fetch-site", "same-site"),
                ],
                Some(Refusal::CrossSite),
            ),
        ];
        for (pairs, want) in cases {
            assert_eq!(run(&a, Method::POST, pairs), *want, "{pairs:?}");
            // reads are not refused for their origin
            assert_eq!(run(&a, Method::GET, pairs), None, "{pairs:?}");
        }
        let host80 = ("host", "localhost");
        assert_eq!(
            run(&a, Method::POST, &[host80, ("origin", "http://localhost")]),
            None
        );
        assert_eq!(
            run(
                &a,
                Method::POST,
                &[("host", "localhost:80"), ("origin", "http://localhost")]
            ),
            None
        );
    }

    #[test]
    fn the_policy_allows_the_pages_styles_by_hash_and_nothing_else() {
        let csp = CSP.to_str().unwrap();
        assert!(
            csp.starts_with("default-src 'none'; style-src 'sha256-"),
            "{csp}"
        );
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("script-src"),
            "{csp}"
        );
        assert_eq!(
            csp.matches("'sha256-").count(),
            super::super::status_page::INLINE_STYLES.len()
        );
    }
}
