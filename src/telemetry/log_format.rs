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
        // printable ASCII but `"` and `\`: what `{:?}` writes, between quotes
        if value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            self.result = self
                .start_field(field.name())
                .and_then(|_| self.writer.write_char('"'))
                .and_then(|_| self.writer.write_str(value))
                .and_then(|_| self.writer.write_char('"'));
            return;
        }
        self.record_debug(field, &value)
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_err() {
            return;
        }
        if Self::special(field.name()) {
            return self.delegate(|v| v.record_u64(field, value));
        }
        self.record_number(field, value, false)
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_err() {
            return;
        }
        if Self::special(field.name()) {
            return self.delegate(|v| v.record_i64(field, value));
        }
        self.record_number(field, value.unsigned_abs(), value < 0)
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
        self.result = self
            .start_field(name)
            .and_then(|_| write!(self.writer, "{value:?}"));
    }
}

impl PlainVisitor<'_> {
    /// ` name=` (no space before the first field).
    fn start_field(&mut self, name: &str) -> fmt::Result {
        if !std::mem::replace(&mut self.is_empty, false) {
            self.writer.write_char(' ')?;
        }
        self.writer.write_str(name)?;
        self.writer.write_char('=')
    }

    /// `name=<digits>`, as `{:?}` writes an integer, without the formatting
    /// machinery (a field that is not special).
    fn record_number(&mut self, field: &Field, magnitude: u64, negative: bool) {
        let mut digits = [0u8; 21];
        let mut at = digits.len();
        let mut n = magnitude;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if negative {
            at -= 1;
            digits[at] = b'-';
        }
        let text = std::str::from_utf8(&digits[at..]).expect("ASCII digits");
        self.result = self
            .start_field(field.name())
            .and_then(|_| self.writer.write_str(text));
    }
}

/// `tracing_subscriber`'s default timestamp (RFC 3339, UTC, microseconds:
/// `2026-12-02T10:04:07.616978Z`), with the text up to the second formatted
/// once a second per thread instead of on every line (about a sixth of the
/// webhook line's cost, issue 18).
#[derive(Debug, Default, Clone, Copy)]
pub struct CachedSecondTime;

impl tracing_subscriber::fmt::time::FormatTime for CachedSecondTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        match write_time(std::time::SystemTime::now(), w) {
            Some(result) => result,
            // before 1970 or after 9999: as the default timer writes it
            None => tracing_subscriber::fmt::time::SystemTime.format_time(w),
        }
    }
}

/// Writes `t` as [`CachedSecondTime`] does; `None` (nothing written) outside
/// 1970–9999.
fn write_time(t: std::time::SystemTime, w: &mut impl fmt::Write) -> Option<fmt::Result> {
    use std::cell::RefCell;
    thread_local! {
        /// The whole second last written, and its text without the `Z`.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    const YEAR_10000: u64 = 253_402_300_800;
    let since = t.duration_since(std::time::UNIX_EPOCH).ok();
    let d = since.filter(|d| d.as_secs() < YEAR_10000)?;
    let result = SECOND.with(|cell| {
        let mut second = cell.borrow_mut();
        if second.0 != d.as_secs() {
            let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(d.as_secs());
            let mut text = humantime::format_rfc3339_seconds(whole).to_string();
            text.pop(); // the `Z`
            *second = (d.as_secs(), text);
        }
        w.write_str(&second.1)
    });
    let mut frac = *b".000000Z";
    let mut micros = d.subsec_micros();
    for at in (1..7).rev() {
        frac[at] = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    Some(result.and_then(|_| w.write_str(std::str::from_utf8(&frac).expect("ASCII digits"))))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn the_cached_timestamp_is_the_rfc3339_microsecond_one() {
        use std::time::{Duration, UNIX_EPOCH};
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut times = vec![
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::from_nanos(1_764_669_847_616_978_123),
            UNIX_EPOCH + Duration::from_nanos(1_764_669_847_999_999_999),
            UNIX_EPOCH + Duration::from_secs(1_764_669_848), // the next second, from the cache's
        ];
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            times.push(UNIX_EPOCH + Duration::from_nanos(seed % 4_000_000_000_000_000_000));
        }
        for t in times {
            let mut ours = String::new();
            write_time(t, &mut ours).unwrap().unwrap();
            assert_eq!(
                ours,
                humantime::format_rfc3339_micros(t).to_string(),
                "{t:?}"
            );
        }
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert!(
            write_time(before, &mut String::new()).is_none(),
            "left to the default timer"
        );
    }

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
            max = u64::MAX,
            min = i64::MIN,
            zero = 0u64,
            plain_str = "abc ~!@#$%^&*()_+{}|:<>?`-=[];',./",
            tick = "it's",
            tab = "a\tb",
            uni = "ü",
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
