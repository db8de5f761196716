//! Lint warnings of `gateway validate`: configurations that load and run, but
//! are probably not what the author wants in production. Each warning starts
//! with its rule (`[lint:none-auth]`); a bot or route silences one with
//! `lint: { allow: [none-auth] }`. The rules (see `raw::LintRule`):
//! - `none-auth`: a bot with `auth: { none: {} }`;
//! - `literal-secret`: a key, token, password, client secret or credential
//!   header written literally where `${VAR}` belongs;
//! - `http-credentials`: credentials (bearer, OAuth2, a credential header) sent
//!   over plain `http://` to a host that is not loopback;
//! - `no-idempotency-key`: an async, POST, PUT or PATCH route without
//!   `idempotency_key` (Cognigy's HTTP Request node may retry);
//! - `optional-key-field`: `idempotency_key` reads a payload field that the
//!   payload schemas do not require (checked with the schemas, in `fields`).
//!
//! It judges what the author wrote (the raw elements, and whether a value was
//! written with `${…}`), never makes an error, and never quotes a value: a
//! literal secret is named by its key path only.

use super::{At, Compiler, Severity};
use crate::config::raw::{self, LintRule};

/// Headers that carry credentials when sent downstream.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "apikey",
    "cookie",
];

fn is_credential_header(name: &str) -> bool {
    CREDENTIAL_HEADERS
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

impl Compiler<'_> {
    /// A lint warning at `at` (its value, or its key with `at_key`), unless the
    /// element at `elem` allows `rule`.
    fn lint(&mut self, elem: &At, at: &At, at_key: bool, rule: LintRule, message: String) {
        if self.lint_allowed(elem, rule) {
            return;
        }
        let message = format!("[lint:{}] {message}", rule.name());
        self.push(at, at_key, Severity::Warning, message);
    }

    /// Whether the bot or route at `elem` silences `rule`.
    pub(super) fn lint_allowed(&self, elem: &At, rule: LintRule) -> bool {
        self.lint_allow
            .get(&(elem.file, elem.pointer.clone()))
            .is_some_and(|rules| rules.contains(&rule))
    }

    /// Records what the element at `at` allows; an allowed rule that can never
    /// fire there is a warning (it silences nothing).
    fn record_allow(&mut self, at: &At, lint: Option<&raw::Lint>, bot: bool) {
        let Some(lint) = lint else { return };
        for (i, rule) in lint.allow.iter().enumerate() {
            if bot && !rule.applies_to_bots() {
                let m = format!(
                    "`{}` is a route rule; on a bot it silences nothing",
                    rule.name()
                );
                self.warn(&at.child("lint").child("allow").child(&i.to_string()), m);
            }
        }
        self.lint_allow
            .insert((at.file, at.pointer.clone()), lint.allow.clone());
    }

    /// Was the value at `at` written with a `${…}` reference?
    fn written_with_env(&self, at: &At) -> bool {
        self.files[at.file].env_refs.contains(&at.pointer)
    }

    /// `literal-secret` for the secret at `at`, when written without `${…}`.
    fn literal_secret(&mut self, elem: &At, at: &At, value: &str, what: &str) {
        if value.is_empty() || self.written_with_env(at) || self.unresolved(at) {
            return;
        }
        let m = format!(
            "{what} is written literally: anyone who can read the file has it, and it ends up \
             in version control; use `${{VAR}}` and set VAR where the gateway runs"
        );
        self.lint(elem, at, false, LintRule::LiteralSecret, m);
    }

    /// The lint rules of one bot.
    pub(super) fn lint_bot(&mut self, at: &At, b: &raw::Bot) {
        self.record_allow(at, b.lint.as_ref(), true);
        let auth = at.child("auth");
        if b.auth.none.is_some() {
            let m = "the bot takes calls without credentials: anyone who can reach the gateway \
                     can call its routes; use `api_key` (Cognigy's `X-API-Key` or \
                     `Authorization: ApiKey …` connection)"
                .to_string();
            self.lint(at, &auth.child("none"), true, LintRule::NoneAuth, m);
        }
        let mut secrets: Vec<(At, &str, &str)> = Vec::new();
        if let Some(k) = &b.auth.api_key {
            let list = auth.child("api_key").child("keys");
            for (i, v) in k.keys.iter().enumerate() {
                secrets.push((list.child(&i.to_string()), v, "the API key"));
            }
        }
        if let Some(t) = &b.auth.bearer {
            let list = auth.child("bearer").child("tokens");
            for (i, v) in t.tokens.iter().enumerate() {
                secrets.push((list.child(&i.to_string()), v, "the bearer token"));
            }
        }
        if let Some(p) = &b.auth.basic {
            let at = auth.child("basic").child("password");
            secrets.push((at, &p.password, "the password"));
        }
        if let Some(h) = &b.auth.hmac {
            let list = auth.child("hmac").child("secrets");
            for (i, v) in h.secrets.iter().enumerate() {
                secrets.push((list.child(&i.to_string()), v, "the HMAC secret"));
            }
        }
        if let Some(s) = &b.auth.standard_webhooks {
            let list = auth.child("standard_webhooks").child("secrets");
            for (i, v) in s.secrets.iter().enumerate() {
                secrets.push((list.child(&i.to_string()), v, "the signing secret"));
            }
        }
        for (s_at, value, what) in secrets {
            self.literal_secret(at, &s_at, value, what);
        }
    }

    /// `literal-secret` for an outbound `auth` block and headers, written at
    /// `ds` (a route's `downstream`, or the `defaults:` block's); `elem` is the
    /// route (or the block) that may allow it.
    fn lint_outbound_secrets(
        &mut self,
        elem: &At,
        ds: &At,
        auth: Option<&raw::OutboundAuth>,
        headers: Option<&std::collections::BTreeMap<String, String>>,
    ) {
        if let Some(a) = auth {
            let a_at = ds.child("auth");
            if let Some(b) = &a.bearer {
                let t = a_at.child("bearer").child("token");
                self.literal_secret(elem, &t, &b.token, "the bearer token");
            }
            if let Some(o) = &a.oauth2 {
                let s = a_at.child("oauth2").child("client_secret");
                self.literal_secret(elem, &s, &o.client_secret, "the client secret");
            }
        }
        for (name, value) in headers.into_iter().flatten() {
            // a template reads the payload: not a secret written in the file
            if is_credential_header(name) && !value.contains("{{") {
                let h = ds.child("headers").child(name);
                self.literal_secret(elem, &h, value, &format!("the `{name}` header"));
            }
        }
    }

    /// The lint rules of the `defaults:` block (it has no `lint` key: a secret
    /// there belongs in `${VAR}` like anywhere else).
    pub(super) fn lint_defaults(&mut self, at: &At, d: &raw::Defaults) {
        if let Some(ds) = &d.downstream {
            let ds_at = at.child("downstream");
            self.lint_outbound_secrets(at, &ds_at, ds.auth.as_ref(), ds.headers.as_ref());
        }
    }

    /// The lint rules of one route (all but `optional-key-field`, which needs
    /// the compiled schemas); `d` is the `defaults:` block it inherits from.
    pub(super) fn lint_route(&mut self, at: &At, r: &raw::Route, d: &raw::Defaults) {
        self.record_allow(at, r.lint.as_ref(), false);
        let dd = d.downstream.as_ref();
        self.lint_downstream(at, &at.child("downstream"), &r.downstream, dd);
        for (i, t) in r.also.iter().flatten().enumerate() {
            let ds_at = at.child("also").child(&i.to_string()).child("downstream");
            self.lint_downstream(at, &ds_at, &t.downstream, dd);
        }
        self.lint_idempotency_key(at, r, dd);
    }

    /// `literal-secret` and `http-credentials` of one downstream (a route's or
    /// an `also` target's, at `ds_at`) of the route at `elem`.
    fn lint_downstream(
        &mut self,
        elem: &At,
        ds_at: &At,
        ds: &raw::Downstream,
        dd: Option<&raw::DownstreamDefaults>,
    ) {
        let at = elem;
        self.lint_outbound_secrets(at, ds_at, ds.auth.as_ref(), ds.headers.as_ref());

        // http-credentials
        let auth = ds
            .auth
            .as_ref()
            .or_else(|| dd.and_then(|d| d.auth.as_ref()));
        let credential_header = ds
            .headers
            .iter()
            .chain(dd.and_then(|d| d.headers.as_ref()))
            .flat_map(|h| h.keys())
            .find(|k| is_credential_header(k));
        let carried = match auth {
            Some(a) if a.bearer.is_some() => Some("a bearer token".to_string()),
            Some(a) if a.oauth2.is_some() => Some("an OAuth2 access token".to_string()),
            _ => credential_header.map(|h| format!("the `{h}` header")),
        };
        let url_at = ds_at.child("url");
        if let Some(what) = carried
            && !self.unresolved(&url_at)
            && let Some(host) = plain_http_remote_host(&ds.url)
        {
            let m = format!(
                "{what} is sent over plain http:// to `{host}`, readable by anyone on the way; \
                 use https:// (http:// is fine for loopback hosts only)"
            );
            self.lint(at, &url_at, false, LintRule::HttpCredentials, m);
        }
        if let Some(o) = ds.auth.as_ref().and_then(|a| a.oauth2.as_ref()) {
            let tu = ds_at.child("auth").child("oauth2").child("token_url");
            if !self.unresolved(&tu)
                && let Some(host) = plain_http_remote_host(&o.token_url)
            {
                let m = format!(
                    "the client secret is sent over plain http:// to `{host}`, readable by \
                     anyone on the way; use https:// (http:// is fine for loopback hosts only)"
                );
                self.lint(at, &tu, false, LintRule::HttpCredentials, m);
            }
        }
    }

    /// `no-idempotency-key` of the route `r` at `at`.
    fn lint_idempotency_key(
        &mut self,
        at: &At,
        r: &raw::Route,
        dd: Option<&raw::DownstreamDefaults>,
    ) {
        if r.idempotency_key.is_none() {
            let method = r
                .downstream
                .method
                .or_else(|| dd.and_then(|d| d.method))
                .unwrap_or(raw::Method::POST);
            let why = if r.mode == Some(raw::Mode::Async) {
                Some(
                    "an async route without `idempotency_key`: when the bot sends the same \
                     call again (Cognigy's HTTP Request node may retry), it is stored and \
                     delivered twice"
                        .to_string(),
                )
            } else if r.also.iter().flatten().any(|t| t.idempotency_key.is_none()) {
                Some(
                    "a route with `also` targets but no `idempotency_key`: when the bot sends \
                     the same call again, each target stores and delivers it again"
                        .to_string(),
                )
            } else if matches!(
                method,
                raw::Method::POST | raw::Method::PUT | raw::Method::PATCH
            ) {
                Some(format!(
                    "a {method:?} route without `idempotency_key`: Cognigy's HTTP Request node \
                     may retry, and every retry is sent downstream again"
                ))
            } else {
                None
            };
            if let Some(why) = why {
                let m = format!(
                    "{why}; key it on the Cognigy input, e.g. `idempotency_key: \"{{{{inputId}}}}\"`"
                );
                self.lint(at, &at.child("name"), false, LintRule::NoIdempotencyKey, m);
            }
        }
    }
}

/// The host of an `http://` URL (templates allowed in its path and query) when
/// it is not a loopback host (`localhost`, 127.0.0.0/8, `::1`); else `None`.
fn plain_http_remote_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let parsed = url::Url::parse(&format!("http://{}/", &rest[..end])).ok()?;
    let loopback = match parsed.host()? {
        url::Host::Domain(d) => {
            d.eq_ignore_ascii_case("localhost") || d.to_ascii_lowercase().ends_with(".localhost")
        }
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    (!loopback).then(|| parsed.host_str().unwrap_or_default().to_owned())
}

#[cfg(test)]
mod tests {
    use super::plain_http_remote_host;

    #[test]
    fn only_plain_http_to_remote_hosts_is_flagged() {
        for url in [
            "https://crm.example.com/x",
            "http://127.0.0.1:8081/x/{{a}}",
            "http://127.3.4.5/x",
            "http://localhost:8081",
            "http://api.localhost/x",
            "http://[::1]:8081/x",
            "ftp://crm.example.com/",
        ] {
            assert_eq!(plain_http_remote_host(url), None, "{url}");
        }
        assert_eq!(
            plain_http_remote_host("http://crm.example.com:8080/v1/{{id}}?q={{x}}").as_deref(),
            Some("crm.example.com")
        );
        assert_eq!(
            plain_http_remote_host("http://10.0.0.7/x").as_deref(),
            Some("10.0.0.7")
        );
    }
}
