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
