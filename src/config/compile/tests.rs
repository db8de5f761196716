//! Unit tests of the compiler's pure helpers: positions, subset matching,
//! the template-vs-schema walk. Whole loads are tested by the fixtures in
//! `tests/fixtures/validate/`.

use super::examples::subset_mismatch;
use super::fields::{Provided, provides};
use super::position::{locate_in_scalar, pointer_to_path};
use crate::config::yaml::{self, Pos};

#[test]
fn template_position_in_block_scalar_includes_indentation() {
    let text = "routes:\n  - body: |\n      {\n        \"a\": \"{{{x}}}\"\n      }\n    body2: >-\n\n      {{y}}\n";
    let (_, index) = yaml::parse(text).unwrap();
    // `{{{x}}}` is at line 2, column 9 of the template; the block is indented by 6
    assert_eq!(
        locate_in_scalar(text, index.value("/routes/0/body"), 2, 9),
        Pos { line: 4, col: 15 }
    );
    // a leading blank line counts as template line 1
    assert_eq!(
        locate_in_scalar(text, index.value("/routes/0/body2"), 2, 1),
        Pos { line: 8, col: 7 }
    );
}

#[test]
fn pointer_display() {
    assert_eq!(
        pointer_to_path("/routes/0/breaker/failure_rate"),
        "routes[0].breaker.failure_rate"
    );
    assert_eq!(
        pointer_to_path("/bots/1/auth/api_key/keys/0"),
        "bots[1].auth.api_key.keys[0]"
    );
    assert_eq!(pointer_to_path(""), "");
}

#[test]
fn subset_matching() {
    let a = serde_json::json!({"a": 1, "b": {"c": [1, {"d": 2, "e": 3}]}, "x": "y"});
    assert!(subset_mismatch(&serde_json::json!({"b": {"c": [1, {"d": 2}]}}), &a, "").is_none());
    let d = subset_mismatch(&serde_json::json!({"b": {"c": [1, {"d": 5}]}}), &a, "").unwrap();
    assert_eq!(d.0, "/b/c/1/d");
    assert_eq!(
        subset_mismatch(&serde_json::json!({"z": 1}), &a, "")
            .unwrap()
            .2,
        "(missing)"
    );
}

#[test]
fn scalar_positions() {
    let text = "body: |\n  {\n    \"a\": \"{{x}}\"\n  }\nurl: \"https://h/{{y}}\"\nplain: a{{z}}\n";
    assert_eq!(
        locate_in_scalar(text, Pos { line: 1, col: 7 }, 2, 11),
        Pos { line: 3, col: 13 }
    );
    assert_eq!(
        locate_in_scalar(text, Pos { line: 5, col: 6 }, 1, 11),
        Pos { line: 5, col: 17 }
    );
    assert_eq!(
        locate_in_scalar(text, Pos { line: 6, col: 8 }, 1, 2),
        Pos { line: 6, col: 9 }
    );
}

/// A quoted scalar's escapes make the file text longer than the template text:
/// positions after them count the file's characters.
#[test]
fn positions_in_quoted_scalars_skip_escapes() {
    let text =
        "a: \"{\\\"a\\\": {{x}}}\"\nb: 'it''s {{x}}'\nc: \"\\u00e9\\x41{{x}}\"\nd: \"{{x}}\"\n";
    assert_eq!(text.lines().next(), Some(r#"a: "{\"a\": {{x}}}""#));
    // `{"a": {{x}}}`: `{{` is template column 7
    assert_eq!(
        locate_in_scalar(text, Pos { line: 1, col: 4 }, 1, 7),
        Pos { line: 1, col: 13 }
    );
    // `it's {{x}}`: column 6
    assert_eq!(
        locate_in_scalar(text, Pos { line: 2, col: 4 }, 1, 6),
        Pos { line: 2, col: 11 }
    );
    // `éA{{x}}`: column 3
    assert_eq!(
        locate_in_scalar(text, Pos { line: 3, col: 4 }, 1, 3),
        Pos { line: 3, col: 15 }
    );
    assert_eq!(
        locate_in_scalar(text, Pos { line: 4, col: 4 }, 1, 1),
        Pos { line: 4, col: 5 }
    );
}

#[test]
fn schema_field_check() {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "slots": {"type": "object", "properties": {"customerId": {"type": "array", "items": {"type": "object", "properties": {"keyphrase": {"type": "string"}}}}}},
            "data": {"type": "object"},
            "ctx": {"$ref": "#/$defs/ctx"}
        },
        "$defs": {"ctx": {"type": "object", "properties": {"policyNumber": {"type": "string"}}}}
    });
    let p = |s: &str| s.split('.').map(str::to_owned).collect::<Vec<_>>();
    assert!(matches!(
        provides(&schema, &schema, &p("slots.customerId.0.keyphrase"), 0),
        Provided::Yes
    ));
    assert!(matches!(
        provides(&schema, &schema, &p("data.anything.at.all"), 0),
        Provided::Yes
    ));
    assert!(matches!(
        provides(&schema, &schema, &p("ctx.policyNumber"), 0),
        Provided::Yes
    ));
    match provides(&schema, &schema, &p("slots.custmerId.0.keyphrase"), 0) {
        Provided::No(n) => assert_eq!(n.as_deref(), Some("slots.customerId")),
        Provided::Yes => panic!("should not be provided"),
    }
    match provides(&schema, &schema, &p("ctx.policyNumbr"), 0) {
        Provided::No(n) => assert_eq!(n.as_deref(), Some("ctx.policyNumber")),
        Provided::Yes => panic!("should not be provided"),
    }
}

/// SPEC §7.4 at load: a `${VAR}` value in `defaults.downstream.headers` is
/// secret (it is looked up where it was written), the URL is kept as written
/// for display, and a health probe carries credentials only to the
/// downstream's origin (another origin is a warning).
#[test]
fn environment_values_are_secret_wherever_written() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("defaults.yaml"),
        "defaults:\n  downstream:\n    headers: { X-Default-Key: \"${DK}\", X-Plain: plain }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("routes.yaml"),
        r#"bots:
  - id: b
    auth: { none: {} }
routes:
  - name: off-origin
    bot: b
    intent: "*"
    downstream:
      url: "https://crm.example.com/v1/${PK}/x?api_token=${QK}&id={{id}}"
      auth: { bearer: { token: "${BT}" } }
    breaker:
      health: { url: "https://status.example.com/health" }
  - name: same-origin
    bot: b
    intent: a
    downstream:
      url: "https://crm.example.com:443/v2"
      auth: { bearer: { token: "${BT}" } }
    breaker:
      health: { url: "https://crm.example.com/health?key=${QK}" }
"#,
    )
    .unwrap();
    let env = |k: &str| match k {
        "DK" => Some("default-header-secret".to_string()),
        "PK" => Some("path-secret".into()),
        "QK" => Some("query-secret".into()),
        "BT" => Some("bearer-secret".into()),
        _ => None,
    };
    let loaded = super::load(
        &[dir.path().to_path_buf()],
        &super::LoadOptions {
            env: &env,
            require_env: true,
            check_examples: false,
            cache: None,
        },
    );
    let config = loaded.config.expect("valid");
    let off = &config.routes["off-origin"];
    let header = |name: &str| {
        off.downstream
            .headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.secret)
            .unwrap()
    };
    assert!(
        header("x-default-key"),
        "a defaults header from the environment is secret"
    );
    assert!(!header("x-plain"));
    assert_eq!(
        off.downstream.url_shown,
        "https://crm.example.com/v1/${PK}/x?api_token=${QK}&id={{id}}"
    );
    assert!(!off.health.as_ref().unwrap().credentials);
    let same = &config.routes["same-origin"];
    assert_eq!(same.downstream.url_shown, "https://crm.example.com:443/v2");
    assert!(same.health.as_ref().unwrap().credentials);
    // (the lint warnings of this minimal file are not what this test is about)
    let warnings: Vec<String> = loaded
        .diagnostics
        .iter()
        .map(|d| d.to_text(dir.path()))
        .filter(|w| !w.contains("[lint:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("routes[0].breaker.health.url")
            && warnings[0].contains("without the route's credentials"),
        "{warnings:?}"
    );
    // the redactor masks every value in every form
    let shown = config
        .redactor
        .redact("/v1/path-secret/x?api_token=query-secret bearer-secret default-header-secret");
    assert_eq!(shown, "/v1/***/x?api_token=*** *** ***");
}

/// An `also` target compiles into an async route `<route>/<name>` that claims
/// no intent, takes what it does not set from its route, and keeps its own
/// breaker settings when it writes them.
#[test]
fn also_targets_are_async_routes_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.yaml"),
        r#"bots:
  - id: b
    auth: { api_key: { keys: ["${KEY}"] } }
routes:
  - name: r
    intent: Ended
    idempotency_key: "{{inputId}}"
    downstream: { url: "https://crm.example.com/c" }
    body: '{"a": 1}'
    breaker: { consecutive_failures: 7 }
    also:
      - name: desk
        downstream: { url: "https://desk.example.com/t", method: PUT }
      - name: stats
        downstream: { url: "https://stats.example.com/e" }
        body: '{"b": 2}'
        idempotency_key: "s-{{inputId}}"
        breaker: { consecutive_failures: 2 }
"#,
    )
    .unwrap();
    let loaded = super::load(
        &[dir.path().to_path_buf()],
        &super::LoadOptions {
            env: &|_| Some("k".into()),
            require_env: true,
            check_examples: true,
            cache: None,
        },
    );
    let config = loaded.config.expect("loads");
    let names: Vec<&str> = config.routes.keys().map(String::as_str).collect();
    assert_eq!(names, ["r", "r/desk", "r/stats"]);
    let bot = &config.bots["b"];
    assert_eq!(bot.routes.len(), 1, "targets claim no intent");
    let r = &config.routes["r"];
    assert_eq!(r.also.len(), 2);
    assert!(std::sync::Arc::ptr_eq(&r.also[0], &config.routes["r/desk"]));
    let desk = &config.routes["r/desk"];
    assert_eq!(desk.mode, crate::config::model::Mode::Async);
    assert_eq!(desk.also_of.as_deref(), Some("r"));
    assert_eq!(desk.bots, ["b"], "the route's bots (every bot here)");
    assert_eq!(desk.body.as_ref().unwrap().source(), r#"{"a": 1}"#);
    assert_eq!(
        desk.idempotency_key.as_ref().unwrap().source(),
        "{{inputId}}"
    );
    assert_eq!(desk.downstream.method, http::Method::PUT);
    assert_eq!(desk.breaker.settings().consecutive_failures, 7);
    let stats = &config.routes["r/stats"];
    assert_eq!(stats.body.as_ref().unwrap().source(), r#"{"b": 2}"#);
    assert_eq!(
        stats.idempotency_key.as_ref().unwrap().source(),
        "s-{{inputId}}"
    );
    assert_eq!(stats.breaker.settings().consecutive_failures, 2);
    assert_ne!(
        desk.downstream.fingerprint(),
        r.downstream.fingerprint(),
        "each target is stored for its own origin"
    );
}
