//! The attack suite: each defence of SECURITY.md tried through the real
//! binary, the way a hostile client, web page, upstream or local user would.

#[path = "attack/bounds.rs"]
mod bounds;
#[path = "attack/listener.rs"]
mod listener;
#[path = "attack/plugin_files.rs"]
mod plugin_files;
#[path = "attack/redaction.rs"]
mod redaction;
#[path = "attack/soak.rs"]
mod soak;
#[path = "attack/upstream.rs"]
mod upstream;
