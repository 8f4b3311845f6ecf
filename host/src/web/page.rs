//! `GET /` for browsers: the chat page, one self-contained HTML file
//! (`host/assets/chat.html`, built into the binary) with its script and
//! styles inline and nothing fetched from elsewhere. The page talks only to
//! the host that served it: `GET /v1/models` for its backend picker,
//! `GET /v1/sessions` to resume a session, and a command-mode socket on
//! `/v1/ws`. Tools the user declares in the page go with its prompts as
//! `params.tools`; the user answers the model's calls in the page
//! (`tool_result`).
//!
//! A `GET /` that carries an `Upgrade` header is not this route's: it goes on
//! to the WebSocket upgrade of [`super::server`], as before. The page needs
//! no API key (it holds no secret); the user types one into it, and the page
//! sends it with each of its own requests.
//!
//! The page's `Content-Security-Policy` admits only its own script and style
//! (by their SHA-256), connections to the host that served it, and no
//! framing by other pages.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use warp::http::{header, HeaderMap, HeaderValue};
use warp::reply::{Reply, Response};
use warp::Filter;

/// The page.
pub const PAGE: &str = include_str!("../../assets/chat.html");

/// `GET /` without an `Upgrade` header: the page.
pub fn route() -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::get()
        .and(warp::path::end())
        .and(warp::header::headers_cloned())
        .and_then(|headers: HeaderMap| async move {
            if headers.contains_key(header::UPGRADE) {
                return Err(warp::reject::not_found());
            }
            Ok(page(&headers))
        })
}

/// The page with its headers, for a request with `headers`.
fn page(headers: &HeaderMap) -> Response {
    let mut response = warp::reply::html(PAGE).into_response();
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .filter(|host| is_host(host));
    let out = response.headers_mut();
    if let Ok(policy) = HeaderValue::from_str(&policy(host)) {
        out.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    out.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Revalidated on every load, so a new host serves its own page.
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The `Content-Security-Policy` of the page served as `host` (the request's
/// `Host`, when it is a plain host name or address with an optional port).
/// `'self'` in `connect-src` covers the page's `ws:`/`wss:` socket in
/// current browsers; older ones need the socket's origin named.
pub fn policy(host: Option<&str>) -> String {
    static HASHES: OnceLock<(String, String)> = OnceLock::new();
    let (script, style) = HASHES.get_or_init(|| (hash(inline("script")), hash(inline("style"))));
    let sockets = host
        .map(|host| format!(" ws://{host} wss://{host}"))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src '{script}'; style-src '{style}'; \
         connect-src 'self'{sockets}; img-src data:; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'"
    )
}

/// Whether `host` is only a host name or address and an optional port.
fn is_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// The text of the page's one `<tag>` element (empty if it has none, which
/// the tests rule out).
fn inline(tag: &str) -> &'static str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    PAGE.find(&open)
        .map(|at| &PAGE[at + open.len()..])
        .and_then(|rest| rest.find(&close).map(|end| &rest[..end]))
        .unwrap_or_default()
}

/// A CSP hash source: `sha256-` and the base64 of the text's SHA-256.
fn hash(text: &str) -> String {
    format!("sha256-{}", base64(&Sha256::digest(text.as_bytes())))
}

/// Standard base64, with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let at = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = at(0) << 16 | at(1) << 8 | at(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(group >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_the_standard_one() {
        for (bytes, encoded) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff], "+/8="),
        ] {
            assert_eq!(base64(bytes), encoded);
        }
        // The CSP hash of an empty script, as browsers compute it.
        assert_eq!(
            hash(""),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }

    #[test]
    fn the_policy_hashes_the_pages_one_script_and_one_style() {
        for tag in ["script", "style"] {
            assert_eq!(PAGE.matches(&format!("<{tag}")).count(), 1, "{tag}");
            assert!(inline(tag).len() > 100, "{tag}");
        }
        // Inline handlers would need 'unsafe-inline'; the script sets them.
        assert!(!PAGE.contains(" onclick=") && !PAGE.contains(" style="));
        let policy = policy(Some("127.0.0.1:3000"));
        assert!(policy.contains(&format!("script-src '{}'", hash(inline("script")))));
        assert!(policy.contains("connect-src 'self' ws://127.0.0.1:3000 wss://127.0.0.1:3000;"));
        assert!(!policy.contains("unsafe"));
    }

    #[test]
    fn only_plain_hosts_are_named_in_the_policy() {
        for good in [
            "127.0.0.1:3000",
            "localhost",
            "[::1]:8080",
            "chat.example.com",
        ] {
            assert!(is_host(good), "{good}");
        }
        for bad in ["", "a b", "a;script-src *", "a'", "a/b", "a,b"] {
            assert!(!is_host(bad), "{bad}");
        }
    }
}
