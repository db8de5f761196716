//! Fuzzing on stable Rust (SPEC §7, issue 14): property tests with arbitrary
//! inputs for everything a request or a route file can feed the gateway — the
//! YAML loader and compiler, the template renderer, the URL builder, the
//! inbound auth header parsers and the depth scan. Each asserts no panic and
//! the invariants (host and path prefix fixed; body keys and types unchanged
//! for every payload value).
//!
//! 256 cases per property in the suite; `PROPTEST_CASES=100000 cargo test
//! --test fuzz` for a long run.

use std::path::PathBuf;
use std::time::SystemTime;

use cognigy_gateway::config::compile::{LoadOptions, load};
use cognigy_gateway::config::model::Config;
use cognigy_gateway::config::render::build;
use cognigy_gateway::template::RenderMeta;
use handlebars::Context;
use proptest::prelude::*;
use serde_json::{Value, json};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn runner_config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Loads `files` from a fresh directory (no environment).
fn load_files(files: &[(&str, &str)]) -> (tempfile::TempDir, Option<Config>, usize) {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    let loaded = load(
        &[PathBuf::from(d.path())],
        &LoadOptions {
            env: &|_| None,
            require_env: false,
            check_examples: true,
            cache: None,
        },
    );
    (d, loaded.config, loaded.diagnostics.len())
}

const ROUTES: &str = r#"bots:
  - id: b
    auth: { api_key: { keys: ["k"] } }
routes:
  - name: r
    bot: b
    intent: "*"
    downstream:
      url: "https://crm.example.com/api/v2/contacts/{{id}}?q={{q}}"
    body: '{"a": "{{x}}", "b": {{json y}}, "n": {{json data.n}}, "s": "{{default w "d"}}"}'
"#;

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn the_loader_and_compiler_never_panic_on_arbitrary_files() {
    let mut runner = proptest::test_runner::TestRunner::new(runner_config());
    // arbitrary text, and a valid file with arbitrary text put at a value position
    let text = prop_oneof![
        any::<String>(),
        (any::<String>(), 0..ROUTES.len()).prop_map(|(s, at)| {
            let mut at = at;
            while !ROUTES.is_char_boundary(at) {
                at -= 1;
            }
            format!("{}{}{}", &ROUTES[..at], s, &ROUTES[at..])
        }),
        "[a-z_ :{}\\[\\]\"'0-9.${}\\-\\n]{0,300}".prop_map(String::from),
    ];
    runner
        .run(&text, |t| {
            let (_d, config, diagnostics) = load_files(&[("r.yaml", &t)]);
            // either a configuration, or at least one diagnostic saying why not
            prop_assert!(config.is_some() || diagnostics > 0);
            Ok(())
        })
        .unwrap();
}

#[test]
fn rendered_requests_keep_their_host_path_and_body_shape() {
    let (_d, config, _) = load_files(&[("r.yaml", ROUTES)]);
    let config = config.expect("the route file is valid");
    let route = config.routes["r"].clone();
    let mut runner = proptest::test_runner::TestRunner::new(runner_config());
    let input = (
        any::<String>(),
        any::<String>(),
        any::<String>(),
        json_value(),
        json_value(),
        prop::option::of(any::<String>()),
    );
    runner
        .run(&input, |(id, q, x, y, n, w)| {
            let mut payload = json!({"id": id, "q": q, "x": x, "y": y, "data": {"n": n}});
            if let Some(w) = &w {
                payload["w"] = json!(w);
            }
            let ctx = Context::from(payload);
            let mut meta = RenderMeta::new("b", "r");
            meta.now = SystemTime::UNIX_EPOCH;
            let Ok(req) = build(&route, &ctx, &meta) else {
                // refused (an empty or dot-segment path value): nothing is sent
                let climbs = id.split(['/', '\\']).any(|p| p == "." || p == "..");
                prop_assert!(id.is_empty() || climbs, "refused {id:?}");
                return Ok(());
            };
            // the host and the path prefix come from the file
            prop_assert_eq!(req.target.scheme(), "https");
            prop_assert_eq!(req.target.host_str(), Some("crm.example.com"));
            prop_assert_eq!(req.target.port(), None);
            let path = req.target.path();
            prop_assert!(path.starts_with("/api/v2/contacts/"), "{path}");
            // the value is exactly one path segment, decoding to itself
            let seg = &path["/api/v2/contacts/".len()..];
            prop_assert!(!seg.contains('/'), "{path}");
            let decoded = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
            prop_assert_eq!(decoded.as_ref(), id.as_str());
            // exactly one query parameter, decoding to the value
            let pairs: Vec<_> = req.target.query_pairs().collect();
            prop_assert_eq!(pairs.len(), 1);
            prop_assert_eq!(pairs[0].0.as_ref(), "q");
            prop_assert_eq!(pairs[0].1.as_ref(), q.as_str());
            // the body keeps its keys and their types
            let body: Value = serde_json::from_str(req.body.as_deref().unwrap()).unwrap();
            let obj = body.as_object().unwrap();
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            prop_assert_eq!(keys, vec!["a", "b", "n", "s"]);
            prop_assert_eq!(&obj["a"], &json!(x));
            prop_assert_eq!(&obj["b"], &y);
            prop_assert_eq!(&obj["n"], &n);
            // `default` takes the fallback for a missing or empty value
            let s = w.as_deref().filter(|w| !w.is_empty()).unwrap_or("d");
            prop_assert_eq!(&obj["s"], &json!(s));
            Ok(())
        })
        .unwrap();
}

#[test]
fn auth_header_parsers_never_panic_and_refuse_what_is_not_the_secret() {
    let files = r#"bots:
  - id: key
    auth: { api_key: { header: Authorization, keys: ["secret-key"] } }
  - id: bearer
    auth: { bearer: { tokens: ["secret-token"] } }
  - id: basic
    auth: { basic: { username: u, password: "secret-pass" } }
  - id: hmac
    auth: { hmac: { secrets: ["secret-hmac"], header: X-Sig } }
  - id: sw
    auth: { standard_webhooks: { secrets: ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] } }
"#;
    let (_d, config, _) = load_files(&[("b.yaml", files)]);
    let config = config.expect("the bots are valid");
    let mut runner = proptest::test_runner::TestRunner::new(runner_config());
    let header_value = prop_oneof![
        any::<Vec<u8>>(),
        "(Bearer|Basic|ApiKey|bearer|basic) [ -~]{0,80}".prop_map(String::into_bytes),
        "(v1,|sha256=)[A-Za-z0-9+/=]{0,90}".prop_map(String::into_bytes),
    ];
    let headers = prop::collection::vec(
        (
            prop_oneof![
                Just("authorization"),
                Just("x-sig"),
                Just("webhook-id"),
                Just("webhook-timestamp"),
                Just("webhook-signature"),
            ],
            header_value,
        ),
        0..6,
    );
    runner
        .run(&(headers, any::<Vec<u8>>()), |(hs, body)| {
            let mut map = http::HeaderMap::new();
            for (k, v) in hs {
                if let Ok(v) = http::HeaderValue::from_bytes(&v) {
                    map.append(k, v);
                }
            }
            for bot in config.bots.values() {
                let ok = cognigy_gateway::auth::verify(&bot.auth, &map, &body, SystemTime::now())
                    .is_ok();
                // random bytes never carry a secret
                prop_assert!(!ok, "bot {} accepted {map:?}", bot.id);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_depth_scan_agrees_with_the_parser_and_never_panics() {
    let mut runner = proptest::test_runner::TestRunner::new(runner_config());
    let bytes = prop_oneof![
        any::<Vec<u8>>(),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        "[\\[\\]{}\"\\\\:,a0 ]{0,200}".prop_map(String::into_bytes),
    ];
    runner
        .run(&bytes, |b| {
            let limit = 8;
            let scan = cognigy_gateway::payload::check_depth(&b, limit);
            if let Ok(v) = serde_json::from_slice::<Value>(&b) {
                // valid JSON: the scan refuses exactly what nests deeper than the limit
                prop_assert_eq!(scan.is_ok(), depth(&v) <= limit, "{}", v);
            }
            Ok(())
        })
        .unwrap();
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}
