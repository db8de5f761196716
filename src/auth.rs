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
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    /// The Standard Webhooks test vector (standard-webhooks reference libraries).
    const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SW_TIMESTAMP: u64 = 1_614_265_330;
    const SW_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SW_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    /// GitHub's documented `X-Hub-Signature-256` example.
    const GH_SECRET: &str = "It's a Secret to Everybody";
    const GH_BODY: &[u8] = b"Hello, World!";
    const GH_SIGNATURE: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn secrets(values: &[&str]) -> Vec<SecretString> {
        values.iter().map(|&v| SecretString::from(v)).collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for &(name, value) in pairs {
            map.append(
                HeaderName::try_from(name).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn check(auth: &InboundAuth, pairs: &[(&str, &str)]) -> Result<(), AuthError> {
        verify(auth, &headers(pairs), b"{}", at(0))
    }

    fn reason(result: Result<(), AuthError>) -> &'static str {
        match result {
            Ok(()) => "ok",
            Err(e) => e.reason(),
        }
    }

    // Reference signers, written straight against the `hmac` crate.

    fn reference_hex(secret: &[u8], body: &[u8]) -> String {
        let mac = Hmac::<Sha256>::new_from_slice(secret)
            .unwrap()
            .chain_update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    fn reference_v1(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
        let mac = Hmac::<Sha256>::new_from_slice(secret)
            .unwrap()
            .chain_update(format!("{id}.{timestamp}."))
            .chain_update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }

    fn api_key(header: &str, keys: &[&str]) -> InboundAuth {
        InboundAuth::ApiKey {
            header: HeaderName::try_from(header).unwrap(),
            keys: secrets(keys).into(),
        }
    }

    /// Sends each value in `header` and checks the outcome's reason tag.
    fn assert_cases(auth: &InboundAuth, header: &str, cases: &[(&str, &str)]) {
        for &(value, expected) in cases {
            let got = reason(check(auth, &[(header, value)]));
            assert_eq!(got, expected, "{header}: {value:?}");
        }
    }

    #[test]
    fn api_key_header() {
        let auth = api_key("X-API-Key", &["k-old", "k-new"]);
        assert_cases(
            &auth,
            "x-api-key",
            &[
                ("k-old", "ok"),
                ("k-new", "ok"), // rotated: the second key matches
                ("k-other", "mismatch"),
                ("k-ol", "mismatch"),
                ("k-old ", "mismatch"),
                ("", "malformed"),
                // The `ApiKey` scheme form belongs to the Authorization header only.
                ("ApiKey k-old", "mismatch"),
            ],
        );
        assert_cases(&auth, "authorization", &[("k-old", "missing")]);
        let twice = [("x-api-key", "k-old"), ("x-api-key", "k-old")];
        assert_eq!(reason(check(&auth, &twice)), "malformed");
    }

    #[test]
    fn api_key_in_authorization_accepts_the_cognigy_apikey_scheme() {
        let auth = api_key("Authorization", &["k1", "k2"]);
        assert_cases(
            &auth,
            "authorization",
            &[
                ("k1", "ok"),
                ("ApiKey k2", "ok"),
                ("apikey  k1", "ok"),
                ("Bearer k1", "mismatch"),
                ("ApiKey k3", "mismatch"),
                ("ApiKey", "mismatch"),
            ],
        );
    }

    #[test]
    fn empty_configured_key_never_matches() {
        // The route compiler refuses empty keys; this is the fallback.
        let auth = api_key("authorization", &[""]);
        assert_cases(&auth, "authorization", &[("ApiKey ", "mismatch")]);
    }

    #[test]
    fn non_utf8_header_is_malformed() {
        let auth = api_key("x-api-key", &["k"]);
        let mut map = HeaderMap::new();
        map.insert("x-api-key", HeaderValue::from_bytes(b"k\xff").unwrap());
        let err = verify(&auth, &map, b"", at(0)).unwrap_err();
        assert_eq!(err.reason(), "malformed");
    }

    #[test]
    fn bearer() {
        let auth = InboundAuth::Bearer {
            tokens: secrets(&["t-one", "t-two"]).into(),
        };
        assert_cases(
            &auth,
            "authorization",
            &[
                ("Bearer t-one", "ok"),
                ("bearer t-two", "ok"), // rotated, scheme in any case
                ("BEARER t-two", "ok"),
                ("Bearer t-three", "mismatch"),
                ("t-one", "wrong_scheme"),
                ("Basic t-one", "wrong_scheme"),
                ("Bearer", "malformed"),
            ],
        );
        assert_cases(&auth, "x-api-key", &[("t-one", "missing")]);
    }

    #[test]
    fn basic() {
        let auth = InboundAuth::Basic {
            username: "cognigy".into(),
            password: "pa:ss".into(),
        };
        let basic = |creds: &str| format!("Basic {}", BASE64.encode(creds));
        let good = basic("cognigy:pa:ss");
        let lower = good.replace("Basic", "basic");
        let bearer = good.replace("Basic", "Bearer");
        assert_cases(
            &auth,
            "authorization",
            &[
                (&good, "ok"),
                (&lower, "ok"),
                (good.trim_end_matches('='), "ok"),
                (&basic("cognigy:pa"), "mismatch"),
                (&basic("cognigy:pa:ss:"), "mismatch"),
                (&basic("other:pa:ss"), "mismatch"),
                (&basic(":pa:ss"), "mismatch"),
                (&basic("cognigy:"), "mismatch"),
                (&basic("cognigy"), "malformed"),
                ("Basic !!!", "malformed"),
                ("Basic", "malformed"),
                (&bearer, "wrong_scheme"),
            ],
        );
        assert_cases(&auth, "x-api-key", &[(&good, "missing")]);
    }

    fn hmac_auth(values: &[&str]) -> InboundAuth {
        InboundAuth::Hmac {
            header: HeaderName::from_static("x-hub-signature-256"),
            secrets: secrets(values),
        }
    }

    fn check_hmac(auth: &InboundAuth, signature: &str, body: &[u8]) -> &'static str {
        let map = headers(&[("x-hub-signature-256", signature)]);
        reason(verify(auth, &map, body, at(0)))
    }

    /// Sends each signature in `x-hub-signature-256` with `body`.
    fn assert_hmac_cases(auth: &InboundAuth, body: &[u8], cases: &[(&str, &str)]) {
        for &(signature, expected) in cases {
            assert_eq!(check_hmac(auth, signature, body), expected, "{signature:?}");
        }
    }

    #[test]
    fn hmac_github_known_answer() {
        assert_eq!(reference_hex(GH_SECRET.as_bytes(), GH_BODY), GH_SIGNATURE);
        let auth = hmac_auth(&[GH_SECRET]);
        let bare = GH_SIGNATURE.strip_prefix("sha256=").unwrap();
        let cases: &[(&str, &str)] = &[
            (GH_SIGNATURE, "ok"),
            (bare, "ok"),
            (&bare.to_uppercase(), "ok"),
            (&GH_SIGNATURE.to_uppercase(), "ok"),
        ];
        assert_hmac_cases(&auth, GH_BODY, cases);
        assert_hmac_cases(&auth, b"Hello, World?", &[(GH_SIGNATURE, "mismatch")]);
    }

    #[test]
    fn hmac_rotation_and_failures() {
        let rotated = hmac_auth(&["old", GH_SECRET]);
        assert_hmac_cases(&rotated, GH_BODY, &[(GH_SIGNATURE, "ok")]);
        let rotating = hmac_auth(&[GH_SECRET, "new"]);
        assert_hmac_cases(&rotating, GH_BODY, &[(GH_SIGNATURE, "ok")]);
        let other = hmac_auth(&["old", "new"]);
        assert_hmac_cases(&other, GH_BODY, &[(GH_SIGNATURE, "mismatch")]);

        let auth = hmac_auth(&[GH_SECRET]);
        let bare = GH_SIGNATURE.strip_prefix("sha256=").unwrap();
        let cases: &[(&str, &str)] = &[
            (&bare[..63], "malformed"), // truncated
            (&bare[..62], "malformed"),
            (&format!("{bare}00"), "malformed"),
            (&bare.replace('7', "g"), "malformed"),
            ("sha256=", "malformed"),
            (&format!("sha1={bare}"), "malformed"),
            ("", "malformed"),
            (&"0".repeat(64), "mismatch"),
        ];
        assert_hmac_cases(&auth, GH_BODY, cases);
        let map = headers(&[("x-cognigy-signature", GH_SIGNATURE)]);
        assert_eq!(reason(verify(&auth, &map, GH_BODY, at(0))), "missing");
    }

    fn sw_auth(values: &[&str]) -> InboundAuth {
        InboundAuth::StandardWebhooks {
            secrets: values
                .iter()
                .map(|s| StandardWebhooksSecret::parse(s).unwrap())
                .collect(),
            tolerance: Duration::from_secs(300),
        }
    }

    /// A Standard Webhooks request: `(id, timestamp, signature)` headers.
    fn sw_headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
        headers(&[
            ("webhook-id", id),
            ("webhook-timestamp", timestamp),
            ("webhook-signature", signature),
        ])
    }

    /// Checks `(signature, expected)` cases on the test vector's id, timestamp and body.
    fn assert_sw_signatures(auth: &InboundAuth, cases: &[(&str, &str)]) {
        let timestamp = SW_TIMESTAMP.to_string();
        for &(signature, expected) in cases {
            let map = sw_headers(SW_ID, &timestamp, signature);
            let got = reason(verify(auth, &map, SW_BODY, at(SW_TIMESTAMP)));
            assert_eq!(got, expected, "{signature:?}");
        }
    }

    #[test]
    fn standard_webhooks_known_answer() {
        let key = StandardWebhooksSecret::parse(SW_SECRET).unwrap();
        let computed = reference_v1(key.0.expose_secret(), SW_ID, SW_TIMESTAMP, SW_BODY);
        assert_eq!(computed, SW_SIGNATURE);

        assert_sw_signatures(&sw_auth(&[SW_SECRET]), &[(SW_SIGNATURE, "ok")]);
        // The bare base64 form of the secret works as well.
        let bare = sw_auth(&[SW_SECRET.strip_prefix("whsec_").unwrap()]);
        assert_sw_signatures(&bare, &[(SW_SIGNATURE, "ok")]);
    }

    #[test]
    fn standard_webhooks_signature_covers_id_timestamp_and_body() {
        let auth = sw_auth(&[SW_SECRET]);
        let now = at(SW_TIMESTAMP);
        let ts = SW_TIMESTAMP.to_string();
        let next_ts = (SW_TIMESTAMP + 1).to_string();
        let other_id = sw_headers("msg_other", &ts, SW_SIGNATURE);
        let other_ts = sw_headers(SW_ID, &next_ts, SW_SIGNATURE);
        let same = sw_headers(SW_ID, &ts, SW_SIGNATURE);
        assert_eq!(reason(verify(&auth, &other_id, SW_BODY, now)), "mismatch");
        assert_eq!(reason(verify(&auth, &other_ts, SW_BODY, now)), "mismatch");
        assert_eq!(reason(verify(&auth, &same, b"{}", now)), "mismatch");
    }

    #[test]
    fn standard_webhooks_rotation_and_signature_lists() {
        let other = "whsec_c2VjcmV0LW51bWJlci10d28=";
        assert_sw_signatures(&sw_auth(&[other, SW_SECRET]), &[(SW_SIGNATURE, "ok")]);
        assert_sw_signatures(&sw_auth(&[SW_SECRET, other]), &[(SW_SIGNATURE, "ok")]);
        assert_sw_signatures(&sw_auth(&[other]), &[(SW_SIGNATURE, "mismatch")]);

        let wrong = format!("v1,{}", BASE64.encode([7u8; 32]));
        let mac = &SW_SIGNATURE[3..];
        let cases: &[(&str, &str)] = &[
            // Several signatures, only the last one matching.
            (&format!("{wrong} {wrong}  {SW_SIGNATURE}"), "ok"),
            (&format!("{SW_SIGNATURE} {wrong}"), "ok"),
            // Unknown versions are skipped...
            (&format!("v1a,AAAA v2,{mac} {SW_SIGNATURE}"), "ok"),
            // ...even when they hold the right MAC.
            (&format!("v2,{mac}"), "malformed"),
            // One undecodable v1 entry does not spoil a good one.
            (&format!("v1,!!! {SW_SIGNATURE}"), "ok"),
            (&wrong, "mismatch"),
        ];
        assert_sw_signatures(&sw_auth(&[SW_SECRET]), cases);
    }

    #[test]
    fn standard_webhooks_malformed_signatures() {
        let truncated = &SW_SIGNATURE[..SW_SIGNATURE.len() - 4];
        let too_long = format!("{}AAAA", &SW_SIGNATURE[..SW_SIGNATURE.len() - 1]);
        let cases: &[(&str, &str)] = &[
            ("", "malformed"),
            (" ", "malformed"),
            ("v1,", "malformed"),
            ("v1", "malformed"),
            ("v1,!!!!", "malformed"),
            (truncated, "malformed"),
            (&too_long, "malformed"),
            (&SW_SIGNATURE[3..], "malformed"), // no version
        ];
        assert_sw_signatures(&sw_auth(&[SW_SECRET]), cases);
    }

    #[test]
    fn standard_webhooks_timestamps() {
        let auth = sw_auth(&[SW_SECRET]);
        let ts = SW_TIMESTAMP.to_string();
        let outcome = |timestamp: &str, now| {
            let map = sw_headers(SW_ID, timestamp, SW_SIGNATURE);
            verify(&auth, &map, SW_BODY, now)
        };
        let past = Err(AuthError::TimestampOutOfTolerance { skew: Skew::Past });
        let future = Err(AuthError::TimestampOutOfTolerance { skew: Skew::Future });
        let ms = Duration::from_millis(1);
        // Inside the window, up to and including its edges.
        assert_eq!(outcome(&ts, at(SW_TIMESTAMP + 300)), Ok(()));
        assert_eq!(outcome(&ts, at(SW_TIMESTAMP - 300)), Ok(()));
        assert_eq!(outcome(&ts, at(SW_TIMESTAMP + 301)), past);
        assert_eq!(outcome(&ts, at(SW_TIMESTAMP + 300) + ms), past);
        assert_eq!(outcome(&ts, at(SW_TIMESTAMP - 301)), future);
        assert_eq!(outcome(&ts, at(SW_TIMESTAMP - 300) - ms), future);
        assert_eq!(outcome(&ts, at(0)), future);
        // Past the end of `SystemTime`.
        assert_eq!(outcome(&u64::MAX.to_string(), at(SW_TIMESTAMP)), future);

        let now = at(SW_TIMESTAMP);
        for bad in ["", "+1614265330", "-1614265330", "1614265330.0", "1e9"] {
            assert_eq!(reason(outcome(bad, now)), "malformed", "{bad:?}");
        }
        assert_eq!(reason(outcome("99999999999999999999", now)), "malformed");
    }

    #[test]
    fn standard_webhooks_missing_headers() {
        let auth = sw_auth(&[SW_SECRET]);
        let ts = SW_TIMESTAMP.to_string();
        let all = [
            ("webhook-id", SW_ID),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", SW_SIGNATURE),
        ];
        for skip in 0..all.len() {
            let some: Vec<_> = (0..all.len())
                .filter(|&i| i != skip)
                .map(|i| all[i])
                .collect();
            let err = verify(&auth, &headers(&some), SW_BODY, at(SW_TIMESTAMP)).unwrap_err();
            assert_eq!(
                err,
                AuthError::Missing {
                    header: HeaderName::from_static(all[skip].0)
                }
            );
        }
    }

    #[test]
    fn standard_webhooks_secret_parsing() {
        assert!(StandardWebhooksSecret::parse(SW_SECRET).is_ok());
        assert!(StandardWebhooksSecret::parse("c2VjcmV0").is_ok());
        assert!(StandardWebhooksSecret::parse("whsec_c2VjcmV0MQ").is_ok()); // unpadded
        let leaky = "whsec_not*base64-but-secret";
        let err = StandardWebhooksSecret::parse(leaky).unwrap_err();
        assert_eq!(err, SecretFormatError::NotBase64);
        assert!(
            err.to_string()
                .contains("must be whsec_ followed by base64")
        );
        assert!(!err.to_string().contains("but-secret"));
        assert_eq!(
            StandardWebhooksSecret::parse("whsec_").unwrap_err(),
            SecretFormatError::Empty
        );
        assert_eq!(
            StandardWebhooksSecret::parse("").unwrap_err(),
            SecretFormatError::Empty
        );
        let debug = format!("{:?}", StandardWebhooksSecret::parse(SW_SECRET).unwrap());
        assert_eq!(debug, "StandardWebhooksSecret(***)");
    }

    #[test]
    fn none_accepts_anything() {
        assert_eq!(reason(check(&InboundAuth::None, &[])), "ok");
        assert_eq!(
            reason(check(&InboundAuth::None, &[("authorization", "x")])),
            "ok"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let configured = [
            "sekret-apikey",
            "sekret-bearer",
            "sekret-basic-pw",
            "sekret-hmac",
        ];
        let sw_key = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let auths = [
            api_key("authorization", &[configured[0]]),
            InboundAuth::Bearer {
                tokens: secrets(&[configured[1]]).into(),
            },
            InboundAuth::Basic {
                username: "user".into(),
                password: configured[2].into(),
            },
            hmac_auth(&[configured[3]]),
            sw_auth(&[SW_SECRET]),
        ];
        let debug = format!("{auths:?}");
        for secret in configured.iter().chain([&sw_key]) {
            assert!(!debug.contains(secret), "{debug}");
        }

        // Present near-misses and wrong-mode credentials to every mode and
        // collect the errors.
        let presented = [
            "presented-XYZ",
            "Bearer presented-XYZ",
            "ApiKey presented-XYZ",
        ];
        let basic = format!("Basic {}", BASE64.encode("user:presented-XYZ"));
        let mut errors = Vec::new();
        for auth in &auths {
            for value in presented.iter().copied().chain([basic.as_str()]) {
                let map = headers(&[
                    ("authorization", value),
                    ("x-hub-signature-256", value),
                    ("webhook-id", value),
                    ("webhook-timestamp", "1614265330"),
                    ("webhook-signature", value),
                ]);
                errors.extend(verify(auth, &map, b"body", at(SW_TIMESTAMP)).err());
            }
            errors.extend(verify(auth, &HeaderMap::new(), b"", at(0)).err());
        }
        assert!(errors.len() >= 20, "{errors:?}");
        for error in &errors {
            let text = format!("{error} {error:?}");
            for secret in configured.iter().chain([&sw_key, &"presented-XYZ"]) {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }

    proptest! {
        #[test]
        fn hmac_reference_signature_verifies_and_any_flip_fails(
            secret in "[ -~]{1,64}",
            body in proptest::collection::vec(any::<u8>(), 1..512),
            flip in any::<prop::sample::Index>(),
            mask in 1u8..,
        ) {
            let auth = hmac_auth(&["unrelated", &secret]);
            let signature = reference_hex(secret.as_bytes(), &body);
            prop_assert_eq!(check_hmac(&auth, &signature, &body), "ok");
            let mut tampered = body.clone();
            tampered[flip.index(body.len())] ^= mask;
            prop_assert_eq!(check_hmac(&auth, &signature, &tampered), "mismatch");
        }

        #[test]
        fn standard_webhooks_reference_signature_verifies_and_any_flip_fails(
            secret in proptest::collection::vec(any::<u8>(), 1..64),
            id in "[a-zA-Z0-9_]{1,32}",
            timestamp in 0u64..4_000_000_000,
            body in proptest::collection::vec(any::<u8>(), 1..512),
            flip in any::<prop::sample::Index>(),
            mask in 1u8..,
        ) {
            let auth = InboundAuth::StandardWebhooks {
                secrets: vec![
                    StandardWebhooksSecret::parse("whsec_dW5yZWxhdGVk").unwrap(),
                    StandardWebhooksSecret::parse(&format!("whsec_{}", BASE64.encode(&secret))).unwrap(),
                ],
                tolerance: Duration::from_secs(300),
            };
            let map = headers(&[
                ("webhook-id", &id),
                ("webhook-timestamp", &timestamp.to_string()),
                ("webhook-signature", &reference_v1(&secret, &id, timestamp, &body)),
            ]);
            prop_assert_eq!(verify(&auth, &map, &body, at(timestamp)), Ok(()));
            let mut tampered = body.clone();
            tampered[flip.index(body.len())] ^= mask;
            prop_assert_eq!(
                verify(&auth, &map, &tampered, at(timestamp)),
                Err(AuthError::Mismatch { header: WEBHOOK_SIGNATURE })
            );
        }
    }
}
