//! The audit log: one line, target `llm_host::audit`, for each request
//! refused for who sent it (no key, a wrong key, a page of another origin,
//! a key without the admin right) and each admin action (a reload, a
//! session deleted), with the caller and the client's address.
//! `RUST_LOG=llm_host::audit=info` keeps it alone. Prompts refused by the
//! limits are logged by [`super::queue`] under the same target.

use std::net::SocketAddr;

use crate::metrics::metrics;

/// A request refused with `code` (counted in `llm_host_refused_total`).
pub fn refused(route: &str, client: Option<SocketAddr>, code: &'static str) {
    metrics().refuse(code);
    tracing::warn!(
        target: "llm_host::audit",
        route,
        client = client.map(tracing::field::display),
        code,
        "request refused"
    );
}

/// An admin action by `caller` (a key id, `anonymous` in open mode) from
/// `client`: what it was and what came of it.
pub fn admin(action: &str, caller: &str, client: Option<SocketAddr>, outcome: &str) {
    tracing::info!(
        target: "llm_host::audit",
        action,
        caller,
        client = client.map(tracing::field::display),
        outcome,
        "admin action"
    );
}
