//! Provider failures as model errors: a stable code from
//! [`codes`](llm_host_plugin_api::codes), the provider's own words, and
//! whether a retry may help.

use std::io;
use std::time::Duration;

use llm_host_plugin_api::codes;
use serde_json::Value;

/// Longest stretch of a provider's error text kept in a message.
const MAX_DETAIL_CHARS: usize = 600;

/// A failed request or stream, ready to become the turn's error event.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderError {
    /// A stable code (see [`codes`](llm_host_plugin_api::codes)).
    pub code: &'static str,
    /// What happened, in the provider's own words where it gave any.
    pub message: String,
    /// Whether trying again may succeed (429, 5xx, no connection).
    pub retryable: bool,
    /// How long the provider asked to wait before trying again.
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    /// An error that a retry will not mend.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retryable: false,
            retry_after: None,
        }
    }

    /// The same error, marked as worth a retry.
    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    /// The provider answered something that is not its documented format.
    pub fn bad_response(message: impl Into<String>) -> Self {
        Self::new(codes::BAD_RESPONSE, message)
    }

    /// The stream stopped before its end.
    pub fn interrupted(message: impl Into<String>) -> Self {
        Self::new(codes::INTERRUPTED, message)
    }

    /// A reply that could not be parsed as the provider's JSON.
    pub fn malformed(provider: &str, err: &serde_json::Error, data: &str) -> Self {
        Self::bad_response(format!(
            "{provider} sent a malformed stream event ({err}): {}",
            clip(data)
        ))
    }
}

/// The stable code for an HTTP status the provider answered with.
pub fn code_for_status(status: u16) -> &'static str {
    match status {
        401 | 403 => codes::AUTH,
        404 => codes::NOT_FOUND,
        408 => codes::TIMEOUT,
        429 => codes::RATE_LIMITED,
        500..=599 => codes::UPSTREAM,
        400..=499 => codes::INVALID_REQUEST,
        _ => codes::BAD_RESPONSE,
    }
}

/// The stable code for an error `type` or `code` string of a provider's
/// error object (OpenAI's `error.type`/`error.code`, Anthropic's
/// `error.type`), when it names a known class.
pub fn code_for_error_type(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "authentication_error" | "permission_error" | "invalid_api_key" | "permission_denied" => {
            codes::AUTH
        }
        "not_found_error" | "model_not_found" | "not_found" => codes::NOT_FOUND,
        "rate_limit_error"
        | "rate_limit_exceeded"
        | "insufficient_quota"
        | "tokens"
        | "requests" => codes::RATE_LIMITED,
        "overloaded_error" | "api_error" | "server_error" | "service_unavailable" => {
            codes::UPSTREAM
        }
        "invalid_request_error" | "request_too_large" | "invalid_request" => codes::INVALID_REQUEST,
        "timeout_error" | "timeout" => codes::TIMEOUT,
        _ => return None,
    })
}

/// The error of a response with a non-2xx `status` and its `body`, in the
/// words the provider put in its JSON error (`error.message`, `error`,
/// `message`, `detail`), or the body's text.
pub fn from_status(
    provider: &str,
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> ProviderError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let detail = json
        .as_ref()
        .and_then(error_message)
        .unwrap_or_else(|| clip(String::from_utf8_lossy(body).trim()));
    let detail = if detail.is_empty() {
        canonical_reason(status).to_owned()
    } else {
        detail
    };
    let kind = json.as_ref().map(error_kinds).unwrap_or_default();
    let mut code = code_for_status(status);
    if matches!(status, 400 | 422) && is_unknown_model(&kind, &detail) {
        code = codes::NOT_FOUND;
    }
    let message = format!("{provider} answered HTTP {status}: {detail}");
    let mut error = ProviderError::new(code, message);
    // Retrying does not mend an exhausted quota, though it comes as a 429.
    let out_of_quota = kind.iter().any(|k| k == "insufficient_quota");
    if (status == 429 && !out_of_quota) || (500..=599).contains(&status) {
        error.retryable = true;
        error.retry_after = retry_after;
    }
    error
}

/// The error of an error object a provider sent inside a stream (an SSE
/// `error` event, an `{"error": ...}` chunk or line).
pub fn from_stream_error(provider: &str, value: &Value) -> ProviderError {
    let detail = error_message(value).unwrap_or_else(|| clip(&value.to_string()));
    let kinds = error_kinds(value);
    let status = value
        .get("error")
        .and_then(|e| e.get("code").or_else(|| e.get("status")))
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok());
    let code = kinds
        .iter()
        .find_map(|k| code_for_error_type(k))
        .or_else(|| status.map(code_for_status))
        .unwrap_or(codes::UPSTREAM);
    let retryable = matches!(code, codes::RATE_LIMITED | codes::UPSTREAM)
        && !kinds.iter().any(|k| k == "insufficient_quota");
    let error = ProviderError::new(code, format!("{provider} reported an error: {detail}"));
    if retryable {
        error.retryable()
    } else {
        error
    }
}

/// The error of a request that got no HTTP answer.
pub fn from_transport(provider: &str, base_url: &str, err: ureq::Error) -> ProviderError {
    match err {
        ureq::Error::Io(err) => from_connect_io(provider, base_url, &err),
        ureq::Error::Timeout(what) => ProviderError::new(
            codes::TIMEOUT,
            format!("{provider} at {base_url} did not answer in time ({what})"),
        ),
        ureq::Error::HostNotFound => ProviderError::new(
            codes::CONNECTION,
            format!("cannot reach {provider}: the host of {base_url} was not found"),
        )
        .retryable(),
        ureq::Error::ConnectionFailed => ProviderError::new(
            codes::CONNECTION,
            format!("cannot connect to {provider} at {base_url}"),
        )
        .retryable(),
        ureq::Error::Protocol(err) => ProviderError::bad_response(format!(
            "{provider} at {base_url} did not answer in HTTP/1.1: {err}"
        )),
        ureq::Error::BadUri(err) => ProviderError::new(
            codes::INVALID_REQUEST,
            format!("the request URL for {provider} is invalid: {err}"),
        ),
        ureq::Error::Http(err) => ProviderError::new(
            codes::INVALID_REQUEST,
            format!("the request for {provider} is invalid: {err}"),
        ),
        err @ (ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_)) => {
            ProviderError::new(
                codes::CONNECTION,
                format!("no secure connection to {provider} at {base_url}: {err}"),
            )
        }
        other => ProviderError::new(
            codes::CONNECTION,
            format!("the request to {provider} at {base_url} failed: {other}"),
        ),
    }
}

fn from_connect_io(provider: &str, base_url: &str, err: &io::Error) -> ProviderError {
    match err.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ProviderError::new(
            codes::TIMEOUT,
            format!("{provider} at {base_url} did not answer in time: {err}"),
        ),
        io::ErrorKind::ConnectionRefused => ProviderError::new(
            codes::CONNECTION,
            format!("cannot connect to {provider} at {base_url}: connection refused"),
        )
        .retryable(),
        _ => ProviderError::new(
            codes::CONNECTION,
            format!("the connection to {provider} at {base_url} failed: {err}"),
        )
        .retryable(),
    }
}

/// The error of a stream whose reading failed after the response began.
pub fn from_read_error(provider: &str, err: &io::Error) -> ProviderError {
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<ureq::Error>());
    match inner {
        Some(ureq::Error::Timeout(_)) => ProviderError::new(
            codes::TIMEOUT,
            format!("the stream from {provider} stalled: {err}"),
        ),
        Some(ureq::Error::Protocol(_)) => ProviderError::bad_response(format!(
            "the stream from {provider} is not valid HTTP: {err}"
        )),
        _ if err.kind() == io::ErrorKind::TimedOut => ProviderError::new(
            codes::TIMEOUT,
            format!("the stream from {provider} stalled: {err}"),
        ),
        _ => ProviderError::interrupted(format!("the stream from {provider} broke off: {err}")),
    }
}

/// The human-readable message of a provider's JSON error, wherever the
/// provider puts it.
pub fn error_message(value: &Value) -> Option<String> {
    let text = |v: &Value| {
        v.as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(clip)
    };
    if let Some(error) = value.get("error") {
        if let Some(message) = error.get("message").and_then(text) {
            return Some(message);
        }
        if let Some(message) = text(error) {
            return Some(message);
        }
    }
    if let Some(message) = value.get("message").and_then(text) {
        return Some(message);
    }
    match value.get("detail") {
        Some(Value::String(s)) => Some(clip(s)),
        // FastAPI-style validation errors: [{"loc": [...], "msg": "..."}].
        Some(Value::Array(items)) => {
            let parts: Vec<String> = items
                .iter()
                .filter_map(|item| item.get("msg").and_then(Value::as_str))
                .map(str::to_owned)
                .collect();
            (!parts.is_empty()).then(|| clip(&parts.join("; ")))
        }
        _ => None,
    }
}

/// The `type` and `code` strings of a provider's JSON error.
fn error_kinds(value: &Value) -> Vec<String> {
    let error = value.get("error").unwrap_or(value);
    ["type", "code"]
        .iter()
        .filter_map(|key| error.get(*key).and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

fn is_unknown_model(kinds: &[String], detail: &str) -> bool {
    if kinds
        .iter()
        .any(|k| k == "model_not_found" || k == "not_found_error")
    {
        return true;
    }
    let detail = detail.to_ascii_lowercase();
    detail.contains("model")
        && (detail.contains("not found")
            || detail.contains("does not exist")
            || detail.contains("not exist"))
}

/// `text`, cut to a readable length on a character boundary.
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

fn canonical_reason(status: u16) -> &'static str {
    ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("no reason given")
}

/// The delay a `retry-after` header asks for, in seconds (HTTP dates are
/// not honoured; the backoff applies then).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_map_to_stable_codes() {
        assert_eq!(code_for_status(401), codes::AUTH);
        assert_eq!(code_for_status(403), codes::AUTH);
        assert_eq!(code_for_status(404), codes::NOT_FOUND);
        assert_eq!(code_for_status(429), codes::RATE_LIMITED);
        assert_eq!(code_for_status(400), codes::INVALID_REQUEST);
        assert_eq!(code_for_status(422), codes::INVALID_REQUEST);
        assert_eq!(code_for_status(503), codes::UPSTREAM);
        assert_eq!(code_for_status(529), codes::UPSTREAM);
    }

    #[test]
    fn error_bodies_give_the_providers_words() {
        let openai = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let err = from_status("OpenAI", 401, openai, None);
        assert_eq!(err.code, codes::AUTH);
        assert_eq!(
            err.message,
            "OpenAI answered HTTP 401: Incorrect API key provided"
        );
        assert!(!err.retryable);

        let ollama = br#"{"error":"model \"nope\" not found, try pulling it first"}"#;
        let err = from_status("Ollama", 404, ollama, None);
        assert_eq!(err.code, codes::NOT_FOUND);
        assert!(
            err.message.contains("try pulling it first"),
            "{}",
            err.message
        );

        let vllm = br#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","code":404}"#;
        let err = from_status("vLLM", 400, vllm, None);
        assert_eq!(err.code, codes::NOT_FOUND);

        let fastapi = br#"{"detail":[{"loc":["body","messages"],"msg":"field required"}]}"#;
        let err = from_status("server", 422, fastapi, None);
        assert_eq!(err.code, codes::INVALID_REQUEST);
        assert!(err.message.ends_with("field required"), "{}", err.message);

        let err = from_status("server", 502, b"<html>Bad Gateway</html>", None);
        assert_eq!(err.code, codes::UPSTREAM);
        assert!(err.retryable);
        assert!(err.message.contains("<html>Bad Gateway</html>"));

        let err = from_status("server", 500, b"", None);
        assert!(
            err.message.ends_with("Internal Server Error"),
            "{}",
            err.message
        );
    }

    #[test]
    fn rate_limits_retry_unless_the_quota_is_gone() {
        let wait = Some(Duration::from_secs(3));
        let err = from_status("OpenAI", 429, b"{}", wait);
        assert!(err.retryable);
        assert_eq!(err.retry_after, wait);
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota"}}"#;
        let err = from_status("OpenAI", 429, quota, wait);
        assert_eq!(err.code, codes::RATE_LIMITED);
        assert!(!err.retryable);
    }

    #[test]
    fn stream_errors_map_by_type() {
        let anthropic =
            json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}});
        let err = from_stream_error("Anthropic", &anthropic);
        assert_eq!(err.code, codes::UPSTREAM);
        assert!(err.retryable);
        assert_eq!(err.message, "Anthropic reported an error: Overloaded");
        let openrouter = json!({"error":{"code":429,"message":"slow down"}});
        assert_eq!(
            from_stream_error("OpenRouter", &openrouter).code,
            codes::RATE_LIMITED
        );
        let ollama = json!({"error":"an unknown error was encountered"});
        let err = from_stream_error("Ollama", &ollama);
        assert_eq!(err.code, codes::UPSTREAM);
        assert!(err.message.ends_with("an unknown error was encountered"));
    }

    #[test]
    fn retry_after_takes_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn long_details_are_clipped_on_a_char_boundary() {
        let long = "é".repeat(MAX_DETAIL_CHARS + 10);
        let clipped = clip(&long);
        assert!(clipped.ends_with("..."));
        assert_eq!(clipped.chars().count(), MAX_DETAIL_CHARS + 3);
    }
}
