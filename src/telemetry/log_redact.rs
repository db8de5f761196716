//! The last line of defence for SPEC §7.4 in logs: `serve`'s log writer masks
//! every `${VAR}` value of the configurations it has applied, in every line,
//! whoever wrote it (our events, or a dependency's debug output). Log
//! statements still never pass secrets on purpose; this catches what slips
//! through (an OAuth2 `client_id`, a URL a library prints).
//!
//! The values are process-wide (the environment is the process's): each
//! applied configuration adds its own ([`remember`]); none are forgotten, so a
//! line from a request still on an older generation is masked too.

use std::io::Write;
use std::sync::{Arc, LazyLock, Mutex};

use arc_swap::ArcSwap;

use crate::config::redact::Redactor;

static VALUES: LazyLock<ArcSwap<Redactor>> =
    LazyLock::new(|| ArcSwap::from_pointee(Redactor::default()));

/// Serialises [`remember`]'s read-merge-store.
static MERGE: Mutex<()> = Mutex::new(());

/// Every remembered `${VAR}` value, for masking elsewhere than logs (the
/// request a stored delivery keeps: the values of older generations too).
pub fn remembered() -> Arc<Redactor> {
    VALUES.load_full()
}

/// Masks `r`'s values in every later log line.
pub fn remember(r: &Redactor) {
    if r.is_empty() {
        return;
    }
    let _guard = MERGE.lock().unwrap_or_else(|e| e.into_inner());
    let now = VALUES.load_full();
    VALUES.store(Arc::new(now.merged(r)));
}

/// A writer that masks every remembered value in what it writes: the inner
/// writer of `serve`'s non-blocking log thread, which receives one formatted
/// event per write, so the masking runs on that thread, off the request path.
pub struct Masking<W>(pub W);

impl<W: Write> Write for Masking<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&mask(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `bytes` with every remembered value masked (unchanged when none is in it).
fn mask(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let values = VALUES.load();
    if values.is_empty() {
        return bytes.into();
    }
    let text = String::from_utf8_lossy(bytes);
    if !values.finds_in(&text) {
        return bytes.into();
    }
    values.redact(&text).into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_values_are_masked_in_lines() {
        remember(&Redactor::new(&["client-1d-zz9".to_string()]));
        remember(&Redactor::new(&["t0ken-url-qq7".to_string()]));
        let line = br#"{"client_id":"client-1d-zz9","token_url":"http://h/t0ken-url-qq7"}"#;
        assert_eq!(
            &*mask(line),
            br#"{"client_id":"***","token_url":"http://h/***"}"#
        );
        assert_eq!(&*mask(b"nothing here\n"), b"nothing here\n");
    }
}
