//! The llama.cpp backend: initialised once per process (per copy of this
//! library), never freed, with llama.cpp's own log lines sent to the host's
//! logger.

use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, OnceLock, PoisonError};

use llama_cpp_2::llama_backend::LlamaBackend;
use llm_host_plugin_api::{self as api, LogLevel, PluginError};

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// The process's llama.cpp backend, initialised on first use. It lives in a
/// static and is never dropped: llama.cpp's global state must not be freed
/// while any other adapter of this library may still use it.
pub fn backend() -> Result<&'static LlamaBackend, PluginError> {
    BACKEND
        .get_or_init(|| {
            route_logs();
            LlamaBackend::init().map_err(|err| err.to_string())
        })
        .as_ref()
        .map_err(|err| PluginError::unavailable(format!("llama.cpp backend: {err}")))
}

/// A log line llama.cpp wrote in pieces (without a trailing newline), and its level.
static PARTIAL: Mutex<(LogLevel, String)> = Mutex::new((LogLevel::DEBUG, String::new()));

fn route_logs() {
    // SAFETY: `forward` has the signature llama.cpp expects, stays valid for
    // the life of the process (libraries are never unloaded) and ignores the
    // user data pointer.
    unsafe { llama_cpp_sys_2::llama_log_set(Some(forward), std::ptr::null_mut()) };
}

/// llama.cpp's log levels in the host's terms. llama.cpp is chatty at INFO
/// (a hundred lines per model load), so its INFO is the host's DEBUG.
fn level(level: llama_cpp_sys_2::ggml_log_level) -> Option<LogLevel> {
    match level {
        llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR => Some(LogLevel::ERROR),
        llama_cpp_sys_2::GGML_LOG_LEVEL_WARN => Some(LogLevel::WARN),
        llama_cpp_sys_2::GGML_LOG_LEVEL_INFO => Some(LogLevel::DEBUG),
        llama_cpp_sys_2::GGML_LOG_LEVEL_DEBUG => Some(LogLevel::TRACE),
        // CONT: continues the previous piece.
        _ => None,
    }
}

fn write(level: LogLevel, line: &str) {
    let line = line.trim_end();
    // Before the host's init (in tests, examples) `api::log` prints to stderr
    // whatever the level: keep that to warnings and errors.
    if line.is_empty() || (api::host::host().is_none() && level > LogLevel::WARN) {
        return;
    }
    api::log!(level, "llama.cpp: {line}");
}

unsafe extern "C" fn forward(
    raw_level: llama_cpp_sys_2::ggml_log_level,
    text: *const c_char,
    _user_data: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for this call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    // A panic must not unwind into C.
    let _ = std::panic::catch_unwind(|| {
        let mut partial = PARTIAL.lock().unwrap_or_else(PoisonError::into_inner);
        match level(raw_level) {
            Some(level) => {
                if !partial.1.is_empty() {
                    let line = std::mem::take(&mut partial.1);
                    write(partial.0, &line);
                }
                partial.0 = level;
            }
            None if partial.1.is_empty() => partial.0 = LogLevel::DEBUG,
            None => {}
        }
        partial.1.push_str(&text);
        if partial.1.ends_with('\n') {
            let (level, line) = (partial.0, std::mem::take(&mut partial.1));
            drop(partial);
            write(level, &line);
        }
    });
}
