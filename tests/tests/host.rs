//! End-to-end tests of llm-host: the real binary, real plugin libraries
//! copied into a temporary plugin directory, and a real WebSocket client.
//!
//! Every test starts its own host (see `llm_host_tests::Host`), so tests are
//! independent and run in parallel.

#[path = "host/attack.rs"]
mod attack;
#[path = "host/backends.rs"]
mod backends;
#[path = "host/chat.rs"]
mod chat;
#[path = "host/check.rs"]
mod check;
#[path = "host/check_processes.rs"]
mod check_processes;
#[path = "host/cli.rs"]
mod cli;
#[path = "host/common.rs"]
mod common;
#[path = "host/compat.rs"]
mod compat;
#[path = "host/failures.rs"]
mod failures;
#[path = "host/isolated_stores.rs"]
mod isolated_stores;
#[path = "host/isolation.rs"]
mod isolation;
#[path = "host/isolation_stalls.rs"]
mod isolation_stalls;
#[path = "host/openai_http.rs"]
mod openai_http;
#[path = "host/operations.rs"]
mod operations;
#[path = "host/packaging.rs"]
mod packaging;
#[path = "host/page.rs"]
mod page;
#[path = "host/plugins.rs"]
mod plugins;
#[path = "host/production.rs"]
mod production;
#[path = "host/protocol.rs"]
mod protocol;
#[path = "host/reload.rs"]
mod reload;
#[path = "host/replay.rs"]
mod replay;
#[path = "host/replay_attack.rs"]
mod replay_attack;
#[path = "host/scaffold.rs"]
mod scaffold;
#[path = "host/session_settings.rs"]
mod session_settings;
#[path = "host/sessions.rs"]
mod sessions;
#[path = "host/stores.rs"]
mod stores;
#[path = "host/telemetry.rs"]
mod telemetry;
#[path = "host/tools.rs"]
mod tools;
#[path = "host/usage.rs"]
mod usage;
