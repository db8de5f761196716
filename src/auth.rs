//! Inbound webhook authentication: does the request a bot sent carry a valid
//! credential for that bot (`bots[].auth`, SPEC §3; pipeline step 3, §5)?
//!
//! Owns the auth modes as plain types (built by the route compiler from
//! validated YAML) and [`verify`], a pure function over the request headers,
//! the raw body, the configured secrets and `now`.
//!
//! Never does I/O or logging, and never puts a secret or a presented
//! credential (or any piece of one) into an error, `Debug` or `Display`
//! output. Errors only say what kind of check failed, for operators' logs
//! and metrics; the HTTP layer answers every one with the same 401.
//!
//! How values are compared: a presented value is decoded and length-checked
//! first, then compared in constant time (`subtle`) against *every*
//! configured secret, OR-ing the results, so timing tells neither how much of
//! a guess was right nor which of several rotated secrets matched.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT as BASE64;
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::header::{AUTHORIZATION, HeaderMap, HeaderName};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretSlice, SecretString};
use sha2::{Digest as _, Sha256};
use subtle::{Choice, ConstantTimeEq as _};

/// Length of an HMAC-SHA256 tag in bytes.
const MAC_LEN: usize = 32;

/// Standard Webhooks headers (<https://www.standardwebhooks.com/>).
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// How a bot proves who it is; one per bot. Secret lists allow rotation: any
/// one matching is accepted. An empty list matches nothing (fails closed);
/// the route compiler is expected to refuse empty lists and empty secrets.
#[derive(Clone, Debug)]
pub enum InboundAuth {
    /// A static key in `header`, compared with the whole header value. When
    /// `header` is `authorization`, `ApiKey <key>` is accepted too (the
    /// `Authorization: ApiKey …` option of Cognigy's HTTP Request node).
    ApiKey {
        header: HeaderName,
        keys: StaticSecrets,
    },
    /// `Authorization: Bearer <token>` (scheme case-insensitive).
    Bearer { tokens: StaticSecrets },
    /// `Authorization: Basic base64(username:password)`.
    Basic {
        username: String,
        password: SecretString,
    },
    /// Hex HMAC-SHA256 of the raw body in `header`; a `sha256=` prefix
    /// (GitHub style) is optional, hex digits of either case.
    Hmac {
        header: HeaderName,
        secrets: Vec<SecretString>,
    },
    /// Standard Webhooks signatures with a timestamp window against replays.
    StandardWebhooks {
        secrets: Vec<StandardWebhooksSecret>,
        /// Largest accepted distance between `webhook-timestamp` and now,
        /// in either direction.
        tolerance: Duration,
    },
    /// Explicit opt-out: every request is accepted.
    None,
}

/// Static secrets (API keys, bearer tokens) kept only as their SHA-256
/// digests: a request hashes just the presented value, and the plain secrets
/// are not held in memory after load. `Debug` prints only how many there are.
#[derive(Clone)]
pub struct StaticSecrets(Vec<[u8; 32]>);

impl StaticSecrets {
    pub fn new(secrets: &[SecretString]) -> Self {
        StaticSecrets(
            secrets
                .iter()
                .map(|s| Sha256::digest(secret_bytes(s)).into())
                .collect(),
        )
    }

    /// As [`matches_any`]: equal-length compares of digests, every one made.
    fn matches(&self, presented: &[u8]) -> Choice {
        matches_any_digest(presented, self.0.iter().copied())
    }
}

impl From<Vec<SecretString>> for StaticSecrets {
    fn from(secrets: Vec<SecretString>) -> Self {
        StaticSecrets::new(&secrets)
    }
}

impl fmt::Debug for StaticSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StaticSecrets(<{}>)", self.0.len())
    }
}

/// A decoded Standard Webhooks signing key. Zeroized on drop; `Debug` prints
/// `***`.
#[derive(Clone)]
pub struct StandardWebhooksSecret(SecretSlice<u8>);

impl StandardWebhooksSecret {
    /// Parses `whsec_<base64>` (standard alphabet, padding optional), or the
    /// bare base64 without the prefix.
    ///
    /// # Errors
    /// [`SecretFormatError`] if the text is not base64 or decodes to nothing;
    /// the error never repeats the input.
    pub fn parse(s: &str) -> Result<Self, SecretFormatError> {
        let encoded = s.strip_prefix("whsec_").unwrap_or(s);
        let key = Zeroizing::new(
            BASE64
                .decode(encoded)
                .map_err(|_| SecretFormatError::NotBase64)?,
        );
        if key.is_empty() {
            return Err(SecretFormatError::Empty);
        }
        // An exact-size copy: boxing the decoder's Vec could reallocate and
        // leave an unwiped copy behind; `key` itself is wiped on drop.
        Ok(Self(key.to_vec().into()))
    }
}

impl fmt::Debug for StandardWebhooksSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StandardWebhooksSecret(***)")
    }
}

/// Why a Standard Webhooks secret could not be parsed. Never holds the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretFormatError {
    #[error("must be whsec_ followed by base64 (standard alphabet)")]
    NotBase64,
    #[error("must be whsec_ followed by base64 of a non-empty key")]
    Empty,
}

/// Why a request was refused. For operators only: holds header names and
/// fixed descriptions, never a secret or a presented value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The header carrying the credential is absent.
    #[error("no `{header}` header")]
    Missing { header: HeaderName },
    /// The header is present but cannot be read as this mode's credential.
    #[error("`{header}` header is malformed: {problem}")]
    Malformed {
        header: HeaderName,
        problem: &'static str,
    },
    /// `Authorization` uses another scheme than the configured one.
    #[error("`authorization` header does not use the {expected} scheme")]
    WrongScheme { expected: &'static str },
    /// Well-formed, but matches no configured secret.
    #[error("credential in `{header}` matches no configured secret")]
    Mismatch { header: HeaderName },
    /// Standard Webhooks: `webhook-timestamp` is further from now than the
    /// tolerance (a replay, or clocks out of sync).
    #[error("`webhook-timestamp` is too far in the {skew}")]
    TimestampOutOfTolerance { skew: Skew },
}

impl AuthError {
    /// A short, stable tag for log fields and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing { .. } => "missing",
            Self::Malformed { .. } => "malformed",
            Self::WrongScheme { .. } => "wrong_scheme",
            Self::Mismatch { .. } => "mismatch",
            Self::TimestampOutOfTolerance { .. } => "timestamp_out_of_tolerance",
        }
    }
}

/// Which side of the tolerance window a timestamp fell on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skew {
    Past,
    Future,
}

impl fmt::Display for Skew {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Past => "past",
            Self::Future => "future",
        })
    }
}

impl InboundAuth {
    /// Whether checking needs the body (signatures over it). The other modes
    /// carry their credential in a header, checked before the body is read
    /// (SPEC §7.1): a wrong one is refused without waiting for the body.
    pub fn needs_body(&self) -> bool {
        matches!(
            self,
            InboundAuth::Hmac { .. } | InboundAuth::StandardWebhooks { .. }
        )
    }
}

/// Checks the request's credential against `auth`. `body` is the raw body
/// as received (signatures cover its exact bytes); `now` is the current
/// time, used only by Standard Webhooks. A credential header sent more than
/// once is refused as malformed.
///
/// # Errors
/// [`AuthError`] saying what kind of check failed.
pub fn verify(
    auth: &InboundAuth,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<(), AuthError> {
    match auth {
        InboundAuth::ApiKey { header, keys } => verify_api_key(header, keys, headers),
        InboundAuth::Bearer { tokens } => {
            let token = scheme_credential(headers, "Bearer")?;
            mismatch_unless(tokens.matches(token.as_bytes()), &AUTHORIZATION)
        }
        InboundAuth::Basic { username, password } => verify_basic(username, password, headers),
        InboundAuth::Hmac { header, secrets } => verify_hmac(header, secrets, headers, body),
        InboundAuth::StandardWebhooks { secrets, tolerance } => {
            verify_standard_webhooks(secrets, *tolerance, headers, body, now)
        }
        InboundAuth::None => Ok(()),
    }
}

fn verify_api_key(
    header: &HeaderName,
    keys: &StaticSecrets,
    headers: &HeaderMap,
) -> Result<(), AuthError> {
    let value = credential_header(headers, header)?;
    let mut ok = keys.matches(value.as_bytes());
    if *header == AUTHORIZATION {
        let (scheme, key) = split_scheme(value);
        if scheme.eq_ignore_ascii_case("ApiKey") {
            ok |= keys.matches(key.as_bytes());
        }
    }
    mismatch_unless(ok, header)
}

fn verify_basic(
    username: &str,
    password: &SecretString,
    headers: &HeaderMap,
) -> Result<(), AuthError> {
    let malformed = |problem| AuthError::Malformed {
        header: AUTHORIZATION,
        problem,
    };
    let encoded = scheme_credential(headers, "Basic")?;
    let decoded = BASE64
        .decode(encoded)
        .map_err(|_| malformed("Basic credentials are not base64"))?;
    // The user-id cannot contain a colon (RFC 7617 §2); the password can.
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| malformed("Basic credentials have no `:`"))?;
    let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
    // `&`, not `&&`: always compare both, so timing does not say which was wrong.
    let ok = matches_any(user, [username.as_bytes()])
        & matches_any(pass, [password.expose_secret().as_bytes()]);
    mismatch_unless(ok, &AUTHORIZATION)
}

fn verify_hmac(
    header: &HeaderName,
    secrets: &[SecretString],
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), AuthError> {
    let malformed = |problem| AuthError::Malformed {
        header: header.clone(),
        problem,
    };
    let value = credential_header(headers, header)?;
    let hex_mac = match value.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256=") => &value[7..],
        _ => value,
    };
    if hex_mac.len() != 2 * MAC_LEN {
        return Err(malformed("signature is not 64 hex digits"));
    }
    let mut presented = [0u8; MAC_LEN];
    hex::decode_to_slice(hex_mac, &mut presented)
        .map_err(|_| malformed("signature is not 64 hex digits"))?;
    let ok = secrets.iter().fold(Choice::from(0), |ok, secret| {
        ok | hmac_sha256(secret_bytes(secret), &[body]).ct_eq(&presented)
    });
    mismatch_unless(ok, header)
}

fn verify_standard_webhooks(
    secrets: &[StandardWebhooksSecret],
    tolerance: Duration,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<(), AuthError> {
    let id = credential_header(headers, &WEBHOOK_ID)?;
    let timestamp = credential_header(headers, &WEBHOOK_TIMESTAMP)?;
    let signatures = credential_header(headers, &WEBHOOK_SIGNATURE)?;
    // Cheap checks before any HMAC work on a possibly large body.
    check_timestamp(timestamp, tolerance, now)?;
    let signatures = v1_signatures(signatures)?;

    let mut ok = Choice::from(0);
    for secret in secrets {
        // Signed content: "{id}.{timestamp}.{body}", timestamp as sent.
        let parts = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body];
        let expected = hmac_sha256(secret.0.expose_secret(), &parts);
        for signature in &signatures {
            ok |= expected.ct_eq(signature);
        }
    }
    mismatch_unless(ok, &WEBHOOK_SIGNATURE)
}

/// Rejects a `webhook-timestamp` that is not unix seconds or is more than
/// `tolerance` away from `now`, in the past or the future.
fn check_timestamp(timestamp: &str, tolerance: Duration, now: SystemTime) -> Result<(), AuthError> {
    let malformed = || AuthError::Malformed {
        header: WEBHOOK_TIMESTAMP,
        problem: "not unix seconds",
    };
    // Digits only: `u64::from_str` would also take a leading `+`.
    if !timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let secs: u64 = timestamp.parse().map_err(|_| malformed())?;
    let out = |skew| Err(AuthError::TimestampOutOfTolerance { skew });
    let Some(sent) = UNIX_EPOCH.checked_add(Duration::from_secs(secs)) else {
        return out(Skew::Future);
    };
    match now.duration_since(sent) {
        Ok(age) if age > tolerance => out(Skew::Past),
        Err(ahead) if ahead.duration() > tolerance => out(Skew::Future),
        _ => Ok(()),
    }
}

/// The decoded `v1` signatures of a `webhook-signature` value: entries
/// `v1,<base64>` separated by spaces. Other versions (e.g. `v1a`, asymmetric)
/// are skipped; an error only if no usable `v1` signature is left.
fn v1_signatures(value: &str) -> Result<Vec<[u8; MAC_LEN]>, AuthError> {
    let mut signatures = Vec::new();
    let mut undecodable = false;
    for entry in value.split(' ').filter(|entry| !entry.is_empty()) {
        let Some(("v1", encoded)) = entry.split_once(',') else {
            continue;
        };
        let mut signature = [0u8; MAC_LEN];
        match BASE64.decode_slice(encoded, &mut signature) {
            Ok(MAC_LEN) => signatures.push(signature),
            _ => undecodable = true,
        }
    }
    if signatures.is_empty() {
        return Err(AuthError::Malformed {
            header: WEBHOOK_SIGNATURE,
            problem: if undecodable {
                "v1 signature is not base64 of 32 bytes"
            } else {
                "no v1 signature"
            },
        });
    }
    Ok(signatures)
}

/// The one value of a credential header, as non-empty UTF-8.
fn credential_header<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<&'h str, AuthError> {
    let malformed = |problem| AuthError::Malformed {
        header: name.clone(),
        problem,
    };
    let mut values = headers.get_all(name).iter();
    let value = values.next().ok_or_else(|| AuthError::Missing {
        header: name.clone(),
    })?;
    // Two copies would leave it open which one a proxy and this check read.
    if values.next().is_some() {
        return Err(malformed("given more than once"));
    }
    let value = std::str::from_utf8(value.as_bytes()).map_err(|_| malformed("not UTF-8"))?;
    if value.is_empty() {
        return Err(malformed("empty"));
    }
    Ok(value)
}

/// The non-empty credential after `scheme` in `Authorization`.
fn scheme_credential<'h>(
    headers: &'h HeaderMap,
    scheme: &'static str,
) -> Result<&'h str, AuthError> {
    let value = credential_header(headers, &AUTHORIZATION)?;
    let (presented_scheme, credential) = split_scheme(value);
    if !presented_scheme.eq_ignore_ascii_case(scheme) {
        return Err(AuthError::WrongScheme { expected: scheme });
    }
    if credential.is_empty() {
        return Err(AuthError::Malformed {
            header: AUTHORIZATION,
            problem: "no credential after the scheme",
        });
    }
    Ok(credential)
}

/// Splits `Scheme credential` (RFC 9110 §11.4); the credential is empty when
/// there is none.
fn split_scheme(value: &str) -> (&str, &str) {
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    (scheme, rest.trim_start_matches(' '))
}

/// Whether `presented` equals any of `secrets`, in constant time.
///
/// Both sides are hashed first, so every comparison is over 32 equal-length
/// bytes: timing shows neither a configured secret's length nor where a
/// guess went wrong. Every secret is compared; the results are OR-ed. An
/// empty presented value never matches, even an (invalid) empty secret.
fn matches_any<'s>(presented: &[u8], secrets: impl IntoIterator<Item = &'s [u8]>) -> Choice {
    matches_any_digest(
        presented,
        secrets.into_iter().map(|s| Sha256::digest(s).into()),
    )
}

/// [`matches_any`] against secrets already hashed.
fn matches_any_digest(presented: &[u8], digests: impl Iterator<Item = [u8; 32]>) -> Choice {
    let presented_digest = Sha256::digest(presented);
    let any = digests.fold(Choice::from(0), |any, secret| {
        any | secret.as_slice().ct_eq(presented_digest.as_slice())
    });
    any & Choice::from(u8::from(!presented.is_empty()))
}

fn mismatch_unless(ok: Choice, header: &HeaderName) -> Result<(), AuthError> {
    if bool::from(ok) {
        Ok(())
    } else {
        Err(AuthError::Mismatch {
            header: header.clone(),
        })
    }
}

fn secret_bytes(secret: &SecretString) -> &[u8] {
    secret.expose_secret().as_bytes()
}

/// HMAC-SHA256 over the concatenation of `parts`, without copying them.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests;
