//! API keys: who is calling, and which sessions they may touch.
//!
//! With no keys configured the host runs open (every caller is anonymous and
//! every session is reachable). With keys, each WebSocket upgrade and API call
//! names one, as `Authorization: Bearer KEY` or `?token=KEY`; keys are compared
//! in constant time. A session belongs to the key that created it: another key
//! gets 404 for it, as if it did not exist. Admin keys reach every session and
//! the admin endpoints.

use std::collections::HashMap;

use subtle::ConstantTimeEq;
use warp::http::{header, HeaderMap, StatusCode};

use crate::config::AuthConfig;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No keys are configured.
    Open,
    /// A configured key.
    Key {
        /// The key's id, which owns the sessions it creates.
        id: String,
        /// Whether it may use the admin endpoints.
        admin: bool,
    },
}

impl Caller {
    /// The owner recorded on sessions this caller creates.
    pub fn owner(&self) -> &str {
        match self {
            Caller::Open => "",
            Caller::Key { id, .. } => id,
        }
    }

    /// Whether this caller may resume, read or delete a session of `owner`.
    pub fn may_access(&self, owner: &str) -> bool {
        match self {
            Caller::Open => true,
            Caller::Key { id, admin } => *admin || id == owner,
        }
    }

    /// Whether this caller may use sessions of every owner.
    pub fn sees_all(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Key { admin, .. } => *admin,
        }
    }

    /// Whether this caller may use the admin endpoints.
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Key { admin, .. } => *admin,
        }
    }

    /// The id for rate limits and logs.
    pub fn id(&self) -> &str {
        match self {
            Caller::Open => "anonymous",
            Caller::Key { id, .. } => id,
        }
    }
}

/// What a caller presents to be admitted: a digest of its key, so that a
/// reload can tell whether that key still stands (without keeping it).
pub fn credential(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<[u8; 32]> {
    presented(headers, query).map(digest)
}

fn digest(secret: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether a caller admitted as `caller` with `credential` is still
/// admitted under `auth` (after a reload): its key id is there with the same
/// rights and still takes the secret it presented (a key being rotated
/// takes several); or, open, no keys are configured.
pub fn still_admitted(auth: &AuthConfig, caller: &Caller, credential: Option<[u8; 32]>) -> bool {
    match caller {
        Caller::Open => auth.keys.is_empty(),
        Caller::Key { id, admin } => {
            let Some(credential) = credential else {
                return false;
            };
            auth.keys.iter().any(|key| {
                &key.id == id
                    && key.admin == *admin
                    && key
                        .secrets
                        .iter()
                        .any(|secret| bool::from(digest(secret).ct_eq(&credential)))
            })
        }
    }
}

/// The key in the `Authorization: Bearer` header, or the `token` query
/// parameter.
fn presented<'a>(headers: &'a HeaderMap, query: &'a HashMap<String, String>) -> Option<&'a str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    bearer.or(query.get("token").map(String::as_str))
}

/// Why a caller was refused, as an HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401 or 403.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// For people.
    pub message: &'static str,
}

/// Identifies the caller from its `Authorization` header or `token` query
/// parameter.
pub fn authenticate(
    auth: &AuthConfig,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<Caller, Refusal> {
    if auth.keys.is_empty() {
        return Ok(Caller::Open);
    }
    let Some(presented) = presented(headers, query) else {
        return Err(Refusal {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "an API key is required: send `Authorization: Bearer KEY` or `?token=KEY`",
        });
    };
    // Compare with every key, so the time taken does not tell which matched.
    let mut found = None;
    for key in &auth.keys {
        for secret in &key.secrets {
            if bool::from(secret.as_bytes().ct_eq(presented.as_bytes())) {
                found = Some(key);
            }
        }
    }
    match found {
        Some(key) => Ok(Caller::Key {
            id: key.id.clone(),
            admin: key.admin,
        }),
        None => Err(Refusal {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "the API key is not valid",
        }),
    }
}

/// Refusal for a non-admin key on an admin endpoint.
pub const ADMIN_ONLY: Refusal = Refusal {
    status: StatusCode::FORBIDDEN,
    code: "forbidden",
    message: "this endpoint needs an admin key",
};

#[cfg(test)]
mod tests {
    #[test]
    fn a_key_removed_changed_or_demoted_is_no_longer_admitted() {
        use crate::config::ApiKey;
        let key = |id: &str, secret: &str, admin: bool| ApiKey {
            id: id.to_owned(),
            secrets: vec![secret.to_owned(), format!("{secret}-next")],
            admin,
        };
        let before = AuthConfig {
            open: false,
            keys: vec![key("a", "s1", true), key("b", "s2", false)],
        };
        let a = Caller::Key {
            id: "a".to_owned(),
            admin: true,
        };
        let admitted = Some(super::digest("s1"));
        assert!(super::still_admitted(&before, &a, admitted));
        // Rotated: the old secret went, the next one stays.
        let rotated = AuthConfig {
            open: false,
            keys: vec![ApiKey {
                id: "a".to_owned(),
                secrets: vec!["s1-next".to_owned()],
                admin: true,
            }],
        };
        assert!(!super::still_admitted(&rotated, &a, admitted));
        assert!(super::still_admitted(
            &rotated,
            &a,
            Some(super::digest("s1-next"))
        ));
        for after in [
            vec![key("b", "s2", false)],
            vec![key("a", "other", true)],
            vec![key("a", "s1", false)],
        ] {
            let after = AuthConfig {
                open: false,
                keys: after,
            };
            assert!(!super::still_admitted(&after, &a, admitted), "{after:?}");
        }
        assert!(super::still_admitted(
            &AuthConfig::default(),
            &Caller::Open,
            None
        ));
        assert!(!super::still_admitted(&before, &Caller::Open, None));
    }

    use super::*;
    use crate::config::ApiKey;

    fn auth() -> AuthConfig {
        AuthConfig {
            open: false,
            keys: vec![
                ApiKey {
                    id: "alice".into(),
                    secrets: vec!["alice-secret-0123456789".into()],
                    admin: false,
                },
                ApiKey {
                    id: "ops".into(),
                    secrets: vec![
                        "ops-secret-0123456789ab".into(),
                        "ops-rotated-0123456789".into(),
                    ],
                    admin: true,
                },
            ],
        }
    }

    #[test]
    fn keys_come_from_the_header_or_the_query() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "Bearer alice-secret-0123456789".parse().expect("header"),
        );
        let none = HashMap::new();
        let alice = authenticate(&auth(), &headers, &none).expect("alice");
        assert_eq!(alice.owner(), "alice");
        assert!(alice.may_access("alice") && !alice.may_access("bob") && !alice.is_admin());

        let query = HashMap::from([("token".to_owned(), "ops-secret-0123456789ab".to_owned())]);
        let ops = authenticate(&auth(), &HeaderMap::new(), &query).expect("ops");
        assert!(ops.is_admin() && ops.may_access("alice"));

        let wrong = HashMap::from([("token".to_owned(), "nope".to_owned())]);
        assert_eq!(
            authenticate(&auth(), &HeaderMap::new(), &wrong).map_err(|r| r.status),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert!(authenticate(&auth(), &HeaderMap::new(), &none).is_err());
        assert_eq!(
            authenticate(&AuthConfig::default(), &HeaderMap::new(), &none),
            Ok(Caller::Open)
        );
    }
}
