//! Trace context: the W3C `traceparent` and `tracestate` a client sends
//! (<https://www.w3.org/TR/trace-context/>), new trace and span ids, and
//! which traces are sampled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

/// The longest `tracestate` kept (the W3C limit: 32 members of at most
/// 256 bytes each would be more; 512 is what it says a vendor may cut to).
const MAX_STATE: usize = 512;

/// A trace a client's request belongs to: the parent of the spans of its
/// turns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// The trace's id.
    pub trace_id: [u8; 16],
    /// The client's span.
    pub span_id: [u8; 8],
    /// Whether the client records this trace (flag `01`).
    pub sampled: bool,
    /// The `tracestate` that came with it, when it is well-formed.
    pub state: Option<Box<str>>,
}

impl Parent {
    /// The parent named by `traceparent` (with `tracestate`, the values of
    /// all its headers joined by `,`); none when `traceparent` is malformed:
    /// a version other than `00` without the `00` layout's fields first,
    /// version `ff`, upper-case hex, an all-zero trace or span id.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Parent> {
        let text = traceparent.trim_matches([' ', '\t']).as_bytes();
        if text.len() < 55 || [2, 35, 52].iter().any(|&at| text[at] != b'-') {
            return None;
        }
        let version = hex::<1>(&text[0..2])?;
        match version[0] {
            0xff => return None,
            0x00 if text.len() != 55 => return None,
            // A later version may append fields after a dash.
            _ if text.len() > 55 && text[55] != b'-' => return None,
            _ => {}
        }
        let trace_id = hex::<16>(&text[3..35])?;
        let span_id = hex::<8>(&text[36..52])?;
        let flags = hex::<1>(&text[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let state = tracestate
            .map(|state| state.trim_matches([' ', '\t', ',']))
            .filter(|state| {
                !state.is_empty()
                    && state.len() <= MAX_STATE
                    && state.bytes().all(|b| (0x20..0x7f).contains(&b))
            })
            .map(Box::from);
        Some(Parent {
            trace_id,
            span_id,
            sampled: flags[0] & 1 == 1,
            state,
        })
    }

    /// The parent a request's headers name, if any. More than one
    /// `traceparent` header is malformed; `tracestate` headers are joined.
    pub fn from_headers(headers: &hyper::HeaderMap) -> Option<Parent> {
        let mut parents = headers.get_all("traceparent").iter();
        let parent = parents.next()?.to_str().ok()?;
        if parents.next().is_some() {
            return None;
        }
        let mut states = headers
            .get_all("tracestate")
            .iter()
            .filter_map(|value| value.to_str().ok());
        match (states.next(), states.next()) {
            (first, None) => Parent::parse(parent, first),
            (Some(first), Some(second)) => {
                let mut joined = format!("{first},{second}");
                for more in states {
                    joined.push(',');
                    joined.push_str(more);
                }
                Parent::parse(parent, Some(&joined))
            }
            (None, Some(_)) => Parent::parse(parent, None),
        }
    }
}

/// `N` bytes from `2 * N` lower-case hex digits.
fn hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (i, pair) in text.chunks_exact(2).enumerate().take(N) {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// The SplitMix64 sequence's state: a random start, stepped once per id.
static STATE: LazyLock<AtomicU64> = LazyLock::new(|| {
    let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
    AtomicU64::new(high ^ low.rotate_left(17))
});

/// The next 64 random-looking bits. SplitMix64's mix is a bijection of its
/// state, which steps through all 2^64 values: no value repeats within a
/// process.
fn next() -> u64 {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut z = STATE
        .fetch_add(GOLDEN, Ordering::Relaxed)
        .wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A new span id (never all zeros).
pub fn span_id() -> [u8; 8] {
    loop {
        let id = next();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A new trace id (never all zeros).
pub fn trace_id() -> [u8; 16] {
    let mut id = [0; 16];
    id[..8].copy_from_slice(&next().to_be_bytes());
    id[8..].copy_from_slice(&span_id());
    id
}

/// Whether a new trace with this id is recorded at `ratio`: its last 8
/// bytes, as a number, fall in the first `ratio` of their range (as
/// OpenTelemetry's `TraceIdRatioBased` sampler decides, so that every host
/// with the same ratio keeps the same traces).
pub fn sampled(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let mut low = [0; 8];
    low.copy_from_slice(&trace_id[8..]);
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    (u64::from_be_bytes(low) >> 1) < bound
}

/// `bytes` as lower-case hex.
pub fn to_hex(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_is_read() {
        let parent =
            Parent::parse(GOOD, Some(" congo=t61rcWkgMzE,rojo=00f067aa0ba902b7 ")).expect("valid");
        let mut hex = String::new();
        to_hex(&parent.trace_id, &mut hex);
        assert_eq!(hex, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            parent.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(parent.sampled);
        assert_eq!(
            parent.state.as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        let unsampled = GOOD.replace("-01", "-00");
        assert!(!Parent::parse(&unsampled, None).expect("valid").sampled);
        // A later version may carry more fields.
        let later = GOOD.replacen("00-", "01-", 1) + "-more";
        assert!(Parent::parse(&later, None).is_some());
        // A state that is not printable ASCII is dropped, not the parent.
        let parent = Parent::parse(GOOD, Some("k=\u{7}")).expect("valid");
        assert_eq!(parent.state, None);
    }

    #[test]
    fn a_malformed_traceparent_is_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(Parent::parse(bad, None), None, "{bad}");
        }
        let mut headers = hyper::HeaderMap::new();
        headers.append("traceparent", GOOD.parse().expect("value"));
        headers.append("tracestate", "a=1".parse().expect("value"));
        headers.append("tracestate", "b=2".parse().expect("value"));
        let parent = Parent::from_headers(&headers).expect("one traceparent");
        assert_eq!(parent.state.as_deref(), Some("a=1,b=2"));
        headers.append("traceparent", GOOD.parse().expect("value"));
        assert_eq!(Parent::from_headers(&headers), None, "two traceparents");
    }

    #[test]
    fn ids_are_new_and_sampling_follows_the_ratio() {
        let ids: std::collections::HashSet<[u8; 8]> = (0..10_000).map(|_| span_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert_ne!(trace_id(), trace_id());
        let traces: Vec<[u8; 16]> = (0..10_000).map(|_| trace_id()).collect();
        assert!(traces.iter().all(|id| sampled(id, 1.0)));
        assert!(!traces.iter().any(|id| sampled(id, 0.0)));
        let quarter = traces.iter().filter(|id| sampled(id, 0.25)).count();
        assert!((2_000..3_000).contains(&quarter), "{quarter} of 10000");
    }
}
