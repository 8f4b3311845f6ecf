//! The settings every provider plugin takes, checked once when a backend is
//! built, and the per-turn parameters merged over their defaults.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use llm_host_plugin_api::{self as api, PluginError, TurnParams};
use serde::Deserialize;
use ureq::http::{HeaderName, HeaderValue, Uri};

/// How long a turn may wait for the provider's next byte, unless `timeout_ms`
/// says otherwise: five minutes, enough for a local server loading a model.
pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;

/// Retries of a failed request before the first token, unless `max_retries`
/// says otherwise.
pub const DEFAULT_MAX_RETRIES: u32 = 2;

/// A backend's settings as operators write them in `config.toml`
/// (`[models.NAME.settings]`). The same keys serve every provider; a key a
/// provider's API has no use for (`top_k` for OpenAI, `seed` for Anthropic)
/// is refused by name when the backend is built.
#[derive(Deserialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// The API's base URL; the provider's public endpoint when absent.
    pub base_url: Option<String>,
    /// The model to ask for. Required.
    pub model: String,
    /// The NAME of the environment variable holding the API key. The key
    /// itself never appears in settings, messages, logs or `Debug` output.
    pub api_key_env: Option<String>,
    /// A system prompt put before the conversation.
    pub system: Option<String>,
    /// Longest wait, in milliseconds, for the provider's answer to start and
    /// then for each next piece of it.
    pub timeout_ms: Option<u64>,
    /// Retries of a request refused with 429 or 5xx, or that could not
    /// connect, before the first token (default 2).
    pub max_retries: Option<u32>,
    /// Extra HTTP headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Default sampling temperature.
    pub temperature: Option<f64>,
    /// Default limit of generated tokens.
    pub max_tokens: Option<u64>,
    /// Default nucleus sampling.
    pub top_p: Option<f64>,
    /// Default top-k sampling, for providers that have it.
    pub top_k: Option<u64>,
    /// Default sampling seed, for providers that have it.
    pub seed: Option<u64>,
    /// Default stop sequences.
    #[serde(default)]
    pub stop: Vec<String>,
}

impl fmt::Debug for ProviderSettings {
    // Header values may hold credentials: only their names are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderSettings")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key_env", &self.api_key_env)
            .field("system", &self.system)
            .field("timeout_ms", &self.timeout_ms)
            .field("max_retries", &self.max_retries)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("temperature", &self.temperature)
            .field("max_tokens", &self.max_tokens)
            .field("top_p", &self.top_p)
            .field("top_k", &self.top_k)
            .field("seed", &self.seed)
            .field("stop", &self.stop)
            .finish()
    }
}

/// What a provider plugin says about its API, to resolve settings against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderInfo {
    /// The provider's name in messages, e.g. `OpenAI`.
    pub name: &'static str,
    /// `base_url` when the settings name none.
    pub default_base_url: &'static str,
    /// The environment variable read for the key when the settings name none
    /// and `base_url` is the default one: a key meant for the provider is
    /// never sent to another server unless `api_key_env` says so.
    pub default_api_key_env: Option<&'static str>,
    /// Whether the API takes a top-k parameter.
    pub top_k: bool,
    /// Whether the API takes a seed.
    pub seed: bool,
}

/// An API key read from the environment. Its `Debug` output hides it and
/// [`Secret::redact`] takes it out of any text.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the request header only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the key replaced by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_owned()
        } else {
            text.replace(&self.0, "[redacted]")
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Generation parameters: a backend's defaults, or those merged with a turn's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Most tokens to generate.
    pub max_tokens: Option<u64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Top-k sampling.
    pub top_k: Option<u64>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Stop sequences.
    pub stop: Vec<String>,
}

impl Params {
    /// These defaults with what `turn` sets put over them. A turn's stop
    /// sequences replace the defaults' when it has any.
    pub fn with_turn(&self, turn: &TurnParams) -> Params {
        Params {
            temperature: turn.temperature.or(self.temperature),
            max_tokens: turn.max_tokens.or(self.max_tokens),
            top_p: turn.top_p.or(self.top_p),
            top_k: turn.top_k.or(self.top_k),
            seed: turn.seed.or(self.seed),
            stop: if turn.stop.is_empty() {
                self.stop.clone()
            } else {
                turn.stop.clone()
            },
        }
    }
}

/// A backend's settings, checked and resolved: what a plugin builds its
/// requests from.
#[derive(Clone)]
pub struct Backend {
    /// The provider's API.
    pub provider: ProviderInfo,
    /// The base URL without a trailing `/`.
    pub base_url: String,
    /// The model asked for.
    pub model: String,
    /// The API key, when one is configured and set.
    pub api_key: Option<Secret>,
    /// The system prompt from the settings.
    pub system: Option<String>,
    /// Longest wait for the answer to start and between its pieces.
    pub timeout: Duration,
    /// Retries before the first token.
    pub max_retries: u32,
    /// Extra headers, checked to be valid HTTP.
    pub headers: Vec<(String, String)>,
    /// Default generation parameters.
    pub defaults: Params,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("provider", &self.provider.name)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key)
            .field("system", &self.system)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("defaults", &self.defaults)
            .finish()
    }
}

impl Backend {
    /// Parses settings text (a JSON object) and resolves it for `provider`.
    pub fn from_settings_text(provider: ProviderInfo, text: &str) -> Result<Self, PluginError> {
        Self::resolve(provider, api::parse_settings(text)?)
    }

    /// Checks `settings` and resolves them for `provider`: the base URL must
    /// be an http(s) URL, the model named, headers valid, the key's variable
    /// set when `api_key_env` names one, and no parameter the API lacks set.
    pub fn resolve(
        provider: ProviderInfo,
        settings: ProviderSettings,
    ) -> Result<Self, PluginError> {
        if settings.model.trim().is_empty() {
            return Err(PluginError::invalid_settings(
                "model: name the model to use, e.g. model = \"...\"",
            ));
        }
        let base_url = settings
            .base_url
            .unwrap_or_else(|| provider.default_base_url.to_owned());
        let base_url = check_base_url(&base_url)?;
        let provider_url = base_url == provider.default_base_url;
        if settings.top_k.is_some() && !provider.top_k {
            return Err(PluginError::invalid_settings(format!(
                "top_k: the {} API has no top-k sampling",
                provider.name
            )));
        }
        if settings.seed.is_some() && !provider.seed {
            return Err(PluginError::invalid_settings(format!(
                "seed: the {} API has no seed",
                provider.name
            )));
        }
        if settings.timeout_ms == Some(0) {
            return Err(PluginError::invalid_settings(
                "timeout_ms: must be at least 1",
            ));
        }
        let headers = check_headers(settings.headers)?;
        let api_key = match settings.api_key_env {
            Some(name) => Some(read_key(&name)?),
            None if provider_url => match provider.default_api_key_env {
                Some(name) => read_default_key(provider.name, name),
                None => None,
            },
            None => None,
        };
        Ok(Self {
            provider,
            base_url,
            model: settings.model,
            api_key,
            system: settings.system.filter(|s| !s.is_empty()),
            timeout: Duration::from_millis(settings.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS)),
            max_retries: settings.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
            headers,
            defaults: Params {
                temperature: settings.temperature,
                max_tokens: settings.max_tokens,
                top_p: settings.top_p,
                top_k: settings.top_k,
                seed: settings.seed,
                stop: settings.stop,
            },
        })
    }

    /// `Authorization: Bearer KEY`, when a key is configured.
    pub fn bearer_auth(&self) -> Vec<(String, String)> {
        self.api_key
            .iter()
            .map(|key| {
                (
                    "authorization".to_owned(),
                    format!("Bearer {}", key.expose()),
                )
            })
            .collect()
    }

    /// `base_url` followed by `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The parameters of a turn the provider's API has no place for, to be
    /// reported and left out.
    pub fn unsupported_params(&self, turn: &TurnParams) -> Vec<&'static str> {
        let mut names = Vec::new();
        if turn.top_k.is_some() && !self.provider.top_k {
            names.push("topK");
        }
        if turn.seed.is_some() && !self.provider.seed {
            names.push("seed");
        }
        names
    }

    /// `text` with the API key taken out, for anything shown or logged.
    pub fn redact(&self, text: &str) -> String {
        match &self.api_key {
            Some(key) => key.redact(text),
            None => text.to_owned(),
        }
    }

    /// Whether the base URL names this machine, which no proxy can reach.
    pub fn is_loopback(&self) -> bool {
        let Ok(uri) = self.base_url.parse::<Uri>() else {
            return false;
        };
        match uri.host() {
            Some(host) => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            None => false,
        }
    }
}

fn check_base_url(base_url: &str) -> Result<String, PluginError> {
    let trimmed = base_url.trim().trim_end_matches('/');
    let uri: Uri = trimmed.parse().map_err(|err| {
        PluginError::invalid_settings(format!("base_url: `{trimmed}` is not a URL: {err}"))
    })?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
    if !scheme_ok || uri.host().is_none_or(str::is_empty) {
        return Err(PluginError::invalid_settings(format!(
            "base_url: `{trimmed}` must be an http:// or https:// URL with a host"
        )));
    }
    if uri.query().is_some() {
        return Err(PluginError::invalid_settings(format!(
            "base_url: `{trimmed}` must not have a query string"
        )));
    }
    Ok(trimmed.to_owned())
}

fn check_headers(headers: BTreeMap<String, String>) -> Result<Vec<(String, String)>, PluginError> {
    headers
        .into_iter()
        .map(|(name, value)| {
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                PluginError::invalid_settings(format!("headers: `{name}` is not a header name"))
            })?;
            // The value is not quoted: it may be a credential.
            HeaderValue::from_str(&value).map_err(|_| {
                PluginError::invalid_settings(format!(
                    "headers.{name}: the value is not a valid header value"
                ))
            })?;
            Ok((name, value))
        })
        .collect()
}

fn read_key(name: &str) -> Result<Secret, PluginError> {
    if name.is_empty() {
        return Err(PluginError::invalid_settings(
            "api_key_env: name the environment variable that holds the key",
        ));
    }
    match std::env::var(name) {
        Ok(key) if !key.trim().is_empty() => Ok(Secret::new(key.trim())),
        Ok(_) => Err(PluginError::invalid_settings(format!(
            "api_key_env: the environment variable `{name}` is empty"
        ))),
        Err(std::env::VarError::NotPresent) => Err(PluginError::invalid_settings(format!(
            "api_key_env: the environment variable `{name}` is not set"
        ))),
        Err(std::env::VarError::NotUnicode(_)) => Err(PluginError::invalid_settings(format!(
            "api_key_env: the environment variable `{name}` is not valid UTF-8"
        ))),
    }
}

fn read_default_key(provider: &str, name: &str) -> Option<Secret> {
    match std::env::var(name) {
        Ok(key) if !key.trim().is_empty() => Some(Secret::new(key.trim())),
        _ => {
            api::warn!("{name} is not set: requests to {provider} go without an API key");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_ENV: &str = "LLM_PLUGIN_HTTP_TEST_KEY";
    const KEY: &str = "test-key-0123456789";

    const PROVIDER: ProviderInfo = ProviderInfo {
        name: "Test",
        default_base_url: "https://api.example.com/v1",
        default_api_key_env: Some(KEY_ENV),
        top_k: false,
        seed: true,
    };

    fn setup() {
        static ENV: std::sync::Once = std::sync::Once::new();
        ENV.call_once(|| std::env::set_var(KEY_ENV, KEY));
    }

    fn backend(text: &str) -> Result<Backend, PluginError> {
        setup();
        Backend::from_settings_text(PROVIDER, text)
    }

    #[test]
    fn the_default_key_goes_only_to_the_providers_own_url() {
        let own = backend(r#"{"model": "m"}"#).expect("backend");
        assert_eq!(own.api_key.as_ref().map(Secret::expose), Some(KEY));
        let same = backend(r#"{"model": "m", "base_url": "https://api.example.com/v1/"}"#)
            .expect("backend");
        assert!(
            same.api_key.is_some(),
            "the default URL written out is the same"
        );
        let other =
            backend(r#"{"model": "m", "base_url": "http://localhost:8080/v1"}"#).expect("backend");
        assert!(other.api_key.is_none());
        let named = backend(&format!(
            r#"{{"model": "m", "base_url": "http://localhost:8080/v1", "api_key_env": "{KEY_ENV}"}}"#
        ))
        .expect("backend");
        assert!(named.api_key.is_some());
    }

    #[test]
    fn the_key_is_never_shown() {
        let backend = backend(r#"{"model": "m"}"#).expect("backend");
        let shown = format!("{backend:?}");
        assert!(!shown.contains(KEY), "{shown}");
        assert_eq!(
            backend.redact(&format!("bad key {KEY}!")),
            "bad key [redacted]!"
        );
    }

    #[test]
    fn turn_params_override_the_defaults() {
        let defaults = Params {
            temperature: Some(0.1),
            max_tokens: Some(100),
            top_p: Some(0.9),
            top_k: None,
            seed: Some(1),
            stop: vec!["END".into()],
        };
        let turn = TurnParams {
            temperature: Some(0.7),
            seed: Some(2),
            ..TurnParams::default()
        };
        assert_eq!(
            defaults.with_turn(&turn),
            Params {
                temperature: Some(0.7),
                seed: Some(2),
                ..defaults.clone()
            }
        );
        let stop = TurnParams {
            stop: vec!["STOP".into()],
            ..TurnParams::default()
        };
        assert_eq!(defaults.with_turn(&stop).stop, ["STOP"]);
    }

    #[test]
    fn bad_settings_are_named() {
        let message = |text: &str| match backend(text) {
            Ok(backend) => panic!("accepted: {backend:?}"),
            Err(err) => err.message.to_string(),
        };
        assert!(message(r#"{"model": " "}"#).starts_with("model"));
        assert!(message(r#"{"model": "m", "base_url": "localhost:1234"}"#).starts_with("base_url"));
        assert!(message(r#"{"model": "m", "top_k": 1}"#).starts_with("top_k"));
        assert!(message(r#"{"model": "m", "timeout_ms": 0}"#).starts_with("timeout_ms"));
        assert!(message(r#"{"model": "m", "headers": {"x": "a\nb"}}"#).starts_with("headers.x"));
        assert!(message(r#"{"model": "m", "api_key_env": ""}"#).starts_with("api_key_env"));
    }

    #[test]
    fn loopback_urls_are_recognised() {
        for (url, loopback) in [
            ("http://127.0.0.1:8080/v1", true),
            ("http://localhost:11434", true),
            ("http://[::1]:8000", true),
            ("https://api.example.com/v1", false),
            ("http://10.0.0.2:8000", false),
        ] {
            let backend =
                backend(&format!(r#"{{"model": "m", "base_url": "{url}"}}"#)).expect("backend");
            assert_eq!(backend.is_loopback(), loopback, "{url}");
        }
    }
}
