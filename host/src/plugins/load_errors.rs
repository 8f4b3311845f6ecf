//! Why a plugin library cannot be loaded, in the few lines an operator can
//! act on: what is wrong (another plugin-api version, another layout,
//! another abi_stable, not a plugin at all) and how to fix it.

use std::fmt::Write as _;

use abi_stable::library::LibraryError;
use llm_host_plugin_api::API_VERSION;

/// Turns a loader error into the few lines an operator can act on: what is
/// wrong and how to fix it; the full report goes to the debug log.
/// `built_against` is the plugin-api version the library says it was built
/// against, once its header could be read.
pub(super) fn describe(err: &LibraryError, built_against: Option<&str>) -> String {
    match err {
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "built against plugin-api {actual_version}, but this host needs \
             {}.{}.x (rebuild the plugin against llm-host-plugin-api {API_VERSION})",
            expected_version.major, expected_version.minor
        ),
        LibraryError::AbiInstability(report) => {
            let full = report.to_string();
            tracing::debug!(report = %full, "full ABI report");
            let useful: Vec<&str> = full
                .lines()
                .map(str::trim)
                .filter(|line| line.starts_with("Error:") || line.contains("incompatible"))
                .take(6)
                .collect();
            let built = built_against
                .map(|version| format!("built against llm-host-plugin-api {version}, but "))
                .unwrap_or_default();
            let mut message = format!(
                "incompatible plugin-api layout: {built}its types match no layout this host \
                 (plugin-api {API_VERSION}) loads; was the plugin-api modified or forked? \
                 Rebuild the plugin against an unmodified llm-host-plugin-api {API_VERSION}"
            );
            for line in useful {
                let _ = write!(message, "\n    {line}");
            }
            message
        }
        LibraryError::InvalidAbiHeader(found) => {
            let ours = abi_stable::library::AbiHeader::VALUE;
            if found.magic_string != ours.magic_string {
                "not an llm-host plugin: its root module symbol is not abi_stable's \
                 (build it with llm_host_plugin_api::export_plugin!)"
                    .to_owned()
            } else {
                format!(
                    "built with abi_stable {}.{}, but this host loads plugins built with \
                     abi_stable {}.{}: rebuild the plugin against llm-host-plugin-api \
                     {API_VERSION}, and name abi_stable only as llm_host_plugin_api::abi_stable \
                     (or as abi_stable = \"{}.{}\")",
                    found.abi_major,
                    found.abi_minor,
                    ours.abi_major,
                    ours.abi_minor,
                    ours.abi_major,
                    ours.abi_minor
                )
            }
        }
        LibraryError::GetSymbolError { .. } => {
            "not an llm-host plugin: it exports no plugin root module \
             (use llm_host_plugin_api::export_plugin!)"
                .to_owned()
        }
        LibraryError::RootModule { err, .. } => {
            format!("its root module failed to load: {}", err.to_string().trim())
        }
        LibraryError::ParseVersionError(err) => format!(
            "its plugin-api version cannot be read ({}); rebuild the plugin against \
             llm-host-plugin-api {API_VERSION}",
            err.to_string().trim()
        ),
        LibraryError::InvalidCAbi { .. } => {
            tracing::debug!(report = %err, "C ABI tests");
            "its C ABI differs from this host's (built for another target, or by an \
             incompatible compiler?): rebuild it for this machine"
                .to_owned()
        }
        LibraryError::OpenError { err, .. } => format!("cannot be loaded: {err}"),
        LibraryError::Many(errors) => errors
            .iter()
            .map(|err| describe(err, built_against))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

#[cfg(test)]
mod tests {
    use abi_stable::library::AbiHeader;

    use super::*;

    // Each refusal says what is wrong and what to do, in a line or two.
    #[test]
    fn refusals_are_short_and_name_the_fix() {
        let mut other_minor = AbiHeader::VALUE;
        other_minor.abi_minor += 1;
        let message = describe(&LibraryError::InvalidAbiHeader(other_minor), None);
        let ours = AbiHeader::VALUE;
        assert!(
            message.starts_with(&format!(
                "built with abi_stable {}.{}, but this host loads plugins built with abi_stable \
                 {}.{}: rebuild the plugin against llm-host-plugin-api {API_VERSION}",
                ours.abi_major,
                ours.abi_minor + 1,
                ours.abi_major,
                ours.abi_minor
            )),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");

        let mut not_abi_stable = AbiHeader::VALUE;
        not_abi_stable.magic_string = [b'x'; 32];
        let message = describe(&LibraryError::InvalidAbiHeader(not_abi_stable), None);
        assert!(message.starts_with("not an llm-host plugin"), "{message}");
    }
}
