//! Which browser pages may use the host. A browser names the page's origin
//! in an `Origin` header on every cross-site request and on every WebSocket
//! upgrade; clients that are not browsers send none and are not affected.
//!
//! Without this, any web page the host's user visits could drive a host on
//! their machine (spend their provider credit, read their sessions), and
//! with DNS rebinding a page on a hostile name that resolves to 127.0.0.1
//! would even count as same-origin. So a request with an `Origin` is served
//! only when that origin is a page of this machine's loopback names
//! (`localhost`, `127.0.0.1`, `[::1]`, any port) or listed in
//! `server.allowed_origins` (`*` allows every origin, `null` the opaque
//! origin of files and sandboxed frames).

/// Whether a request whose `Origin` header is `origin` may be served.
pub fn allowed(origin: &str, listed: &[String]) -> bool {
    let origin = origin.trim();
    listed
        .iter()
        .any(|entry| entry == "*" || entry.eq_ignore_ascii_case(origin))
        || is_loopback_page(origin)
}

/// Whether `origin` is an `http` or `https` page of a loopback name.
pub fn is_loopback_page(origin: &str) -> bool {
    let Some((_, host, _)) = split(origin) else {
        return false;
    };
    host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1" || host == "[::1]"
}

/// Checks a `server.allowed_origins` entry: `*`, `null`, or
/// `scheme://host[:port]` with nothing after it.
pub fn check_entry(entry: &str) -> Result<(), &'static str> {
    if entry == "*" || entry == "null" {
        return Ok(());
    }
    match split(entry) {
        Some(_) => Ok(()),
        None => Err(
            "is not an origin like https://chat.example.com or http://localhost:8080 \
                     (scheme, host and port only), `null` or `*`",
        ),
    }
}

/// `scheme://host[:port]` into its parts; none when it is anything else.
fn split(origin: &str) -> Option<(&str, &str, Option<u16>)> {
    let (scheme, rest) = origin.split_once("://")?;
    if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains(['/', '?', '#', '@'])
    {
        return None;
    }
    let (host, port) = if let Some(after) = rest.strip_prefix('[') {
        let end = after.find(']')?;
        let host = &rest[..end + 2];
        match &rest[end + 2..] {
            "" => (host, None),
            port => (host, Some(port.strip_prefix(':')?.parse().ok()?)),
        }
    } else {
        match rest.split_once(':') {
            Some((host, port)) => (host, Some(port.parse().ok()?)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some((scheme, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_this_machine_are_allowed_and_others_are_not() {
        for origin in [
            "http://localhost:3000",
            "http://LOCALHOST",
            "https://127.0.0.1:8443",
            "http://[::1]:3000",
        ] {
            assert!(allowed(origin, &[]), "{origin}");
        }
        for origin in [
            "http://evil.example",
            "http://localhost.evil.example",
            "http://127.0.0.1.evil.example:3000",
            "null",
            "file://",
            "chrome-extension://abc",
            "",
        ] {
            assert!(!allowed(origin, &[]), "{origin}");
        }
    }

    #[test]
    fn listed_origins_and_the_wildcard_are_allowed() {
        let listed = vec!["https://chat.example.com".to_owned(), "null".to_owned()];
        assert!(allowed("https://chat.example.com", &listed));
        assert!(allowed("HTTPS://CHAT.EXAMPLE.COM", &listed));
        assert!(allowed("null", &listed));
        assert!(!allowed("https://chat.example.com:8443", &listed));
        assert!(!allowed("http://chat.example.com", &listed));
        assert!(allowed("http://anything.example", &["*".to_owned()]));
    }

    #[test]
    fn config_entries_are_checked() {
        for good in [
            "*",
            "null",
            "https://a.example",
            "http://localhost:8080",
            "http://[::1]:1",
        ] {
            assert!(check_entry(good).is_ok(), "{good}");
        }
        for bad in [
            "a.example",
            "https://a.example/",
            "https://a.example/path",
            "ftp://a.example",
            "https://",
            "https://a.example:port",
            "https://user@a.example",
        ] {
            assert!(check_entry(bad).is_err(), "{bad}");
        }
    }
}
