//! The text log format's fields (`name=value …`), written as
//! `tracing_subscriber`'s `DefaultFields` writes them, for less work when the
//! output has no colours (files, pipes, journald: every server). Without
//! colours `DefaultFields` still wraps each field's name and `=` in an empty
//! ANSI style, about a third of the webhook line's cost (issue 18). With
//! colours, and for what it treats specially (`message`, `r#` names, errors),
//! it is `DefaultFields` itself that writes.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Writer};

/// `DefaultFields`, cheaper without colours (see the module docs).
#[derive(Debug, Default)]
pub struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut v = PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct PlainVisitor<'a> {
    writer: Writer<'a>,
    /// No field written yet (the next one needs no separating space).
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// `DefaultVisitor`'s own handling of one field, padded as it would pad it.
    fn delegate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut v);
        self.result = v.finish();
        self.is_empty = false;
    }

    fn special(name: &str) -> bool {
        name == "message" || name.starts_with("r#") || name.starts_with("log.")
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if Self::special(field.name()) {
            return self.delegate(|v| v.record_str(field, value));
        }
        self.record_debug(field, &value)
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        self.delegate(|v| v.record_error(field, value))
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if Self::special(name) {
            return self.delegate(|v| v.record_debug(field, value));
        }
        if self.is_empty {
            self.is_empty = false;
        } else if let Err(e) = self.writer.write_char(' ') {
            self.result = Err(e);
            return;
        }
        self.result = write!(self.writer, "{name}={value:?}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn events() {
        let err = Outer(std::io::Error::other("inner \u{1b}[31m"));
        let plain = std::io::Error::other("plain");
        tracing::info!(
            request_id = %"r-1",
            route = "bench-upsert",
            quoted = "a \"b\" \\ \n",
            status = 200u16,
            tries = 1u32,
            neg = -3i64,
            ok = true,
            latency_ms = 0.25f64,
            big = 1e21f64,
            list = ?vec!["x", "y"],
            r#type = "raw",
            error = &err as &(dyn std::error::Error + 'static),
            other = &plain as &(dyn std::error::Error + 'static),
            "webhook \u{1b}[1m {}", 5
        );
        tracing::warn!(route = "r", "breaker transition");
        tracing::info!("message only");
        tracing::info!(a = 1u8);
        tracing::info!(empty = "", "");
        let span = tracing::info_span!("outer", id = 7u64, name = "s p");
        let _g = span.enter();
        tracing::info!(inside = true, "in a span");
    }

    fn written<N>(fields: N, ansi: bool) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(ansi)
            .fmt_fields(fields)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn writes_what_default_fields_writes() {
        for ansi in [false, true] {
            let want = written(DefaultFields::new(), ansi);
            assert_eq!(written(PlainFields, ansi), want, "ansi: {ansi}");
        }
        let plain = written(PlainFields, false);
        assert!(plain.contains(" route=\"bench-upsert\" "), "{plain}");
        assert!(plain.contains("inside=true"), "{plain}");
    }
}
