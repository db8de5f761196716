//! W3C Trace Context (`traceparent`, `tracestate`) for downstream calls
//! (SPEC §8): the trace of the inbound request when it carries a valid
//! `traceparent`, else a new one; every downstream try is a new span of it
//! (a new parent id in the `traceparent` it sends).
//!
//! Pure: parsing and formatting, with randomness from `rand`'s thread RNG.
//! Never logs (the webhook log line carries the trace id).

use http::HeaderValue;

pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
pub const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");
pub const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Longest `tracestate` passed on (the W3C limit is 512 characters).
const MAX_TRACESTATE: usize = 512;

/// The trace a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// `trace-flags` (bit 0: sampled).
    pub flags: u8,
    /// The inbound `tracestate`, passed on unchanged when the trace came with one.
    pub state: Option<HeaderValue>,
}

impl TraceContext {
    /// The inbound trace when `traceparent` is valid, else a new (sampled) one.
    pub fn from_headers(headers: &http::HeaderMap) -> TraceContext {
        let parsed = headers
            .get(TRACEPARENT)
            .and_then(|v| parse_traceparent(v.as_bytes()));
        match parsed {
            Some((trace_id, _, flags)) => TraceContext {
                trace_id,
                flags,
                state: headers
                    .get(TRACESTATE)
                    .filter(|v| !v.is_empty() && v.len() <= MAX_TRACESTATE)
                    .cloned(),
            },
            None => TraceContext::start(),
        }
    }

    /// A new trace, marked sampled.
    pub fn start() -> TraceContext {
        TraceContext {
            trace_id: random_nonzero(),
            flags: 1,
            state: None,
        }
    }

    /// The trace id as 32 lower-case hex digits (what the log line shows).
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// A `traceparent` for a new span of this trace.
    pub fn traceparent(&self) -> HeaderValue {
        format_traceparent(&self.trace_id, &random_nonzero(), self.flags)
    }
}

/// `traceparent` for one downstream try: the same trace and flags as `sent`
/// (a `traceparent` the request already carries), with a new span id; a new
/// trace when `sent` is not a valid `traceparent`.
pub fn next_span(sent: Option<&HeaderValue>) -> HeaderValue {
    match sent.and_then(|v| parse_traceparent(v.as_bytes())) {
        Some((trace_id, _, flags)) => format_traceparent(&trace_id, &random_nonzero(), flags),
        None => TraceContext::start().traceparent(),
    }
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`. Version 00 is read
/// strictly; a higher version is read by its first four fields, as the
/// specification asks. All-zero ids and version `ff` are invalid.
pub fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if v.len() < 55 {
        return None;
    }
    let version = hex_byte(&v[0..2])?;
    if version == 0xff
        || (version == 0 && v.len() != 55)
        || (version > 0 && v.len() > 55 && v[55] != b'-')
    {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
    }
    let mut parent = [0u8; 8];
    for (i, b) in parent.iter_mut().enumerate() {
        *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags))
}

/// Two lower-case hex digits (upper case is invalid in trace context).
fn hex_byte(s: &[u8]) -> Option<u8> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(d(s[0])? << 4 | d(s[1])?)
}

fn format_traceparent(trace_id: &[u8; 16], span: &[u8; 8], flags: u8) -> HeaderValue {
    // into a fixed buffer: `format!` with `hex::encode` cost ~3,000 instructions a call
    let mut s = *b"00-################################-################-##";
    let hex = |bytes: &[u8], out: &mut [u8]| {
        hex::encode_to_slice(bytes, out).expect("two digits per byte");
    };
    hex(trace_id, &mut s[3..35]);
    hex(span, &mut s[36..52]);
    hex(&[flags], &mut s[53..55]);
    HeaderValue::from_bytes(&s).expect("hex digits and dashes make a header value")
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let b: [u8; N] = rand::random();
        if b != [0; N] {
            return b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read() {
        let (t, p, f) = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(hex::encode(t), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(p), "00f067aa0ba902b7");
        assert_eq!(f, 1);
        // a later version may add fields after a dash
        let v2 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra";
        assert!(parse_traceparent(v2.as_bytes()).is_some());
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_inbound_trace_is_kept_and_each_span_is_new() {
        let mut h = http::HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let t = TraceContext::from_headers(&h);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.state.as_ref().unwrap(), "vendor=x");
        let a = t.traceparent();
        let b = next_span(Some(&a));
        let (ta, pa, fa) = parse_traceparent(a.as_bytes()).unwrap();
        let (tb, pb, fb) = parse_traceparent(b.as_bytes()).unwrap();
        assert_eq!((ta, fa), (t.trace_id, 1));
        assert_eq!((tb, fb), (t.trace_id, 1));
        assert_ne!(pa, pb, "a new span id per try");
        assert_ne!(hex::encode(pa), "00f067aa0ba902b7");
        assert_eq!(
            format_traceparent(
                &t.trace_id,
                &[0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
                1
            ),
            VALID
        );
    }

    #[test]
    fn without_a_valid_traceparent_a_trace_is_started() {
        let mut h = http::HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let t = TraceContext::from_headers(&h);
        assert_eq!(t.flags, 1);
        assert!(
            t.state.is_none(),
            "tracestate only travels with its traceparent"
        );
        assert_ne!(
            t,
            TraceContext::from_headers(&h),
            "each start is a new trace"
        );
        let fresh = next_span(None);
        assert!(parse_traceparent(fresh.as_bytes()).is_some());
    }
}
