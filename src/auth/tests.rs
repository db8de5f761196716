//! Tests of the inbound auth modes: known answers (GitHub's HMAC example, the
//! Standard Webhooks test vector), rotation, malformed and missing headers,
//! timestamps, secrets never shown, and property tests against reference
//! signers written straight against the `hmac` crate.

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
