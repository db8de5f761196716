//! A route's outbound side: the `downstream` block (method, URL template with
//! a fixed origin, timeout, headers, outbound `auth`, success statuses,
//! `max_in_flight`), and the `retry` and `breaker` policies. Route settings
//! win over the `defaults:` block, which wins over the built-in defaults.
//!
//! It never connects anywhere: URLs are only parsed (a health or token URL is
//! checked, never fetched).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{At, Compiler, Severity, Taint};
use crate::breaker::{BreakerConfig, BreakerSettings, SlowCall};
use crate::config::model::*;
use crate::config::raw::{self, Dur, StatusPattern};
use crate::downstream::retry::{Backoff, RetryPolicy};
use crate::template::Kind;

impl Compiler<'_> {
    pub(super) fn compile_downstream(
        &mut self,
        at: &At,
        ds: raw::Downstream,
        d: Option<&raw::DownstreamDefaults>,
        strict: bool,
        deadline: Duration,
        taint: &Taint,
    ) -> Option<Downstream> {
        let method = match ds
            .method
            .or(d.and_then(|d| d.method))
            .unwrap_or(raw::Method::POST)
        {
            raw::Method::GET => http::Method::GET,
            raw::Method::POST => http::Method::POST,
            raw::Method::PUT => http::Method::PUT,
            raw::Method::PATCH => http::Method::PATCH,
            raw::Method::DELETE => http::Method::DELETE,
        };
        let url_at = at.child("url");
        let origin = self.check_url_template(&url_at, &ds.url);
        let url = self.template(&url_at, &ds.url, Kind::Url, strict);
        let url_shown = self.as_written(&url_at).unwrap_or(&ds.url).to_owned();
        let timeout = ds
            .timeout
            .or(d.and_then(|d| d.timeout))
            .map(|x| x.0)
            .unwrap_or(Duration::from_secs(5));
        if timeout.is_zero() {
            self.error(&at.child("timeout"), "must be greater than 0");
        } else if timeout > deadline
            && !taint.touches("/deadline")
            && !taint.touches("/downstream/timeout")
        {
            self.warn(
                &at.child("timeout"),
                format!(
                    "is longer than the route's deadline ({}); the deadline cuts each try short",
                    humantime::format_duration(deadline)
                ),
            );
        }
        // lower-case name → (where reported, where written, name as written, value)
        let mut header_sources: BTreeMap<String, (At, At, String, String)> = BTreeMap::new();
        if let Some(dh) = d.and_then(|d| d.headers.as_ref()) {
            let d_at = self.defaults_at.clone();
            for (k, v) in dh {
                // problems are reported at the route (each route using the default
                // says so); whether the value came from the environment is looked up
                // where it was written, in the `defaults:` block
                let written_at = d_at.as_ref().map_or_else(
                    || at.clone(),
                    |d| d.child("downstream").child("headers").child(k),
                );
                header_sources.insert(
                    k.to_ascii_lowercase(),
                    (at.clone(), written_at, k.clone(), v.clone()),
                );
            }
        }
        for (k, v) in ds.headers.iter().flatten() {
            let h_at = at.child("headers").child(k);
            header_sources.insert(
                k.to_ascii_lowercase(),
                (h_at.clone(), h_at, k.clone(), v.clone()),
            );
        }
        let mut headers = Vec::new();
        for (name, (h_at, written_at, written, value)) in header_sources {
            // a bad name is reported at the name (the key), not at its value
            let Ok(hn) = http::HeaderName::try_from(name.as_str()) else {
                let m = format!("`{written}` is not a valid header name");
                self.push(&h_at, true, Severity::Error, m);
                continue;
            };
            if matches!(
                name.as_str(),
                "host" | "content-length" | "transfer-encoding" | "connection"
            ) {
                let m = format!("`{written}` is set by the gateway and cannot be configured");
                self.push(&h_at, true, Severity::Error, m);
                continue;
            }
            if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                self.error(&h_at, "header values must not contain CR, LF or NUL");
                continue;
            }
            let secret = self.is_from_env(&written_at);
            if let Some(t) = self.template(&h_at, &value, Kind::Text, strict) {
                headers.push(HeaderSpec {
                    name: hn,
                    value: t,
                    secret,
                });
            }
        }
        let auth = match ds.auth.clone().or_else(|| d.and_then(|d| d.auth.clone())) {
            None => OutboundAuth::None,
            Some(a) => self.compile_outbound_auth(&at.child("auth"), a)?,
        };
        let mut success = StatusSet::default();
        let patterns = ds
            .success
            .or_else(|| d.and_then(|d| d.success.clone()))
            .unwrap_or_else(|| vec![StatusPattern::Class(2)]);
        for p in patterns {
            match p {
                StatusPattern::Exact(s) => success.insert(s),
                StatusPattern::Class(c) => success.insert_class(c),
            }
        }
        let max_in_flight = ds
            .max_in_flight
            .or(d.and_then(|d| d.max_in_flight))
            .unwrap_or(64);
        let tls = match (&ds.tls, d.and_then(|d| d.tls.as_ref())) {
            (Some(t), _) => self.compile_tls(&at.child("tls"), t),
            (None, Some(_)) => self.defaults_tls(),
            (None, None) => Ok(None),
        };
        if let (Ok(Some(_)), Some(o)) = (&tls, &origin)
            && o.starts_with("http://")
        {
            self.warn(
                &at.child("url"),
                "`tls` is set but the URL is http://: it is not used",
            );
        }
        let tls = tls.ok()?;
        let rate_limit = self.rate_limit(
            &at.child("rate_limit"),
            ds.rate_limit.or(d.and_then(|d| d.rate_limit)),
        )?;
        let origin = origin?;
        let base = url::Url::parse(&format!("{origin}/")).ok();
        let fingerprint = Downstream::fingerprint_of(base.as_ref(), &origin, &auth);
        Some(Downstream {
            method,
            url: url?,
            url_shown,
            base,
            origin,
            timeout,
            headers,
            auth,
            success,
            max_in_flight,
            rate_limit,
            tls,
            fingerprint,
        })
    }

    /// A `rate_limit` block: `None` inside when there is none; `None` outside after an error.
    /// `burst` defaults to `per_second` (at least 1).
    pub(super) fn rate_limit(
        &mut self,
        at: &At,
        written: Option<raw::RateLimit>,
    ) -> Option<Option<crate::ratelimit::RateLimit>> {
        let Some(r) = written else {
            return Some(None);
        };
        let burst = r.burst.unwrap_or((r.per_second.ceil() as u32).max(1));
        match crate::ratelimit::RateLimit::try_new(r.per_second, burst) {
            Ok(l) => Some(Some(l)),
            Err(m) => {
                self.error(at, m.to_owned());
                None
            }
        }
    }

    /// The `defaults:` block's `downstream.tls`, compiled once (its diagnostics
    /// once, however many routes use it; paths relative to the defaults' file).
    fn defaults_tls(&mut self) -> Result<Option<Arc<DownstreamTls>>, ()> {
        if let Some(done) = &self.defaults_tls {
            return done.clone();
        }
        let compiled = match (self.defaults_at.clone(), self.defaults_tls_raw.clone()) {
            (Some(at), Some(t)) => self.compile_tls(&at.child("downstream").child("tls"), &t),
            _ => Ok(None),
        };
        self.defaults_tls = Some(compiled.clone());
        compiled
    }

    /// A `tls` block: each file read and checked (certificates parse, the key
    /// belongs to the client certificate). `Err` when an error was reported.
    fn compile_tls(
        &mut self,
        at: &At,
        t: &raw::DownstreamTls,
    ) -> Result<Option<Arc<DownstreamTls>>, ()> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let ca = self.tls_file(at, "ca_file", &t.ca_file);
        let cert = self.tls_file(at, "client_cert_file", &t.client_cert_file);
        let key = self.tls_file(at, "client_key_file", &t.client_key_file);
        let (Ok(ca), Ok(cert), Ok(key)) = (ca, cert, key) else {
            return Err(());
        };
        let mut out = DownstreamTls {
            ca: Vec::new(),
            identity: None,
            files: Vec::new(),
            key: String::new(),
        };
        let mut ok = true;
        let certs_in = |bytes: &[u8]| -> Result<Vec<CertificateDer<'static>>, String> {
            let certs = CertificateDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("is not a PEM file of certificates ({e})"))?;
            if certs.is_empty() {
                return Err("holds no certificate (PEM `BEGIN CERTIFICATE`)".into());
            }
            Ok(certs)
        };
        if let TlsFile::Read(path, bytes) = &ca {
            let f_at = at.child("ca_file");
            match certs_in(bytes) {
                Ok(certs) => {
                    for (i, der) in certs.into_iter().enumerate() {
                        let mut roots = rustls::RootCertStore::empty();
                        match roots.add(der.clone()) {
                            Ok(()) => out.ca.push(
                                reqwest::Certificate::from_der(&der)
                                    .expect("a DER certificate is taken as it is"),
                            ),
                            Err(e) => {
                                let m = format!(
                                    "certificate {} of `{}` cannot be a CA: {e}",
                                    i + 1,
                                    super::shown(path)
                                );
                                self.error(&f_at, m);
                                ok = false;
                            }
                        }
                    }
                }
                Err(m) => {
                    self.error(&f_at, format!("`{}` {m}", super::shown(path)));
                    ok = false;
                }
            }
        }
        match (&cert, &key) {
            (TlsFile::Read(cpath, cbytes), TlsFile::Read(kpath, kbytes)) => {
                let chain = match certs_in(cbytes) {
                    Ok(c) => Some(c),
                    Err(m) => {
                        self.error(
                            &at.child("client_cert_file"),
                            format!("`{}` {m}", super::shown(cpath)),
                        );
                        None
                    }
                };
                let private = match PrivateKeyDer::from_pem_slice(kbytes) {
                    Ok(k) => Some(k),
                    Err(_) => {
                        let m = format!(
                            "`{}` holds no private key (PEM `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY`)",
                            super::shown(kpath)
                        );
                        self.error(&at.child("client_key_file"), m);
                        None
                    }
                };
                if let (Some(chain), Some(private)) = (chain, private) {
                    let provider = rustls::crypto::ring::default_provider();
                    match rustls::sign::CertifiedKey::from_der(
                        chain.clone(),
                        private.clone_key(),
                        &provider,
                    ) {
                        Ok(_) => {
                            let pem = identity_pem(&chain, &private);
                            match reqwest::Identity::from_pem(pem.as_bytes()) {
                                Ok(id) => out.identity = Some(id),
                                Err(e) => {
                                    self.error(
                                        &at.child("client_key_file"),
                                        format!("the client certificate cannot be used: {e}"),
                                    );
                                    ok = false;
                                }
                            }
                        }
                        Err(rustls::Error::InconsistentKeys(_)) => {
                            let m = format!(
                                "the key in `{}` does not belong to the certificate in `{}`",
                                super::shown(kpath),
                                super::shown(cpath)
                            );
                            self.error(&at.child("client_key_file"), m);
                            ok = false;
                        }
                        Err(e) => {
                            let m = format!("`{}` cannot be used: {e}", super::shown(kpath));
                            self.error(&at.child("client_key_file"), m);
                            ok = false;
                        }
                    }
                } else {
                    ok = false;
                }
            }
            (TlsFile::Read(..), TlsFile::Absent) => {
                self.error(
                    at,
                    "`client_cert_file` needs `client_key_file` (the certificate's private key)",
                );
                ok = false;
            }
            (TlsFile::Absent, TlsFile::Read(..)) => {
                self.error(
                    at,
                    "`client_key_file` needs `client_cert_file` (the client certificate)",
                );
                ok = false;
            }
            _ => {}
        }
        if !ok {
            return Err(());
        }
        for f in [ca, cert, key] {
            if let TlsFile::Read(path, bytes) = f {
                out.key.push_str(&format!(
                    "{}={};",
                    path.display(),
                    hex::encode(super::intake::secret_digest(&bytes))
                ));
                out.files.push(path);
            }
        }
        if out.files.is_empty() {
            return Ok(None); // every file is behind a missing variable (validate)
        }
        Ok(Some(Arc::new(out)))
    }

    /// One file of a `tls` block, read (relative to the route file). `Err` when
    /// it cannot be read (reported).
    fn tls_file(&mut self, at: &At, field: &str, written: &Option<String>) -> Result<TlsFile, ()> {
        let Some(written) = written else {
            return Ok(TlsFile::Absent);
        };
        let f_at = at.child(field);
        if self.unresolved(&f_at) {
            return Ok(TlsFile::Unresolved);
        }
        let full = self.file_dir(&f_at).join(written);
        match self.read_referenced(&f_at, written) {
            Ok(bytes) => Ok(TlsFile::Read(full, bytes)),
            Err(e) => {
                self.error(&f_at, format!("cannot read `{}`: {e}", super::shown(&full)));
                Err(())
            }
        }
    }

    /// Checks a URL template: http(s), templates only in path and query. Returns the origin.
    fn check_url_template(&mut self, at: &At, url: &str) -> Option<String> {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) if !s.contains("{{") => (s, r),
            _ => {
                if self.unresolved(at) {
                    return Some(String::new());
                }
                self.error(
                    at,
                    "expected an absolute http:// or https:// URL with a fixed host",
                );
                return None;
            }
        };
        if !matches!(scheme, "http" | "https") {
            self.error(
                at,
                format!("expected an http or https URL, got scheme `{scheme}`"),
            );
            return None;
        }
        let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..auth_end];
        if let Some(i) = authority.find("{{") {
            self.template_diag(at, 1, scheme.len() + 3 + i + 1, Severity::Error,
                "templates may not set the scheme, host or port: the host comes from the file; put `{{…}}` in the path or query".into());
            return None;
        }
        let origin = format!("{scheme}://{authority}");
        if self.unresolved(at) {
            return Some(origin);
        }
        // Check the rest parses with placeholder values (a template that does not
        // compile is reported by the compile that follows).
        let probe = replace_templates(url);
        match url::Url::parse(&probe) {
            Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {
                if !u.username().is_empty() || u.password().is_some() {
                    self.error(at, "credentials in the URL are not allowed; use `auth`");
                    return None;
                }
                Some(origin)
            }
            Ok(_) => {
                self.error(at, "URL has no host");
                None
            }
            Err(e) => {
                self.error(at, format!("invalid URL: {e}"));
                None
            }
        }
    }

    /// Whether the health probe may carry the route's credentials: only to the
    /// downstream's own origin (scheme, host, port; SPEC §7.4). Another origin
    /// is probed without them, and a route with credentials is told so.
    /// Unresolved URLs (validate without the environment) decide nothing.
    pub(super) fn health_credentials(
        &mut self,
        at: &At,
        health: &HealthSettings,
        ds: &Downstream,
    ) -> bool {
        let (Some(base), Ok(url)) = (&ds.base, url::Url::parse(&health.url)) else {
            return false;
        };
        let same = base.scheme() == url.scheme()
            && base.host() == url.host()
            && base.port_or_known_default() == url.port_or_known_default();
        if !same && !matches!(ds.auth, OutboundAuth::None) {
            // no origin is quoted: either may come from the environment
            self.warn(
                &at.child("breaker").child("health").child("url"),
                "is not on the downstream URL's origin (scheme, host and port): the probe is \
                 sent without the route's credentials",
            );
        }
        same
    }

    fn compile_outbound_auth(&mut self, at: &At, a: raw::OutboundAuth) -> Option<OutboundAuth> {
        if let Some(o) = a.oauth2 {
            let at = at.child("oauth2");
            let tu = at.child("token_url");
            let token_url = if self.unresolved(&tu) {
                url::Url::parse("http://unresolved.invalid/").expect("static URL")
            } else {
                match url::Url::parse(&o.token_url) {
                    Ok(u)
                        if matches!(u.scheme(), "http" | "https")
                            && u.username().is_empty()
                            && u.password().is_none() =>
                    {
                        u
                    }
                    _ => {
                        let shown = if self.is_from_env(&tu) {
                            "the value from the environment".to_string()
                        } else {
                            format!("`{}`", o.token_url)
                        };
                        self.error(
                            &tu,
                            format!(
                                "expected an http or https URL without credentials, got {shown}"
                            ),
                        );
                        return None;
                    }
                }
            };
            let secret = self.secret(&at.child("client_secret"), o.client_secret)?;
            let mut params = Vec::new();
            for (k, v) in o.params.unwrap_or_default() {
                if matches!(
                    k.as_str(),
                    "grant_type" | "scope" | "client_id" | "client_secret"
                ) {
                    let m = format!(
                        "`{k}` is set by the gateway (use `scopes` and `client_auth`); `params` are extra fields such as `audience` or `resource`"
                    );
                    self.push(&at.child("params").child(&k), true, Severity::Error, m);
                    return None;
                }
                params.push((k, v));
            }
            return Some(OutboundAuth::OAuth2(ClientCredentials {
                token_url,
                client_id: o.client_id,
                client_secret: secret,
                scopes: o.scopes.unwrap_or_default(),
                client_auth: match o.client_auth {
                    Some(raw::ClientAuth::Body) => ClientAuth::Body,
                    _ => ClientAuth::Basic,
                },
                params,
            }));
        }
        if let Some(b) = a.bearer {
            let token = self.secret(&at.child("bearer").child("token"), b.token)?;
            return Some(OutboundAuth::Bearer(token));
        }
        if let Some(b) = a.basic {
            let b_at = at.child("basic");
            if b.username.contains(':') {
                self.error(&b_at.child("username"), "must not contain `:` (RFC 7617)");
                return None;
            }
            let password = self.secret(&b_at.child("password"), b.password)?;
            return Some(OutboundAuth::Basic(b.username, password));
        }
        Some(OutboundAuth::None)
    }

    pub(super) fn compile_retry(
        &mut self,
        at: &At,
        r: Option<&raw::Retry>,
        d: Option<&raw::Retry>,
        taint: &Taint,
    ) -> Option<RetryPolicy> {
        let pick = |f: fn(&raw::Retry) -> Option<Dur>| {
            r.and_then(f).or_else(|| d.and_then(f)).map(|x| x.0)
        };
        let attempts = r
            .and_then(|r| r.attempts)
            .or(d.and_then(|d| d.attempts))
            .unwrap_or(3);
        let initial = pick(|r| r.backoff.as_ref().and_then(|b| b.initial))
            .unwrap_or(Duration::from_millis(200));
        let max = pick(|r| r.backoff.as_ref().and_then(|b| b.max))
            .unwrap_or(Duration::from_secs(2).max(initial));
        let retry_after_max = pick(|r| r.retry_after_max).unwrap_or(Duration::from_secs(30));
        let schedule = r
            .and_then(|r| r.schedule.clone())
            .or_else(|| d.and_then(|d| d.schedule.clone()))
            .map(|s| s.into_iter().map(|x| x.0).collect())
            .unwrap_or_else(|| {
                [10, 60, 300, 1800, 7200, 21600, 43200]
                    .into_iter()
                    .map(Duration::from_secs)
                    .collect()
            });
        match Backoff::try_new(initial, max) {
            Ok(backoff) => Some(RetryPolicy {
                attempts,
                backoff,
                retry_after_max,
                schedule,
            }),
            // a default standing in for a bad `initial` or `max`: no comparison
            Err(_) if taint.touches("/retry/backoff") => None,
            Err(m) => {
                let key = if initial.is_zero() { "initial" } else { "max" };
                self.error(&at.child("backoff").child(key), m.to_string());
                None
            }
        }
    }

    pub(super) fn compile_breaker(
        &mut self,
        at: &At,
        b: Option<&raw::Breaker>,
        d: Option<&raw::Breaker>,
        taint: &Taint,
    ) -> Option<(BreakerConfig, Option<HealthSettings>)> {
        let dur = |f: fn(&raw::Breaker) -> Option<Dur>| {
            b.and_then(f).or_else(|| d.and_then(f)).map(|x| x.0)
        };
        let num = |f: fn(&raw::Breaker) -> Option<u32>| b.and_then(f).or_else(|| d.and_then(f));
        let dflt = BreakerSettings::default();
        let open_for = dur(|b| b.open_for).unwrap_or(dflt.open_for);
        let settings = BreakerSettings {
            window: dur(|b| b.window).unwrap_or(dflt.window),
            min_calls: num(|b| b.min_calls).unwrap_or(dflt.min_calls),
            failure_rate: b
                .and_then(|b| b.failure_rate)
                .or(d.and_then(|d| d.failure_rate))
                .unwrap_or(dflt.failure_rate),
            consecutive_failures: num(|b| b.consecutive_failures)
                .unwrap_or(dflt.consecutive_failures),
            slow_call: b
                .and_then(|b| b.slow_call.clone())
                .or_else(|| d.and_then(|d| d.slow_call.clone()))
                .map(|s| SlowCall {
                    threshold: s.threshold.0,
                    rate: s.rate,
                }),
            open_for,
            open_for_max: dur(|b| b.open_for_max).unwrap_or(dflt.open_for_max.max(open_for)),
            half_open_probes: num(|b| b.half_open_probes).unwrap_or(dflt.half_open_probes),
            close_after: num(|b| b.close_after).unwrap_or(dflt.close_after),
        };
        let mut ok = true;
        let health = match b
            .and_then(|b| b.health.clone())
            .or_else(|| d.and_then(|d| d.health.clone()))
        {
            Some(h) => {
                let h_at = at.child("health").child("url");
                if !self.unresolved(&h_at)
                    && !url::Url::parse(&h.url).is_ok_and(|u| {
                        matches!(u.scheme(), "http" | "https") && u.host_str().is_some()
                    })
                {
                    self.error(&h_at, "expected an absolute http or https URL");
                    ok = false;
                }
                let interval = h.interval.map(|x| x.0).unwrap_or(Duration::from_secs(10));
                if interval.is_zero() {
                    // a probe loop without a pause would hammer the downstream
                    self.error(
                        &at.child("health").child("interval"),
                        "must be greater than 0",
                    );
                    ok = false;
                }
                Some(HealthSettings {
                    url: h.url,
                    interval,
                    // decided against the downstream: `health_credentials`
                    credentials: false,
                })
            }
            None => None,
        };
        match BreakerConfig::try_new(settings) {
            Ok(cfg) => ok.then_some((cfg, health)),
            Err(errors) => {
                // `open_for_max` is compared with `open_for`: not with a stand-in
                let removed =
                    |field: &str| taint.touches(&format!("/breaker/{}", field.replace('.', "/")));
                for e in errors {
                    let stand_in =
                        removed(e.field) || (e.field == "open_for_max" && removed("open_for"));
                    if stand_in {
                        continue;
                    }
                    // field is the key under `breaker:`, e.g. `slow_call.rate`
                    let mut e_at = at.clone();
                    for seg in e.field.split('.') {
                        e_at = e_at.child(seg);
                    }
                    self.error(&e_at, e.message);
                }
                None
            }
        }
    }
}

/// One file of a `tls` block.
enum TlsFile {
    /// Not set.
    Absent,
    /// Behind a missing `${VAR}` (validate without the environment): not checked.
    Unresolved,
    /// Read: the resolved path and the bytes.
    Read(std::path::PathBuf, Vec<u8>),
}

/// A certificate chain and its key as one PEM (what reqwest's `Identity` takes),
/// from the DER that was checked: sections other than these (`EC PARAMETERS`)
/// are left out.
fn identity_pem(
    chain: &[rustls::pki_types::CertificateDer<'static>],
    key: &rustls::pki_types::PrivateKeyDer<'static>,
) -> String {
    use base64::Engine as _;
    use rustls::pki_types::PrivateKeyDer;
    fn section(out: &mut String, label: &str, der: &[u8]) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        out.push_str(&format!("-----BEGIN {label}-----\n"));
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
    }
    let mut out = String::new();
    for c in chain {
        section(&mut out, "CERTIFICATE", c);
    }
    let (label, der) = match key {
        PrivateKeyDer::Pkcs1(k) => ("RSA PRIVATE KEY", k.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(k) => ("EC PRIVATE KEY", k.secret_sec1_der()),
        PrivateKeyDer::Pkcs8(k) => ("PRIVATE KEY", k.secret_pkcs8_der()),
        _ => ("PRIVATE KEY", key.secret_der()),
    };
    section(&mut out, label, der);
    out
}

/// `https://h/{{a}}/x?q={{b}}` → `https://h/x/x?q=x`, to check the URL's static shape.
fn replace_templates(url: &str) -> String {
    let mut out = String::new();
    let mut rest = url;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        out.push('x');
        rest = match rest[i..].find("}}") {
            Some(j) => rest[i + j + 2..].trim_start_matches('}'),
            None => "",
        };
    }
    out.push_str(rest);
    out
}
