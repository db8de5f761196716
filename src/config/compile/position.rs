//! Positions as diagnostics show them: a JSON pointer as a key path
//! (`routes[0].breaker.failure_rate`), and a line/col inside a template's text
//! as a line/col in its file (quoted, plain and block scalars).
//!
//! It never reads files: it works on the text and the span index it is given.

use crate::config::yaml::Pos;

/// `/routes/0/breaker/failure_rate` → `routes[0].breaker.failure_rate`.
pub fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

/// File position of line `tline`, column `tcol` of the text of the scalar at `value`.
pub(super) fn locate_in_scalar(text: &str, value: Pos, tline: usize, tcol: usize) -> Pos {
    let lines: Vec<&str> = text.lines().collect();
    let Some(first) = lines.get((value.line as usize).saturating_sub(1)) else {
        return value;
    };
    let rest: String = first
        .chars()
        .skip((value.col as usize).saturating_sub(1))
        .collect();
    let tline = tline.max(1) as u32;
    let tcol = tcol.max(1) as u32;
    if let Some(header) = block_scalar_header(&lines, value) {
        // every content line shares the first one's indentation
        return Pos {
            line: header + tline,
            col: value.col - 1 + tcol,
        };
    }
    match rest.chars().next() {
        Some('|' | '>') => {
            // block scalar: content starts on the next line, at its indentation
            let content_line = value.line + tline;
            let indent = lines
                .iter()
                .skip(value.line as usize)
                .find(|l| !l.trim().is_empty())
                .map(|l| l.len() - l.trim_start().len())
                .unwrap_or(0) as u32;
            Pos {
                line: content_line,
                col: indent + tcol,
            }
        }
        Some(quote @ ('"' | '\'')) if tline == 1 => Pos {
            line: value.line,
            col: value.col + 1 + quoted_width(&rest[quote.len_utf8()..], quote, tcol - 1),
        },
        _ if tline == 1 => Pos {
            line: value.line,
            col: value.col + tcol - 1,
        },
        _ => Pos {
            line: value.line + tline - 1,
            col: tcol,
        },
    }
}

/// How many characters of the file the first `n` characters of a quoted
/// scalar's value take, reading the file text `after` its opening `quote`:
/// an escape (`\"`, `\u00e9`) or a doubled `''` is one character of the value.
fn quoted_width(after: &str, quote: char, n: u32) -> u32 {
    let mut chars = after.chars();
    let mut width = 0;
    for _ in 0..n {
        match chars.next() {
            Some('\\') if quote == '"' => {
                let rest: u32 = match chars.next() {
                    Some('x') => 2,
                    Some('u') => 4,
                    Some('U') => 8,
                    _ => 0,
                };
                chars.by_ref().take(rest as usize).for_each(drop);
                width += 2 + rest;
            }
            Some('\'') if quote == '\'' => {
                chars.next();
                width += 2;
            }
            Some(_) => width += 1,
            None => break,
        }
    }
    width
}

/// serde-saphyr places a block scalar (`body: |`) at its first content line.
/// When `value` is such a line, the 1-based line number of the header above it
/// (template line 1 is the line after it).
fn block_scalar_header(lines: &[&str], value: Pos) -> Option<u32> {
    let at = (value.line as usize).checked_sub(1)?;
    let line = lines.get(at)?;
    let before: String = line
        .chars()
        .take((value.col as usize).saturating_sub(1))
        .collect();
    if !before.trim().is_empty() {
        return None;
    }
    // only blank lines may sit between the header and the first content line
    let (i, header) = lines[..at]
        .iter()
        .enumerate()
        .rev()
        .find(|(_, l)| !l.trim().is_empty())?;
    let code = header.split(" #").next().unwrap_or(header).trim_end();
    let indicator = code.rsplit([' ', '\t']).next()?;
    let mut chars = indicator.chars();
    (matches!(chars.next(), Some('|' | '>')) && chars.all(|c| matches!(c, '+' | '-' | '1'..='9')))
        .then_some(i as u32 + 1)
}
