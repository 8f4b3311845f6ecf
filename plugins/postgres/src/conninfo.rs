//! The connection string (`url`): the TLS keys are taken out of it before
//! tokio-postgres parses the rest, since it knows only `sslmode = disable,
//! prefer, require` and none of the files. Both forms are read as
//! tokio-postgres reads them; a string that does not parse is left whole,
//! for tokio-postgres to name the fault.

use std::borrow::Cow;

use llm_host_plugin_api::PluginError;
use percent_encoding::percent_decode_str;

use crate::tls::{TlsParams, KEYS};

/// Takes the TLS keys out of a connection string: answers the rest, for
/// tokio-postgres, and the keys' values (of a key given twice, the last, as
/// in libpq). A string that does not parse is answered whole, for
/// tokio-postgres to name the fault.
pub(crate) fn split_url(url: &str) -> Result<(Cow<'_, str>, TlsParams), PluginError> {
    let mut params = TlsParams::default();
    let prefix = ["postgres://", "postgresql://"]
        .into_iter()
        .find(|prefix| url.starts_with(prefix));
    let rest = match prefix {
        Some(prefix) => split_uri(url, prefix.len(), &mut params)?,
        None => split_keywords(url, &mut params),
    };
    Ok((rest, params))
}

/// [`split_url`] for `postgres://...?key=value&...`.
fn split_uri<'a>(
    url: &'a str,
    prefix: usize,
    params: &mut TlsParams,
) -> Result<Cow<'a, str>, PluginError> {
    // As tokio-postgres reads it: the credentials end at the first `@`, and
    // the parameters start at the first `?` after them.
    let hosts = url[prefix..].find('@').map_or(prefix, |at| prefix + at + 1);
    let Some(question) = url[hosts..].find('?').map(|at| hosts + at) else {
        return Ok(Cow::Borrowed(url));
    };
    let pairs: Vec<&str> = url[question + 1..].split('&').collect();
    let mut kept = Vec::new();
    for pair in &pairs {
        let slot = pair.split_once('=').and_then(|(key, value)| {
            let key = percent_decode_str(key).decode_utf8_lossy().into_owned();
            Some((params.slot(&key)?, key, value))
        });
        match slot {
            Some((slot, key, value)) => {
                let value = percent_decode_str(value).decode_utf8().map_err(|_| {
                    PluginError::invalid_settings(format!(
                        "url: the value of `{key}` is not UTF-8 once percent-decoded"
                    ))
                })?;
                *slot = Some(value.into_owned());
            }
            None => kept.push(*pair),
        }
    }
    if kept.len() == pairs.len() {
        return Ok(Cow::Borrowed(url));
    }
    let mut rest = url[..question].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok(Cow::Owned(rest))
}

/// [`split_url`] for `key=value key='quoted value' ...`.
fn split_keywords<'a>(url: &'a str, params: &mut TlsParams) -> Cow<'a, str> {
    let Some(pairs) = keyword_pairs(url) else {
        return Cow::Borrowed(url);
    };
    if !pairs.iter().any(|(key, _)| KEYS.contains(&key.as_str())) {
        return Cow::Borrowed(url);
    }
    let mut kept = Vec::new();
    for (key, value) in pairs {
        match params.slot(&key) {
            Some(slot) => *slot = Some(value),
            None => kept.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            )),
        }
    }
    Cow::Owned(kept.join(" "))
}

/// The pairs of a `key=value` connection string, read as tokio-postgres
/// reads them; `None` where it would fail.
fn keyword_pairs(text: &str) -> Option<Vec<(String, String)>> {
    let mut chars = text.chars().peekable();
    let mut pairs = Vec::new();
    let skip_space = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_space(&mut chars);
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            return Some(pairs);
        }
        skip_space(&mut chars);
        chars.next_if_eq(&'=')?;
        skip_space(&mut chars);
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                match c {
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
            if value.is_empty() {
                return None;
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres::Config;

    fn split(url: &str) -> (String, TlsParams) {
        let (rest, params) = split_url(url).expect(url);
        (rest.into_owned(), params)
    }

    #[test]
    fn tls_keys_are_taken_out_of_both_url_forms() {
        let (rest, params) = split(
            "host=db user=app sslmode=verify-full password='it\\'s' \
             sslrootcert = '/etc/my ca.pem' dbname=x",
        );
        assert_eq!(params.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        // The rest reads as it did.
        let before: Config = "host=db user=app password='it\\'s' dbname=x"
            .parse()
            .expect("parses");
        let after: Config = rest.parse().expect("parses");
        assert_eq!(format!("{before:?}"), format!("{after:?}"));

        let (rest, params) = split(
            "postgres://app:p%3Fw@db:6543/x?sslmode=require&application_name=a\
             &sslcert=c%20d.pem&sslkey=k.pem",
        );
        assert_eq!(rest, "postgres://app:p%3Fw@db:6543/x?application_name=a");
        assert_eq!(params.sslmode.as_deref(), Some("require"));
        assert_eq!(params.sslcert.as_deref(), Some("c d.pem"));
        assert_eq!(params.sslkey.as_deref(), Some("k.pem"));

        let (rest, params) = split("postgresql://db/x?sslrootcert=system");
        assert_eq!(rest, "postgresql://db/x");
        assert_eq!(params.sslrootcert.as_deref(), Some("system"));

        // Without TLS keys, or unparsable, the string is left as it is.
        for url in [
            "host=db user=app",
            "postgres://db/x?application_name=a",
            "host='unterminated sslmode=require",
        ] {
            assert_eq!(split(url), (url.to_owned(), TlsParams::default()));
        }
    }
}
