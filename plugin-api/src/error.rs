//! Errors that cross the plugin boundary.

use std::fmt;

use abi_stable::{std_types::RString, StableAbi};

/// What went wrong, as a small open set of codes.
///
/// A `u8` newtype rather than an enum so that a newer plugin can return a kind
/// an older host does not know without undefined behaviour: the host shows an
/// unknown kind as `error`.
///
/// Evolution rule: new kinds get new constants with new numbers; a number is
/// never reused or renumbered.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorKind(pub u8);

impl ErrorKind {
    /// The settings given to an adapter constructor are invalid.
    pub const INVALID_SETTINGS: ErrorKind = ErrorKind(1);
    /// The input of a call is invalid (a bad session id, a malformed request).
    pub const INVALID_INPUT: ErrorKind = ErrorKind(2);
    /// A service the adapter needs cannot be reached or answered with an error.
    pub const UNAVAILABLE: ErrorKind = ErrorKind(3);
    /// A call took longer than its deadline.
    pub const TIMEOUT: ErrorKind = ErrorKind(4);
    /// The adapter does not provide this operation.
    pub const UNSUPPORTED: ErrorKind = ErrorKind(5);
    /// Stored data could not be read back (corrupt or of an unknown format).
    pub const CORRUPT: ErrorKind = ErrorKind(6);
    /// A panic inside the plugin, caught by [`guard`](fn@crate::guard).
    pub const PANIC: ErrorKind = ErrorKind(7);
    /// Anything else.
    pub const INTERNAL: ErrorKind = ErrorKind(8);

    /// A stable lowercase name, used as the `code` of error events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::INVALID_SETTINGS => "invalid_settings",
            Self::INVALID_INPUT => "invalid_input",
            Self::UNAVAILABLE => "unavailable",
            Self::TIMEOUT => "timeout",
            Self::UNSUPPORTED => "unsupported",
            Self::CORRUPT => "corrupt",
            Self::PANIC => "plugin_panic",
            Self::INTERNAL => "internal",
            _ => "error",
        }
    }
}

impl fmt::Debug for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error returned by a plugin entry point: a kind and a human-readable message.
///
/// Evolution rule: this struct never changes layout; new information goes into
/// the message or into new [`ErrorKind`] constants.
#[repr(C)]
#[derive(StableAbi, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// What kind of failure this is.
    pub kind: ErrorKind,
    /// What happened, for an operator: name the setting, the path, the server.
    pub message: RString,
}

impl PluginError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: RString::from(message.into()),
        }
    }

    /// The settings are invalid; say which one and why.
    pub fn invalid_settings(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::INVALID_SETTINGS, message)
    }

    /// The input of a call is invalid.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::INVALID_INPUT, message)
    }

    /// A service the adapter needs is unavailable.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::UNAVAILABLE, message)
    }

    /// Anything else.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::INTERNAL, message)
    }
}

impl fmt::Debug for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for PluginError {}

impl From<serde_json::Error> for PluginError {
    fn from(err: serde_json::Error) -> Self {
        Self::invalid_input(err.to_string())
    }
}
