//! TLS for the postgres store: libpq's `sslmode`, `sslrootcert`, `sslcert`
//! and `sslkey`, over rustls with its ring provider.
//!
//! The four keys come from the store's settings or from `url` (either form);
//! they are taken out of `url` before tokio-postgres parses it, since it
//! knows only `disable`, `prefer` and `require` and none of the files. The
//! files are read when the store is built; relative paths are taken from the
//! host's base dir.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | when the server offers it | not checked; with `sslrootcert`, its chain is |
//! | `require` | always | as with `prefer` |
//! | `verify-ca` | always | its chain must end at a root in `sslrootcert` |
//! | `verify-full` | always | that, and it must name the host connected to |
//!
//! Whatever the mode, the handshake must be signed by the key of the
//! certificate the server sent. `prefer` goes on without TLS only when the
//! server answers that it has none; a handshake that fails is an error.
//! `sslrootcert = "system"` takes the Mozilla roots compiled into the plugin
//! (webpki-roots); as in libpq, it makes `verify-full` the default and
//! weaker modes are refused. Host names are checked against the
//! certificate's subjectAltName entries only. No channel binding is offered:
//! SCRAM authenticates without `-PLUS`.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use llm_host_plugin_api::{self as api, PluginError};
use postgres::config::{ChannelBinding, Host, SslMode as WireMode};
use postgres::tls::{self as pg_tls, MakeTlsConnect, TlsConnect};
use postgres::{Config, Socket};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;

/// The keys this module takes, in settings and in `url`.
pub(crate) const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// How the store uses TLS: libpq's `sslmode`, without `allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never.
    Disable,
    /// When the server offers it.
    Prefer,
    /// Always, without checking the certificate (unless `sslrootcert` is set).
    Require,
    /// Always; the certificate's chain must end at a root in `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The mode as libpq writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<Self, PluginError> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str() == value)
            .ok_or_else(|| {
                let valid: Vec<&str> = Self::ALL.map(SslMode::as_str).into();
                invalid(format!(
                    "sslmode: `{value}` is not one of {}",
                    valid.join(", ")
                ))
            })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn invalid(message: impl Into<String>) -> PluginError {
    PluginError::invalid_settings(message.into())
}

/// The TLS keys as written, in the settings or in `url`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
}

impl TlsParams {
    pub fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "sslmode" => Some(&mut self.sslmode),
            "sslrootcert" => Some(&mut self.sslrootcert),
            "sslcert" => Some(&mut self.sslcert),
            "sslkey" => Some(&mut self.sslkey),
            _ => None,
        }
    }

    /// These keys (the settings') with those `url` gave; a key given in
    /// both is refused.
    pub fn merge(mut self, mut url: TlsParams) -> Result<Self, PluginError> {
        for key in KEYS {
            let from_url = url.slot(key).and_then(Option::take);
            if let (Some(slot), Some(value)) = (self.slot(key), from_url) {
                if slot.is_some() {
                    return Err(invalid(format!(
                        "{key}: given both as a setting and in `url`; keep one"
                    )));
                }
                *slot = Some(value);
            }
        }
        Ok(self)
    }
}

/// The TLS side of connecting, as `Config::connect` takes it.
#[derive(Clone)]
pub(crate) struct Tls {
    mode: SslMode,
    /// `None` with `disable`.
    config: Option<Arc<ClientConfig>>,
    /// `sslrootcert` (its path resolved), for messages.
    rootcert: Option<Arc<str>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("sslmode", &self.mode)
            .field("sslrootcert", &self.rootcert)
            .finish()
    }
}

impl Tls {
    /// Checks `params` and reads the files they name.
    pub fn new(params: TlsParams) -> Result<Self, PluginError> {
        let system = params.sslrootcert.as_deref() == Some("system");
        let mode = match params.sslmode.as_deref() {
            Some(value) => SslMode::parse(value)?,
            None if system => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if system && mode != SslMode::VerifyFull {
            return Err(invalid(format!(
                "sslmode: `{mode}` is too weak for sslrootcert = \"system\", whose roots sign \
                 certificates for anyone's host names: use verify-full"
            )));
        }
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && params.sslrootcert.is_none() {
            return Err(invalid(format!(
                "sslmode: `{mode}` checks the server's certificate against sslrootcert, which \
                 is not set (a PEM file of the authority that signed it, or \"system\")"
            )));
        }
        match (&params.sslcert, &params.sslkey) {
            (Some(_), None) => {
                return Err(invalid(
                    "sslkey: not set, and sslcert needs its private key",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "sslcert: not set, and sslkey needs its certificate",
                ))
            }
            _ => {}
        }
        if mode == SslMode::Disable {
            return Ok(Self {
                mode,
                config: None,
                rootcert: None,
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let verifier: Arc<dyn ServerCertVerifier> = match params.sslrootcert.as_deref() {
            None => Arc::new(AnyCertificate(algorithms)),
            Some(path) => {
                let roots = Arc::new(roots(path)?);
                if mode == SslMode::VerifyFull {
                    WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                        .build()
                        .map_err(|err| invalid(format!("sslrootcert: {err}")))?
                } else {
                    Arc::new(ChainOnly { roots, algorithms })
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| PluginError::internal(format!("setting up TLS: {err}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&params.sslcert, &params.sslkey) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certificates("sslcert", cert)?, private_key(key)?)
                .map_err(|err| {
                    invalid(format!(
                        "sslkey: `{key}` does not go with sslcert `{cert}`: {err}"
                    ))
                })?,
            _ => builder.with_no_client_auth(),
        };
        // What PostgreSQL 17 requires of a direct TLS handshake; earlier
        // servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Self {
            mode,
            config: Some(Arc::new(config)),
            rootcert: params.sslrootcert.map(|path| match path.as_str() {
                "system" => path.into(),
                _ => api::host::resolve_path(&path).display().to_string().into(),
            }),
        })
    }

    /// The mode in force.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Sets `config` up for this TLS: its sslmode, and the names TLS checks.
    pub fn apply(&self, config: &mut Config) -> Result<(), PluginError> {
        // The server offers no TLS over a Unix socket; libpq ignores sslmode
        // there.
        let hosts = config.get_hosts();
        let sockets_only = !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_)));
        let mode = if sockets_only {
            SslMode::Disable
        } else {
            self.mode
        };
        config.ssl_mode(match mode {
            SslMode::Disable => WireMode::Disable,
            SslMode::Prefer => WireMode::Prefer,
            _ => WireMode::Require,
        });
        if mode == SslMode::Disable {
            return Ok(());
        }
        // tokio-postgres checks the certificate against `host` and has no TLS
        // without one: with only `hostaddr`, the address stands in.
        if config.get_hosts().is_empty() {
            for addr in config.get_hostaddrs().to_vec() {
                config.host(&addr.to_string());
            }
        }
        if config.get_channel_binding() == ChannelBinding::Require {
            return Err(invalid(
                "url: channel_binding=require cannot be met: the plugin's TLS offers no \
                 channel binding",
            ));
        }
        Ok(())
    }

    /// The message for a connection that failed on TLS, naming the setting;
    /// `None` for other failures.
    pub fn explain(&self, err: &postgres::Error) -> Option<String> {
        let cause = err.source()?;
        if let Some(ours) = cause.downcast_ref::<TlsError>() {
            return Some(ours.to_string());
        }
        // tokio-postgres's words for a server that answered the TLS request
        // with no.
        (cause.to_string() == "server does not support TLS")
            .then(|| format!("sslmode = {}: the server does not offer TLS", self.mode))
    }

    fn error(&self, what: impl fmt::Display) -> TlsError {
        TlsError(format!("sslmode = {}: {what}", self.mode))
    }

    /// A failed handshake with `host`, in words.
    fn handshake_error(&self, host: &str, err: io::Error) -> TlsError {
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return self.error(format_args!("TLS handshake failed: {err}"));
        };
        let rustls::Error::InvalidCertificate(problem) = tls else {
            return self.error(format_args!("TLS handshake failed: {tls}"));
        };
        match problem {
            CertificateError::NotValidForNameContext { presented, .. } if presented.is_empty() => {
                self.error(format_args!(
                    "the server's certificate names no host, so not `{host}`"
                ))
            }
            CertificateError::NotValidForNameContext { presented, .. } => {
                let names: Vec<String> = presented
                    .iter()
                    .map(|name| format!("`{}`", presented_name(name)))
                    .collect();
                self.error(format_args!(
                    "the server's certificate is for {}, not `{host}`",
                    names.join(", ")
                ))
            }
            CertificateError::NotValidForName => {
                self.error(format_args!("the server's certificate is not for `{host}`"))
            }
            CertificateError::UnknownIssuer => match self.rootcert.as_deref() {
                Some("system") => self.error(
                    "the server's certificate is not signed by any root of sslrootcert = \
                     \"system\" (the Mozilla roots compiled into the plugin)",
                ),
                Some(path) => self.error(format_args!(
                    "the server's certificate is not signed by a certificate in sslrootcert \
                     `{path}`"
                )),
                None => self.error("the server's certificate has an unknown issuer"),
            },
            _ => self.error(format_args!("the server's certificate is refused: {tls}")),
        }
    }
}

/// A name as webpki lists a certificate's names: `DnsName("db")` is `db`,
/// `IpAddress(10.0.0.1)` is `10.0.0.1`.
fn presented_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|rest| rest.strip_suffix("\")"))
        .or_else(|| {
            name.strip_prefix("IpAddress(")
                .and_then(|rest| rest.strip_suffix(')'))
        })
        .unwrap_or(name)
}

/// A file named in a setting, read whole.
fn read(key: &str, path: &str) -> Result<(PathBuf, Vec<u8>), PluginError> {
    let resolved = api::host::resolve_path(path);
    let bytes = std::fs::read(&resolved).map_err(|err| {
        invalid(format!(
            "{key}: cannot read `{}`: {err}",
            resolved.display()
        ))
    })?;
    Ok((resolved, bytes))
}

/// The certificates of a PEM file, in order.
fn certificates(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, PluginError> {
    let (resolved, pem) = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| {
            invalid(format!(
                "{key}: `{}` is not a PEM file: {err}",
                resolved.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{key}: `{}` holds no certificate (no -----BEGIN CERTIFICATE----- block)",
            resolved.display()
        )));
    }
    Ok(certs)
}

/// The roots `sslrootcert` names.
fn roots(path: &str) -> Result<RootCertStore, PluginError> {
    if path == "system" {
        return Ok(RootCertStore::from_iter(
            webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
        ));
    }
    let mut roots = RootCertStore::empty();
    for (n, cert) in certificates("sslrootcert", path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|err| {
            invalid(format!(
                "sslrootcert: certificate {} in `{path}` cannot be a root: {err}",
                n + 1
            ))
        })?;
    }
    Ok(roots)
}

/// The private key `sslkey` names: PKCS#8, PKCS#1 or SEC1, unencrypted.
fn private_key(path: &str) -> Result<PrivateKeyDer<'static>, PluginError> {
    let (resolved, pem) = read("sslkey", path)?;
    check_key_access(&resolved)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| {
        invalid(format!(
            "sslkey: `{}` holds no unencrypted PEM private key: {err}",
            resolved.display()
        ))
    })
}

/// libpq's rule for key files: no access for others, and for the group
/// none, or reading only when root owns the file.
#[cfg(unix)]
fn check_key_access(path: &Path) -> Result<(), PluginError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let forbidden = if meta.uid() == 0 { 0o037 } else { 0o077 };
    if meta.mode() & forbidden != 0 {
        return Err(invalid(format!(
            "sslkey: `{}` is open to others (mode {:o}): make it 0600, or 0640 owned by root",
            path.display(),
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_access(_: &Path) -> Result<(), PluginError> {
    Ok(())
}

/// `prefer` and `require` without `sslrootcert`: any certificate, whose key
/// must sign the handshake.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`, and `prefer` or `require` with `sslrootcert`: the
/// certificate's chain must end at one of `roots` and be valid now; its
/// names are not checked. This is rustls's `WebPkiServerVerifier` without
/// its last step, the name check.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A TLS failure, in words that name the setting.
#[derive(Debug)]
pub(crate) struct TlsError(String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for TlsError {}

impl MakeTlsConnect<Socket> for Tls {
    type Stream = TlsStream;
    type TlsConnect = Handshake;
    type Error = TlsError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Handshake, TlsError> {
        // Called for every connection, TLS or not (over a Unix socket with an
        // empty host): the name is checked when a handshake starts.
        Ok(Handshake {
            tls: self.clone(),
            host: host.to_owned(),
        })
    }
}

/// One connection's TLS handshake.
pub(crate) struct Handshake {
    tls: Tls,
    host: String,
}

impl TlsConnect<Socket> for Handshake {
    type Stream = TlsStream;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream, TlsError>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let Some(config) = self.tls.config.clone() else {
                return Err(self.tls.error("TLS is off"));
            };
            let name = ServerName::try_from(self.host.clone()).map_err(|_| {
                self.tls.error(format_args!(
                    "`{}` is not a host name or address a certificate can be for",
                    self.host
                ))
            })?;
            TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map(TlsStream)
                .map_err(|err| self.tls.handshake_error(&self.host, err))
        })
    }
}

/// A TLS connection to the server.
pub(crate) struct TlsStream(tokio_rustls::client::TlsStream<Socket>);

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl pg_tls::TlsStream for TlsStream {
    fn channel_binding(&self) -> pg_tls::ChannelBinding {
        pg_tls::ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_in_both_places_and_unknown_modes_are_refused() {
        let settings = TlsParams {
            sslmode: Some("require".into()),
            ..TlsParams::default()
        };
        let url = TlsParams {
            sslmode: Some("disable".into()),
            ..TlsParams::default()
        };
        let err = settings.clone().merge(url).expect_err("twice");
        assert!(err.message.starts_with("sslmode: given both"), "{err}");
        let url = TlsParams {
            sslrootcert: Some("ca.pem".into()),
            ..TlsParams::default()
        };
        let merged = settings.merge(url).expect("merged");
        assert_eq!(merged.sslrootcert.as_deref(), Some("ca.pem"));

        let err = Tls::new(TlsParams {
            sslmode: Some("allow".into()),
            ..TlsParams::default()
        })
        .expect_err("allow");
        assert_eq!(
            err.message,
            "sslmode: `allow` is not one of disable, prefer, require, verify-ca, verify-full"
        );
    }

    #[test]
    fn modes_and_their_requirements() {
        let tls = |mode: Option<&str>, rootcert: Option<&str>| {
            Tls::new(TlsParams {
                sslmode: mode.map(Into::into),
                sslrootcert: rootcert.map(Into::into),
                ..TlsParams::default()
            })
        };
        assert_eq!(tls(None, None).expect("default").mode(), SslMode::Prefer);
        assert_eq!(
            tls(None, Some("system")).expect("system").mode(),
            SslMode::VerifyFull
        );
        for (mode, rootcert, start) in [
            ("verify-ca", None, "sslmode: `verify-ca` checks"),
            ("verify-full", None, "sslmode: `verify-full` checks"),
            (
                "verify-ca",
                Some("system"),
                "sslmode: `verify-ca` is too weak",
            ),
            ("require", Some("system"), "sslmode: `require` is too weak"),
            (
                "verify-ca",
                Some("/nonexistent/ca.pem"),
                "sslrootcert: cannot read `/nonexistent/ca.pem`",
            ),
            (
                "verify-ca",
                Some("Cargo.toml"),
                "sslrootcert: `Cargo.toml` holds no certificate",
            ),
        ] {
            let err = tls(Some(mode), rootcert).expect_err(mode);
            assert!(err.message.starts_with(start), "{mode}: {err}");
        }
        let err = Tls::new(TlsParams {
            sslcert: Some("c.pem".into()),
            ..TlsParams::default()
        })
        .expect_err("no key");
        assert!(err.message.starts_with("sslkey: not set"), "{err}");
    }

    #[test]
    fn a_hostaddr_alone_stands_in_for_the_host_and_sockets_skip_tls() {
        let tls = Tls::new(TlsParams::default()).expect("prefer");
        let mut config: Config = "hostaddr=10.1.2.3 user=a".parse().expect("parses");
        tls.apply(&mut config).expect("applies");
        assert_eq!(config.get_hosts(), [Host::Tcp("10.1.2.3".into())]);
        assert_eq!(config.get_ssl_mode(), WireMode::Prefer);

        let mut config: Config = "host=/run/postgresql user=a".parse().expect("parses");
        tls.apply(&mut config).expect("applies");
        assert_eq!(config.get_ssl_mode(), WireMode::Disable);

        let mut config: Config = "host=db channel_binding=require".parse().expect("parses");
        let err = tls.apply(&mut config).expect_err("no channel binding");
        assert!(err.message.starts_with("url: channel_binding"), "{err}");
    }

    /// A server on 127.0.0.1 that answers the TLS request with `answer`,
    /// then closes; and the mode's connection error, explained.
    fn refused_by(answer: &'static [u8], mode: &str) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().expect("accept");
            let mut request = [0; 8];
            socket.read_exact(&mut request).expect("the TLS request");
            socket.write_all(answer).expect("answer");
        });
        let tls = Tls::new(TlsParams {
            sslmode: Some(mode.into()),
            ..TlsParams::default()
        })
        .expect("tls");
        let mut config: Config = format!("host=127.0.0.1 port={port} user=a")
            .parse()
            .expect("parses");
        tls.apply(&mut config).expect("applies");
        let err = config.connect(tls.clone()).err().expect("refused");
        server.join().expect("server");
        tls.explain(&err)
            .unwrap_or_else(|| format!("unexplained: {err}"))
    }

    #[test]
    fn a_server_without_tls_or_with_a_broken_one_is_named() {
        assert_eq!(
            refused_by(b"N", "require"),
            "sslmode = require: the server does not offer TLS"
        );
        let broken = refused_by(b"Snot a TLS record", "require");
        assert!(
            broken.starts_with("sslmode = require: TLS handshake failed: "),
            "{broken}"
        );
    }

    #[test]
    fn webpki_names_read_plainly() {
        assert_eq!(presented_name("DnsName(\"db.internal\")"), "db.internal");
        assert_eq!(presented_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(presented_name("DirectoryName"), "DirectoryName");
    }
}
