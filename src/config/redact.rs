//! Masks `${VAR}` values in text shown to people (SPEC §7.4): diagnostics,
//! `gateway render` output, and (as a last line of defence) every log line
//! `serve` writes (`telemetry::log_redact`). Every value a load read from the environment is a
//! secret until proven otherwise, wherever it landed (URL, header, body, auth).
//!
//! Masking is by value, as written and in the forms rendering can give it
//! (JSON-string escaped, percent-encoded), longest first so a value holding
//! another is masked whole. Values shorter than [`MIN_LEN`] are left alone:
//! masking `1` or `en` everywhere would garble the text, and they are no
//! secrets.

use std::collections::BTreeSet;

/// Environment values shorter than this are not masked.
pub const MIN_LEN: usize = 4;

/// The mask.
pub const MASK: &str = "***";

/// What to mask: the environment values of one load.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Every form of every value, longest first.
    needles: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} forms)", self.needles.len())
    }
}

impl Redactor {
    /// A redactor of `values` (the environment values a load read).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a String>) -> Self {
        let mut needles: Vec<String> = values
            .into_iter()
            .filter(|v| v.len() >= MIN_LEN)
            .flat_map(|v| {
                [
                    v.clone(),
                    crate::template::json_string_escape(v),
                    crate::template::url_segment_escape(v),
                ]
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        Redactor { needles }
    }

    /// True when there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// A redactor of both `self`'s values and `other`'s.
    pub fn merged(&self, other: &Redactor) -> Redactor {
        let mut needles: Vec<String> = self
            .needles
            .iter()
            .chain(&other.needles)
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        Redactor { needles }
    }

    /// True when `text` holds a value.
    pub fn finds_in(&self, text: &str) -> bool {
        self.needles.iter().any(|n| text.contains(n.as_str()))
    }

    /// `text` with every value masked as `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), MASK);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_masked_as_written_escaped_and_encoded() {
        let values = [
            "s3cr3t/key?x".to_string(),
            "quo\"te!".into(),
            "abc".into(),
            "s3cr3t".into(),
        ];
        let r = Redactor::new(&values);
        assert_eq!(r.redact("a=s3cr3t/key?x&b=s3cr3t"), "a=***&b=***");
        assert_eq!(r.redact("/x/s3cr3t%2Fkey%3Fx"), "/x/***");
        assert_eq!(r.redact(r#"{"k":"quo\"te!"}"#), r#"{"k":"***"}"#);
        // too short to be a secret
        assert_eq!(r.redact("abc"), "abc");
        assert!(!format!("{r:?}").contains("s3cr3t"));
        let more = r.merged(&Redactor::new(&["an0ther".to_string()]));
        assert_eq!(more.redact("s3cr3t an0ther"), "*** ***");
        assert!(more.finds_in("x an0ther") && !r.finds_in("x an0ther"));
        assert!(Redactor::default().is_empty() && !r.is_empty());
    }
}
