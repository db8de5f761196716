//! Request-derived values in log lines (SPEC §7.1): cut to [`MAX_BYTES`] and
//! with control characters escaped, so no request can make a log line longer
//! than its cap or forge a second line.

use std::fmt;

/// The most bytes of one request-derived value that reach a log line.
pub const MAX_BYTES: usize = 128;

/// Displays a request-derived value bounded and escaped: control characters
/// (newlines included) and `\` as `\n`, `\r`, `\t`, `\\` or `\u{…}`; cut at
/// [`MAX_BYTES`] bytes of the original, at a character boundary, with `…`
/// marking the cut.
#[derive(Clone, Copy)]
pub struct Bounded<'a>(pub &'a str);

impl fmt::Display for Bounded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let mut end = s.len().min(MAX_BYTES);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let shown = &s[..end];
        // Nearly every value has nothing to escape: written whole.
        if !shown.chars().any(|c| c == '\\' || c.is_control()) {
            f.write_str(shown)?;
        } else {
            escaped(f, shown)?;
        }
        if end < s.len() {
            f.write_str("…")?;
        }
        Ok(())
    }
}

/// `s` with control characters and backslashes escaped.
fn escaped(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    for c in s.chars() {
        match c {
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            '\\' => f.write_str("\\\\")?,
            c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
            c => fmt::Write::write_char(f, c)?,
        }
    }
    Ok(())
}

impl fmt::Debug for Bounded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newlines_cannot_forge_a_line() {
        let s = Bounded("bot\n2026-12-02T00:00:00Z INFO forged").to_string();
        assert_eq!(s, "bot\\n2026-12-02T00:00:00Z INFO forged");
        assert_eq!(Bounded("a\u{1b}[31mb\\").to_string(), "a\\u{1b}[31mb\\\\");
    }

    #[test]
    fn long_values_are_cut_at_a_char_boundary() {
        let s = "é".repeat(100); // 200 bytes
        let out = Bounded(&s).to_string();
        assert_eq!(out, format!("{}…", "é".repeat(64)));
    }

    proptest! {
        #[test]
        fn never_a_raw_control_character_and_never_long(s in any::<String>()) {
            let out = Bounded(&s).to_string();
            prop_assert!(!out.chars().any(char::is_control));
            // at most MAX_BYTES of input, each char escaped to at most 10 bytes, plus the mark
            prop_assert!(out.len() <= MAX_BYTES * 10 + 3);
            prop_assert!(out.chars().filter(|c| !c.is_control()).count() <= MAX_BYTES * 10 + 1);
        }
    }
}
