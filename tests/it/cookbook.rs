//! The cookbook (issue 17): the recipes under `examples/recipes/` validate next
//! to the shipped `routes/` with every example matched; the route-file
//! reference names every key and value of the route-file schema; the docs
//! link only inside the repository; a form body gets a 415 naming the fix.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::{PAYLOAD_SCHEMA, TestDownstream, TestGateway, bot_file, gateway_cmd};
use cognigy_gateway::config::compile::{LoadOptions, load};

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The recipes every Cognigy customer asked for, one folder each.
const RECIPES: &[&str] = &[
    "dynamics365",
    "handover",
    "hubspot",
    "salesforce",
    "servicenow",
    "zendesk",
];

#[test]
fn recipes_validate_next_to_the_shipped_routes() {
    let out = gateway_cmd()
        .args(["validate", "examples/recipes", "routes"])
        .current_dir(crate_root())
        .output()
        .expect("run gateway");
    assert_eq!(
        (
            String::from_utf8_lossy(&out.stdout).as_ref(),
            out.status.code()
        ),
        ("0 errors, 0 warnings\n", Some(0)),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Each recipe folder holds one route file, a sample payload and a schema;
/// each of its routes has an example whose URL and body are matched, so
/// `validate` checks the request against the vendor's shape.
#[test]
fn every_recipe_has_a_matched_example() {
    let dir = crate_root().join("examples/recipes");
    let loaded = load(
        std::slice::from_ref(&dir),
        &LoadOptions {
            env: &|_| None,
            require_env: false,
            check_examples: true,
            cache: None,
        },
    );
    let config = loaded
        .config
        .unwrap_or_else(|| panic!("examples/recipes does not load: {:?}", loaded.diagnostics));
    for recipe in RECIPES {
        let folder = dir.join(recipe);
        let files: Vec<String> = fs::read_dir(&folder)
            .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let yaml: Vec<&String> = files.iter().filter(|f| f.ends_with(".yaml")).collect();
        assert_eq!(yaml.len(), 1, "{recipe}: one route file, got {files:?}");
        assert!(
            files.contains(&"payload.json".to_string()),
            "{recipe}: {files:?}"
        );
        assert!(
            files.iter().any(|f| f.ends_with(".schema.json")),
            "{recipe}: {files:?}"
        );
        let routes: Vec<_> = config
            .routes
            .values()
            .filter(|r| r.source.file.starts_with(&folder))
            .collect();
        assert!(!routes.is_empty(), "{recipe}: no route");
        for r in routes {
            assert!(
                r.idempotency_key.is_some(),
                "{}: every recipe writes, so every recipe has a key",
                r.name
            );
            let matched = r.examples.iter().any(|ex| {
                ex.expect
                    .as_ref()
                    .is_some_and(|e| e.url.is_some() && e.body.is_some() && e.error != Some(true))
            });
            assert!(
                matched,
                "{}: no example with an expected URL and body",
                r.name
            );
        }
    }
}

/// Every word inside backticks in `text`, split at anything that is not part
/// of a key or value name (`rate_limit.per_second` gives both).
fn quoted_words(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .flat_map(|span| {
            span.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every property name, and every string of an `enum`, in the schema.
fn schema_names(v: &Value, keys: &mut BTreeSet<String>, values: &mut BTreeSet<String>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::Object(props)) = map.get("properties") {
                keys.extend(props.keys().cloned());
            }
            if let Some(Value::Array(options)) = map.get("enum") {
                values.extend(options.iter().filter_map(Value::as_str).map(str::to_owned));
            }
            map.values().for_each(|x| schema_names(x, keys, values));
        }
        Value::Array(items) => items.iter().for_each(|x| schema_names(x, keys, values)),
        _ => {}
    }
}

/// docs/route-files.md names every key of `gateway schema` and every value
/// an enum allows (modes, methods, lint rules, …), quoted as code.
#[test]
fn route_file_reference_names_every_key_and_value() {
    let schema: Value = serde_json::from_str(
        &fs::read_to_string(crate_root().join("schemas/route-file.schema.json")).unwrap(),
    )
    .unwrap();
    let doc = fs::read_to_string(crate_root().join("docs/route-files.md")).unwrap();
    let quoted = quoted_words(&doc);
    let (mut keys, mut values) = (BTreeSet::new(), BTreeSet::new());
    schema_names(&schema, &mut keys, &mut values);
    assert!(keys.len() > 60, "the schema walk found only {keys:?}");
    assert!(values.contains("no-idempotency-key"), "{values:?}");
    let missing: Vec<&String> = keys
        .union(&values)
        .filter(|k| !quoted.contains(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/route-files.md does not name (in backticks): {missing:?}"
    );
}

/// Markdown files a reader of the repository follows.
fn docs() -> Vec<PathBuf> {
    let root = crate_root();
    let mut out = vec![
        root.join("README.md"),
        root.join("ARCHITECTURE.md"),
        root.join("examples/recipes/README.md"),
    ];
    for entry in fs::read_dir(root.join("docs")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "md") {
            out.push(p);
        }
    }
    out
}

/// README and docs point only at files inside the repository, and every
/// relative link resolves.
#[test]
fn docs_link_only_inside_the_repository() {
    let root = fs::canonicalize(crate_root()).unwrap();
    let mut problems = Vec::new();
    for doc in docs() {
        let text = fs::read_to_string(&doc).unwrap();
        let name = doc
            .strip_prefix(crate_root())
            .unwrap()
            .display()
            .to_string();
        if text.contains("../shared") {
            problems.push(format!("{name}: points to ../shared"));
        }
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.starts_with("http") || target.starts_with('#') {
                continue;
            }
            let path = target.split('#').next().unwrap_or_default();
            let resolved = doc.parent().unwrap().join(path);
            match fs::canonicalize(&resolved) {
                Ok(p) if p.starts_with(&root) => {}
                Ok(_) => problems.push(format!("{name}: `{target}` leaves the repository")),
                Err(_) => problems.push(format!("{name}: `{target}` does not exist")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Cognigy's HTTP Request node sends a form unless its payload type is JSON:
/// the answer is a 415 that says so, and nothing is sent downstream.
#[tokio::test]
async fn a_form_body_gets_415_naming_the_fix() {
    let ds = TestDownstream::start().await;
    let routes = format!(
        "routes:\n  - name: dflt\n    bot: b\n    intent: \"*\"\n    idempotency_key: \"{{{{sessionId}}}}\"\n    downstream: {{ url: \"{}/events\" }}\n",
        ds.url()
    );
    let gw = TestGateway::builder()
        .file("bots.yaml", &bot_file("b"))
        .file("schemas/payload.json", PAYLOAD_SCHEMA)
        .file("routes.yaml", &routes)
        .start()
        .await;
    for (content_type, body) in [
        (
            "application/x-www-form-urlencoded",
            "sessionId=s-1&intent=x",
        ),
        (
            "multipart/form-data; boundary=b1",
            "--b1\r\nContent-Disposition: form-data; name=\"sessionId\"\r\n\r\ns-1\r\n--b1--\r\n",
        ),
    ] {
        let resp = gw
            .client
            .post(gw.url("/webhooks/b"))
            .header("x-api-key", "test-key")
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 415, "{content_type}");
        let answer = crate::support::json(resp).await;
        let essence = content_type.split(';').next().unwrap();
        assert_eq!(answer["error"], "unsupported_media_type");
        assert_eq!(answer["content_type"], essence);
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains("set the HTTP Request node's payload type to JSON"),
            "{message}"
        );
    }
    // the same route takes JSON
    let (status, _, _) = gw.send("b", &json!({"sessionId": "s-2"})).await;
    assert_eq!(status, 200);
    assert_eq!(ds.requests().len(), 1, "only the JSON call went out");
    gw.stop().await;
}
