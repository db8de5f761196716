//! Data-driven tests of `gateway validate`: every folder under
//! `tests/fixtures/validate/` is one kind of mistake, run with the real binary.
//!
//! A case folder holds:
//! - `routes/` (and `schemas/`, payload files, … as the case needs);
//! - `expected.txt`: exactly what `gateway validate routes` prints in the text
//!   format, run with the case folder as the working directory, so paths read
//!   `routes/x.yaml:LINE:COL: …`;
//! - `args` (optional): extra arguments, one per line (e.g. `--require-env`);
//! - `env` (optional): `KEY=VALUE` lines put into the environment, which is
//!   otherwise empty but for `PATH`;
//! - `exit` (optional): the expected exit code; by default 1 when
//!   `expected.txt` holds an ` error: ` line, else 0;
//! - `forbidden` (optional): strings, one per line, that must appear neither on
//!   stdout nor on stderr (secrets).
//!
//! Every position in `expected.txt` was checked by hand against its YAML: it
//! points at the offending value (or at the key, for unknown keys). After a
//! deliberate change of the output, rewrite the files with
//!
//! ```sh
//! UPDATE_EXPECT=1 cargo test --test it validate_fixtures
//! ```
//!
//! and review `git diff tests/fixtures` line by line before committing.

use std::fs;
use std::path::{Path, PathBuf};

use crate::support::gateway_cmd;

/// Fewer cases than this means the folder walk is broken, not that all is well.
const MIN_CASES: usize = 28;

#[test]
fn validate_fixtures() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/validate");
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= MIN_CASES,
        "found {} case folders under {}, expected at least {MIN_CASES}",
        cases.len(),
        root.display()
    );

    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| run_case(case, update).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} validate fixtures failed (UPDATE_EXPECT=1 rewrites expected.txt):\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Runs one case; `Err` describes every way it failed.
fn run_case(case: &Path, update: bool) -> Result<(), String> {
    let name = case.file_name().unwrap().to_string_lossy().into_owned();
    let args = lines(&case.join("args"));
    let env: Vec<(String, String)> = lines(&case.join("env"))
        .into_iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => panic!("{name}/env: expected KEY=VALUE, got {l:?}"),
        })
        .collect();

    let out = gateway_cmd()
        .arg("validate")
        .arg("routes")
        .args(&args)
        .current_dir(case)
        .envs(env)
        .output()
        .unwrap_or_else(|e| panic!("{name}: cannot run gateway: {e}"));
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code();

    let expected_path = case.join("expected.txt");
    let mut expected = fs::read_to_string(&expected_path).unwrap_or_default();
    if update && expected != stdout {
        fs::write(&expected_path, &stdout).expect("write expected.txt");
        expected = stdout.clone();
    }

    let mut problems = Vec::new();
    if stdout != expected {
        problems.push(format!(
            "stdout differs from expected.txt (- expected, + actual):\n{}",
            diff(&expected, &stdout)
        ));
    }
    let want_code = match fs::read_to_string(case.join("exit")) {
        Ok(s) => s.trim().parse().expect("`exit` holds a number"),
        Err(_) => i32::from(expected.contains(" error: ")),
    };
    if code != Some(want_code) {
        problems.push(format!("exit code {code:?}, expected {want_code}"));
    }
    if !stderr.is_empty() {
        problems.push(format!("unexpected stderr:\n{stderr}"));
    }
    for secret in lines(&case.join("forbidden")) {
        if stdout.contains(&secret) || stderr.contains(&secret) {
            problems.push(format!("the output shows the secret {secret:?}"));
        }
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("--- case `{name}`:\n{}\n", problems.join("\n")))
    }
}

/// Non-empty lines of an optional file; `#` starts a comment line.
fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// A line diff (longest common subsequence): ` ` same, `-` only expected, `+` only actual.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    // lcs[i][j]: length of the LCS of a[i..] and b[j..]
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out += &format!("  {}\n", a[i]);
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out += &format!("+ {}\n", b[j]);
            j += 1;
        } else {
            out += &format!("- {}\n", a[i]);
            i += 1;
        }
    }
    out
}
