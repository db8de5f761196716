//! Diagnostics: one problem found in the configuration, where it is, and how
//! bad it is; plus the three output formats of `gateway validate`.
//!
//! Owns formatting only. A diagnostic never carries a secret: messages quote
//! what the author *wrote* (before `${VAR}` expansion), never expanded values.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// How bad a problem is. Errors make a configuration invalid; warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One problem. `line`/`col` are 1-based; 0 means "the whole file".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: u32,
    pub col: u32,
    /// Key path inside the file, e.g. `routes[0].breaker.failure_rate`; empty for file-level problems.
    pub path: String,
    pub severity: Severity,
    pub message: String,
}

impl Diagnostic {
    pub fn error(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.into(),
            line: 0,
            col: 0,
            path: String::new(),
            severity: Severity::Error,
            message: message.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `routes/crm.yaml:14:23: error: routes[0].breaker.failure_rate: must be …`
    pub fn to_text(&self, base: &Path) -> String {
        let mut s = display_path(&self.file, base);
        if self.line > 0 {
            let _ = write!(s, ":{}:{}", self.line, self.col);
        }
        let _ = write!(s, ": {}: ", self.severity.as_str());
        if !self.path.is_empty() {
            s.push_str(&self.path);
            s.push_str(": ");
        }
        s.push_str(&self.message);
        s
    }

    /// GitHub Actions workflow command, shown as an annotation on the pull request.
    pub fn to_github(&self, base: &Path) -> String {
        let mut props = format!("file={}", gh_escape_prop(&display_path(&self.file, base)));
        if self.line > 0 {
            let _ = write!(props, ",line={},col={}", self.line, self.col);
        }
        let msg = if self.path.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.path, self.message)
        };
        format!(
            "::{} {}::{}",
            self.severity.as_str(),
            props,
            gh_escape_data(&msg)
        )
    }
}

/// Output format of `gateway validate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Github,
}

/// Renders diagnostics in `format`, paths relative to `base` where possible.
pub fn render(diags: &[Diagnostic], format: Format, base: &Path) -> String {
    match format {
        Format::Text => {
            let mut out = String::new();
            for d in diags {
                out.push_str(&d.to_text(base));
                out.push('\n');
            }
            let errors = diags.iter().filter(|d| d.is_error()).count();
            let warnings = diags.len() - errors;
            let _ = writeln!(
                out,
                "{} error{}, {} warning{}",
                errors,
                plural(errors),
                warnings,
                plural(warnings)
            );
            out
        }
        Format::Github => diags.iter().map(|d| d.to_github(base) + "\n").collect(),
        Format::Json => {
            let rows: Vec<_> = diags
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "file": display_path(&d.file, base),
                        "line": d.line,
                        "column": d.col,
                        "path": d.path,
                        "severity": d.severity,
                        "message": d.message,
                    })
                })
                .collect();
            let mut s = serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into());
            s.push('\n');
            s
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The file path as the author knows it: relative to `base` (the working directory) when inside it.
pub fn display_path(file: &Path, base: &Path) -> String {
    let shown = file.strip_prefix(base).unwrap_or(file);
    shown.to_string_lossy().replace('\\', "/")
}

fn gh_escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn gh_escape_prop(s: &str) -> String {
    gh_escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// Sorts diagnostics by file, position and severity so output is stable.
pub fn sort(diags: &mut [Diagnostic]) {
    diags.sort_by(|a, b| {
        (&a.file, a.line, a.col, a.severity, &a.message)
            .cmp(&(&b.file, b.line, b.col, b.severity, &b.message))
    });
}

/// "did you mean `x`?" when some candidate is close to `wrong`.
pub fn did_you_mean<'a>(
    wrong: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(wrong, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Diagnostic {
        Diagnostic {
            file: "/w/routes/crm.yaml".into(),
            line: 14,
            col: 23,
            path: "routes[0].breaker.failure_rate".into(),
            severity: Severity::Error,
            message: "must be between 0 and 1, got 1.5".into(),
        }
    }

    #[test]
    fn text_format_matches_spec_example() {
        assert_eq!(
            d().to_text(Path::new("/w")),
            "routes/crm.yaml:14:23: error: routes[0].breaker.failure_rate: must be between 0 and 1, got 1.5"
        );
    }

    #[test]
    fn github_format_escapes() {
        let mut x = d();
        x.message = "a\nb, 100%".into();
        assert_eq!(
            x.to_github(Path::new("/w")),
            "::error file=routes/crm.yaml,line=14,col=23::routes[0].breaker.failure_rate: a%0Ab, 100%25"
        );
    }

    #[test]
    fn did_you_mean_picks_closest() {
        assert_eq!(
            did_you_mean("retyr", ["retry", "breaker", "body"]),
            Some("retry")
        );
        assert_eq!(did_you_mean("zzz", ["retry", "breaker"]), None);
    }
}
