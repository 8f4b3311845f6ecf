//! The panic guard every entry point runs under.

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::std_types::RResult;

use crate::{ErrorKind, PluginError};

/// Runs `body`, turning a panic inside it into a [`PluginError`] of kind
/// [`ErrorKind::PANIC`] instead of letting it reach the FFI boundary, where it
/// would abort the whole host.
///
/// The adapters built with [`model_adapter`](crate::model_adapter) and
/// [`store_adapter`](crate::store_adapter), and the root module made by
/// [`export_plugin!`](crate::export_plugin), already run every call through
/// it. Call it yourself only in code of your own that crosses the boundary.
pub fn guard<T>(body: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result.into(),
        Err(payload) => RResult::RErr(PluginError::new(
            ErrorKind::PANIC,
            format!("plugin panicked: {}", panic_message(payload.as_ref())),
        )),
    }
}

/// The text of a panic payload, for messages and logs.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "a panic with a non-string payload"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_value() {
        let result: RResult<(), PluginError> = guard(|| panic!("boom at token {}", 3));
        let err = result
            .into_result()
            .expect_err("the panic must become an error");
        assert_eq!(err.kind, ErrorKind::PANIC);
        assert!(err.message.contains("boom at token 3"), "{}", err.message);
    }

    #[test]
    fn values_and_errors_pass_through() {
        assert_eq!(guard(|| Ok(7)).into_result(), Ok(7));
        let err = guard::<()>(|| Err(PluginError::internal("nope"))).into_result();
        assert_eq!(err, Err(PluginError::internal("nope")));
    }
}
