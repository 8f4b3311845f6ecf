//! The postgres store's TLS against the machine's PostgreSQL
//! (`LLM_HOST_TEST_POSTGRES_URL`, default `host=127.0.0.1 user=postgres
//! dbname=test`) with `ssl = on`. The server's own certificate is the root:
//! its `ssl_cert_file` (Debian's self-signed "snakeoil" certificate), read
//! from this machine's disk, or `LLM_HOST_TEST_POSTGRES_SSLROOTCERT`.
//! Without a server, or without TLS on it, these tests print
//! `skipped: ...`, except under CI (`CI=true`), where they fail.
//!
//! Whether a store's connections are encrypted is read from the server's
//! `pg_stat_ssl`, through the test's own plain connection.

use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use llm_host_conformance::support::save_empty as save;
use llm_host_conformance::{store, support};
use llm_host_plugin_api::{ErrorKind, Plugin, PluginError, SaveOutcome, StoreAdapterBox};
use llm_plugin_postgres::PostgresPlugin;
use postgres::config::Host;

mod common;
use common::{url, Server};

/// A certificate and key of an authority that signed no server's
/// certificate.
fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// The test's server, if it has TLS on, and the file of the certificate it
/// presents.
fn tls_server() -> Option<(Server, String)> {
    let mut server = Server::connect()?;
    let show = |server: &mut Server, name: &str| -> String {
        server
            .client
            .query_one(&format!("SHOW {name}"), &[])
            .map(|row| row.get(0))
            .unwrap_or_default()
    };
    if show(&mut server, "ssl") != "on" {
        support::skip_or_fail("the PostgreSQL server has ssl = off");
        return None;
    }
    let cert = std::env::var("LLM_HOST_TEST_POSTGRES_SSLROOTCERT")
        .unwrap_or_else(|_| show(&mut server, "ssl_cert_file"));
    if !Path::new(&cert).is_absolute() || std::fs::metadata(&cert).is_err() {
        support::skip_or_fail(&format!(
            "cannot read the server's certificate `{cert}` here \
             (set LLM_HOST_TEST_POSTGRES_SSLROOTCERT)"
        ));
        return None;
    }
    Some((server, cert))
}

/// The test server's address, port and credentials, parsed from [`url`].
struct Target {
    ip: IpAddr,
    port: u16,
    user: String,
    dbname: String,
    password: Option<String>,
}

fn target() -> Target {
    let config: postgres::Config = url().parse().expect("the test URL parses");
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let ip = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .map(|addr| addr.ip()),
        _ => None,
    }
    .expect("the test URL names a TCP host");
    Target {
        ip,
        port,
        user: config.get_user().unwrap_or("postgres").to_owned(),
        dbname: config.get_dbname().unwrap_or("postgres").to_owned(),
        password: config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    }
}

impl Target {
    /// A `key=value` URL of the test server under the name `host`, and at
    /// `hostaddr` if given.
    fn url(&self, host: &str, hostaddr: Option<IpAddr>) -> String {
        let quoted =
            |value: &str| format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"));
        let mut url = format!(
            "host={} port={} user={} dbname={}",
            quoted(host),
            self.port,
            quoted(&self.user),
            quoted(&self.dbname)
        );
        if let Some(addr) = hostaddr {
            url.push_str(&format!(" hostaddr={addr}"));
        }
        if let Some(password) = &self.password {
            url.push_str(&format!(" password={}", quoted(password)));
        }
        url
    }
}

/// Every byte but letters and digits as `%XX`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn adapter(settings: &str) -> StoreAdapterBox {
    PostgresPlugin::new_store(settings).unwrap_or_else(|err| panic!("{settings}: {err}"))
}

/// The error of a store that cannot connect.
fn connect_error(store: &StoreAdapterBox) -> PluginError {
    let err = store
        .ping()
        .into_result()
        .expect_err("the connection is refused");
    assert_eq!(err.kind, ErrorKind::UNAVAILABLE, "{err}");
    err
}

/// Saves through `store` and checks that its connections use TLS or not.
fn assert_works(server: &mut Server, store: &StoreAdapterBox, encrypted: bool, what: &str) {
    assert_eq!(
        save(store, "s", 0, "k"),
        SaveOutcome::Saved { version: 1 },
        "{what}"
    );
    assert!(store.delete("s".into()).into_result().expect("delete"));
    let seen = server.tls_in_use();
    assert!(
        !seen.is_empty() && seen.iter().all(|&tls| tls == encrypted),
        "{what}: TLS on the store's connections: {seen:?}"
    );
}

#[test]
fn require_and_the_default_encrypt_and_disable_does_not() {
    for (extra, encrypted) in [
        (r#""sslmode": "require""#, true),
        ("", true),
        (r#""sslmode": "prefer""#, true),
        (r#""sslmode": "disable""#, false),
    ] {
        let Some((mut server, _)) = tls_server() else {
            return;
        };
        let store = server.adapter(extra);
        assert_works(&mut server, &store, encrypted, extra);
    }
}

#[test]
fn verify_ca_checks_the_chain_but_not_the_name() {
    let Some((mut server, cert)) = tls_server() else {
        return;
    };
    // The test URL's host (127.0.0.1) is not the certificate's name.
    let store = server.adapter(&format!(
        r#""sslmode": "verify-ca", "sslrootcert": {cert:?}"#
    ));
    assert_works(&mut server, &store, true, "verify-ca");

    // Another authority as the root: refused, naming the file. `require`
    // checks the chain too once sslrootcert is given, as libpq does.
    let wrong = fixture("not-the-server-ca.pem");
    for mode in ["verify-ca", "require"] {
        let store = server.adapter(&format!(r#""sslmode": "{mode}", "sslrootcert": {wrong:?}"#));
        let err = connect_error(&store);
        eprintln!("refused: {err}");
        assert!(
            err.message.ends_with(&format!(
                ": cannot connect: sslmode = {mode}: the server's certificate is not signed \
                 by a certificate in sslrootcert `{wrong}`"
            )),
            "{err}"
        );
    }

    // No root at all: refused when the store is built.
    let Err(err) = PostgresPlugin::new_store(&server.settings(r#""sslmode": "verify-ca""#)) else {
        panic!("verify-ca without sslrootcert was accepted");
    };
    assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{err}");
    assert!(
        err.message
            .starts_with("sslmode: `verify-ca` checks the server's certificate against sslrootcert, which is not set"),
        "{err}"
    );
}

#[test]
fn verify_full_checks_the_name_too() {
    let Some((mut server, cert)) = tls_server() else {
        return;
    };
    let target = target();
    let extra = format!(r#""sslmode": "verify-full", "sslrootcert": {cert:?}"#);

    // By address: the certificate names a host, not the address.
    let ip = target.ip.to_string();
    let store = adapter(&server.settings_for(&target.url(&ip, None), &extra));
    let err = connect_error(&store);
    let prefix = "cannot connect: sslmode = verify-full: the server's certificate is for `";
    let Some(at) = err.message.find(prefix) else {
        panic!("not a name mismatch: {err}");
    };
    eprintln!("refused: {err}");
    assert!(err.message.ends_with(&format!("`, not `{ip}`")), "{err}");
    let name = err.message[at + prefix.len()..]
        .split('`')
        .next()
        .unwrap_or_default()
        .to_owned();

    // By the certificate's name: accepted. Where the name does not lead to
    // the server here, `hostaddr` does, and the name is still what is checked.
    let resolves = (name.as_str(), target.port)
        .to_socket_addrs()
        .map(|mut addrs| addrs.any(|addr| addr.ip() == target.ip))
        .unwrap_or(false);
    if !resolves {
        eprintln!("`{name}` does not resolve to {ip} here: connecting with hostaddr={ip}");
    }
    let by_name = target.url(&name, (!resolves).then_some(target.ip));
    let store = adapter(&server.settings_for(&by_name, &extra));
    assert_works(
        &mut server,
        &store,
        true,
        &format!("verify-full as `{name}`"),
    );

    // The Mozilla roots signed no self-signed certificate; "system" makes
    // verify-full the default.
    let store = adapter(&server.settings_for(&by_name, r#""sslrootcert": "system""#));
    let err = connect_error(&store);
    assert!(
        err.message.ends_with(
            "cannot connect: sslmode = verify-full: the server's certificate is not signed by \
             any root of sslrootcert = \"system\" (the Mozilla roots compiled into the plugin)"
        ),
        "{err}"
    );
}

#[test]
fn tls_settings_may_be_written_in_the_url() {
    let Some((mut server, cert)) = tls_server() else {
        return;
    };
    let target = target();
    let ip = target.ip.to_string();
    let keywords = format!(
        "{} sslmode=verify-ca sslrootcert='{cert}'",
        target.url(&ip, None)
    );
    let store = adapter(&server.settings_for(&keywords, ""));
    assert_works(&mut server, &store, true, "key=value URL");
    drop(store);

    let credentials = match &target.password {
        Some(password) => format!(
            "{}:{}",
            percent_encode(&target.user),
            percent_encode(password)
        ),
        None => percent_encode(&target.user),
    };
    let uri = format!(
        "postgresql://{credentials}@{ip}:{}/{}?sslmode=verify-ca&sslrootcert={}",
        target.port,
        percent_encode(&target.dbname),
        percent_encode(&cert)
    );
    let store = adapter(&server.settings_for(&uri, ""));
    assert_works(&mut server, &store, true, "postgresql:// URL");

    // One key in both places is refused.
    let Err(err) = PostgresPlugin::new_store(&server.settings_for(&uri, r#""sslmode": "require""#))
    else {
        panic!("sslmode given twice was accepted");
    };
    assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{err}");
    assert!(err.message.starts_with("sslmode: given both"), "{err}");
}

#[test]
fn a_client_certificate_is_sent_from_a_private_key_file() {
    let Some((mut server, cert)) = tls_server() else {
        return;
    };
    let dir: PathBuf =
        std::env::temp_dir().join(format!("llm-host-postgres-tls-{}", support::unique_token()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key = dir.join("client.key");
    std::fs::copy(fixture("not-the-server-ca.key"), &key).expect("copy the key");
    let key = key.display().to_string();
    let chmod = |mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    let pem = fixture("not-the-server-ca.pem");
    let settings = server.settings(&format!(
        r#""sslmode": "require", "sslcert": {pem:?}, "sslkey": {key:?}"#
    ));

    // The server asks for no client certificate, and the store connects.
    chmod(0o600);
    let store = adapter(&settings);
    assert_works(&mut server, &store, true, "with a client certificate");

    // A key others may read, as a checkout leaves it: refused, as libpq does.
    chmod(0o644);
    let Err(err) = PostgresPlugin::new_store(&settings) else {
        panic!("a key readable by others was accepted");
    };
    assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{err}");
    assert_eq!(
        err.message,
        format!(
            "sslkey: `{key}` is open to others (mode 644): make it 0600, or 0640 owned by root"
        )
    );

    // A key that is not the certificate's.
    chmod(0o600);
    let Err(err) = PostgresPlugin::new_store(&server.settings(&format!(
        r#""sslmode": "require", "sslcert": {cert:?}, "sslkey": {key:?}"#
    ))) else {
        panic!("a key of another certificate was accepted");
    };
    assert!(
        err.message.starts_with(&format!(
            "sslkey: `{key}` does not go with sslcert `{cert}`"
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn conforms_over_tls() {
    let Some((server, _)) = tls_server() else {
        return;
    };
    let settings = server.settings(r#""sslmode": "require""#);
    let results = store::assert_store_conforms(&|| PostgresPlugin::new_store(&settings));
    eprintln!("{}", store::report(&results));
}

#[test]
fn tls_settings_are_checked_when_the_store_is_built() {
    for (extra, message) in [
        (
            r#""sslmode": "allow""#,
            "sslmode: `allow` is not one of disable, prefer, require, verify-ca, verify-full",
        ),
        (
            r#""sslmode": "verify-full""#,
            "sslmode: `verify-full` checks the server's certificate against sslrootcert, which \
             is not set (a PEM file of the authority that signed it, or \"system\")",
        ),
        (
            r#""sslmode": "require", "sslrootcert": "system""#,
            "sslmode: `require` is too weak for sslrootcert = \"system\", whose roots sign \
             certificates for anyone's host names: use verify-full",
        ),
        (
            r#""sslrootcert": "/nonexistent/root.pem""#,
            "sslrootcert: cannot read `/nonexistent/root.pem`: No such file or directory \
             (os error 2)",
        ),
        (
            r#""sslcert": "/nonexistent/client.pem""#,
            "sslkey: not set, and sslcert needs its private key",
        ),
        (r#""sslmod": "require""#, "unknown field `sslmod`"),
    ] {
        let json = format!(r#"{{"url": "host=127.0.0.1", {extra}}}"#);
        let Err(err) = PostgresPlugin::new_store(&json) else {
            panic!("{json} was accepted");
        };
        assert_eq!(err.kind, ErrorKind::INVALID_SETTINGS, "{json}");
        assert!(err.message.contains(message), "{json}: {err}");
    }
}
