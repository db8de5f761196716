//! The command line as CI and operators use it: the real `gateway` binary on
//! the shipped example deployment (`routes/`, `schemas/`, `examples/`) and on
//! validate fixtures, with an environment emptied but for `PATH`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::gateway_cmd;

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(case: &str) -> PathBuf {
    crate_root().join("tests/fixtures/validate").join(case)
}

/// Runs `gateway args…` in `cwd` with only `PATH` (and `env`) in the environment.
fn gateway_with_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    gateway_cmd()
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .output()
        .expect("run gateway")
}

fn gateway(cwd: &Path, args: &[&str]) -> Output {
    gateway_with_env(cwd, args, &[])
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn shipped_example_is_valid_without_any_environment() {
    let out = gateway(crate_root(), &["validate", "routes/"]);
    assert_eq!(
        stdout(&out),
        "0 errors, 0 warnings\n",
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn exit_codes() {
    let valid = gateway(crate_root(), &["validate", "routes/"]);
    assert_eq!(valid.status.code(), Some(0), "valid configuration");

    let invalid = gateway(&fixture("unknown-key"), &["validate", "routes"]);
    assert_eq!(invalid.status.code(), Some(1), "invalid configuration");

    let missing = gateway(crate_root(), &["validate", "no/such/routes"]);
    assert_eq!(missing.status.code(), Some(2), "path that does not exist");
    assert!(
        stderr(&missing).contains("no/such/routes"),
        "{}",
        stderr(&missing)
    );
    assert!(stdout(&missing).is_empty(), "{}", stdout(&missing));

    let flag = gateway(crate_root(), &["validate", "--no-such-flag", "routes/"]);
    assert_eq!(flag.status.code(), Some(2), "unknown flag");
    assert!(
        stderr(&flag).contains("--no-such-flag"),
        "{}",
        stderr(&flag)
    );
}

/// The three formats of one invalid case say the same things: each JSON
/// object, printed as text or as a GitHub annotation, is a line of the other formats.
#[test]
fn text_github_and_json_formats_agree() {
    let case = fixture("several-problems-in-one-file");
    let text = gateway(&case, &["validate", "routes"]);
    let github = gateway(&case, &["validate", "routes", "--format", "github"]);
    let json = gateway(&case, &["validate", "routes", "--format", "json"]);
    for out in [&text, &github, &json] {
        assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(out));
    }

    // text: what the fixture expects
    let expected = fs::read_to_string(case.join("expected.txt")).unwrap();
    assert_eq!(stdout(&text), expected);
    assert!(expected.contains(
        "routes/crm.yaml:15:21: error: routes[0].breaker.failure_rate: must be between 0 and 1, got 1.5\n"
    ));

    // json: an array of objects with exactly these fields
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&json)).expect("JSON array");
    assert_eq!(rows.len(), 16);
    let fields = ["column", "file", "line", "message", "path", "severity"];
    for row in &rows {
        let mut keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort();
        assert_eq!(keys, fields, "{row}");
    }
    let rate = rows
        .iter()
        .find(|r| r["path"] == "routes[0].breaker.failure_rate")
        .expect("the failure_rate diagnostic");
    assert_eq!(
        rate,
        &serde_json::json!({
            "file": "routes/crm.yaml",
            "line": 15,
            "column": 21,
            "path": "routes[0].breaker.failure_rate",
            "severity": "error",
            "message": "must be between 0 and 1, got 1.5",
        })
    );
    let warnings = rows.iter().filter(|r| r["severity"] == "warning").count();
    // two of its own, three lint warnings (none-auth, no-idempotency-key)
    assert_eq!(warnings, 5);

    // the same rows, as text and as GitHub annotations
    let mut as_text = String::new();
    let mut as_github = String::new();
    for r in &rows {
        let (file, line, col) = (r["file"].as_str().unwrap(), &r["line"], &r["column"]);
        let (sev, path) = (r["severity"].as_str().unwrap(), r["path"].as_str().unwrap());
        let msg = r["message"].as_str().unwrap();
        as_text += &format!("{file}:{line}:{col}: {sev}: {path}: {msg}\n");
        as_github += &format!("::{sev} file={file},line={line},col={col}::{path}: {msg}\n");
    }
    assert_eq!(as_text + "11 errors, 5 warnings\n", expected);
    assert_eq!(stdout(&github), as_github);
    assert!(stdout(&github).contains(
        "::error file=routes/crm.yaml,line=15,col=21::routes[0].breaker.failure_rate: must be between 0 and 1, got 1.5\n"
    ));
}

#[test]
fn github_format_keeps_multi_line_messages_on_one_line() {
    let out = gateway(
        &fixture("failing-example"),
        &["validate", "routes", "--format", "github"],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    // every diagnostic (the fixture's lint warnings too) is one annotation line
    assert!(text.lines().all(|l| l.starts_with("::")), "{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("::error")).collect();
    assert_eq!(
        errors,
        [
            "::error file=routes/crm.yaml,line=23,col=21::routes[0].examples[0].expect.body.status: \
         example `profile update`: body differs at `/status`%0A  expected: \"silver\"%0A    actual: \"gold\""
        ]
    );
}

#[test]
fn committed_route_file_schema_is_current() {
    let out = gateway(crate_root(), &["schema"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let committed = fs::read(crate_root().join("schemas/route-file.schema.json")).unwrap();
    assert!(
        out.stdout == committed,
        "schemas/route-file.schema.json is stale; regenerate it with \
         `cargo run -- schema > schemas/route-file.schema.json` and commit it"
    );
}

#[test]
fn every_route_file_points_editors_at_the_schema() {
    let schema = fs::canonicalize(crate_root().join("schemas/route-file.schema.json")).unwrap();
    let mut files = Vec::new();
    route_files(&crate_root().join("routes"), &mut files);
    assert!(files.len() >= 3, "found only {files:?}");
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let first = text.lines().next().unwrap_or_default();
        let rel = first
            .strip_prefix("# yaml-language-server: $schema=")
            .unwrap_or_else(|| {
                panic!(
                    "{}: the first line must be `# yaml-language-server: $schema=<relative path>`, got {first:?}",
                    file.display()
                )
            });
        let target = file.parent().unwrap().join(rel.trim());
        assert_eq!(
            fs::canonicalize(&target).ok().as_ref(),
            Some(&schema),
            "{}: `{rel}` does not resolve to schemas/route-file.schema.json",
            file.display()
        );
    }
}

fn route_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            route_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

#[test]
fn render_prints_the_request_with_secrets_masked() {
    let out = gateway_with_env(
        crate_root(),
        &[
            "render",
            "--route",
            "crm-contact-upsert",
            "--payload",
            "examples/payloads/update-profile.json",
        ],
        &[("CRM_CLIENT_SECRET", "s3cr3t-from-the-environment")],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("PUT http://127.0.0.1:8081/api/v2/contacts/C-1001")
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("authorization: Bearer ***")),
        "{text}"
    );
    for secret in ["s3cr3t-from-the-environment", "change-me-crm-secret"] {
        assert!(!text.contains(secret), "shows {secret}:\n{text}");
    }
    let (_, body) = text
        .split_once("\n\n")
        .expect("a blank line before the body");
    let body: serde_json::Value = serde_json::from_str(body).expect("the body is JSON");
    assert_eq!(body["external_id"], "C-1001");
}

#[test]
fn render_of_an_unknown_route_suggests_the_closest_name() {
    let out = gateway(
        crate_root(),
        &[
            "render",
            "--route",
            "crm-contact-upsrt",
            "--payload",
            "examples/payloads/update-profile.json",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("did you mean `crm-contact-upsert`?"),
        "{}",
        stderr(&out)
    );
}
