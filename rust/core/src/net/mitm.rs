//! TLS interception for credential substitution: an ephemeral CA made for one sandbox (its key
//! never leaves the supervisor), leaf certificates for the hosts the sandbox reaches, and the
//! client side that verifies upstream servers against the host's trust store or a CA bundle.
//!
//! Only HTTP/1.1 is offered by ALPN on both sides: the proxy reads the requests it forwards.

use super::allow::Host;
use crate::{Error, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

/// Where the host's CA bundle usually is (the first that exists is used).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// At most this many leaf configurations are kept (one per host reached).
const MAX_LEAVES: usize = 256;

/// The CA of one sandbox and the TLS configurations made from it.
pub(crate) struct Tls {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    ca_der: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    client: Arc<ClientConfig>,
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Credential(format!("{what}: {e}"))
}

impl Tls {
    /// Makes a fresh CA and the upstream client configuration (trusting `ca_bundle`, a PEM
    /// file, or else the host's bundle).
    pub(crate) fn new(ca_bundle: Option<&str>) -> Result<Tls> {
        // ring: builds with a C compiler only (aws-lc-rs needs cmake); its deprecation is
        // about post-quantum key exchange, which neither side here needs.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_key = KeyPair::generate().map_err(|e| tls_err("make the sandbox CA key", e))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "cellblock sandbox CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params
            .self_signed(&ca_key)
            .map_err(|e| tls_err("make the sandbox CA", e))?;
        let ca_der = ca.der().clone();

        let bundle = match ca_bundle {
            Some(p) => p.to_string(),
            None => SYSTEM_BUNDLES
                .iter()
                .find(|p| std::path::Path::new(p).is_file())
                .ok_or_else(|| {
                    Error::Credential(
                        "no CA bundle on the host to verify upstream servers with (give \
                         tls_ca_bundle)"
                            .into(),
                    )
                })?
                .to_string(),
        };
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&bundle)
            .map_err(|e| tls_err(&format!("tls_ca_bundle {bundle}"), e))?;
        for cert in certs {
            let cert = cert.map_err(|e| tls_err(&format!("tls_ca_bundle {bundle}"), e))?;
            // A bundle may hold certificates webpki cannot use; the others still count.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(Error::Credential(format!(
                "tls_ca_bundle {bundle}: no usable CA certificate"
            )));
        }
        let mut client = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS client", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            ca,
            ca_key,
            ca_der,
            provider,
            client: Arc::new(client),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate in PEM, for the sandbox's trust store.
    pub(crate) fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The server configuration presenting a leaf certificate for `host`.
    fn server_config(&self, host: &Host) -> std::result::Result<Arc<ServerConfig>, String> {
        let name = host.to_string();
        if let Some(c) = super::lock(&self.leaves).get(&name) {
            return Ok(Arc::clone(c));
        }
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(vec![name.clone()]).map_err(|e| e.to_string())?;
        params.distinguished_name.push(DnType::CommonName, &name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .map_err(|e| e.to_string())?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.ca_der.clone()], der)
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut leaves = super::lock(&self.leaves);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(name, Arc::clone(&config));
        Ok(config)
    }

    /// Completes the TLS handshake with the sandbox's client, as `host`.
    pub(crate) fn accept<S: Read + Write>(
        &self,
        host: &Host,
        mut sock: S,
    ) -> std::result::Result<rustls::StreamOwned<ServerConnection, S>, String> {
        let config = self.server_config(host)?;
        let mut conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
        }
        Ok(rustls::StreamOwned::new(conn, sock))
    }

    /// Opens TLS to the upstream server `host` over `tcp`, verifying its certificate.
    pub(crate) fn connect(
        &self,
        host: &Host,
        mut tcp: TcpStream,
    ) -> std::result::Result<rustls::StreamOwned<ClientConnection, TcpStream>, String> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        let mut conn =
            ClientConnection::new(Arc::clone(&self.client), name).map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
        }
        Ok(rustls::StreamOwned::new(conn, tcp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_a_ca_and_leaves() {
        let tls = Tls::new(None).unwrap_or_else(|e| panic!("{e}"));
        assert!(tls.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let host = Host::parse("api.example.com").unwrap_or_else(|| panic!("host"));
        let a = tls.server_config(&host).unwrap_or_else(|e| panic!("{e}"));
        let b = tls.server_config(&host).unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(&a, &b), "leaves are cached per host");
        let ip = Host::parse("127.0.0.1").unwrap_or_else(|| panic!("host"));
        assert!(tls.server_config(&ip).is_ok());
    }

    #[test]
    fn a_missing_bundle_is_a_credential_error() {
        let e = Tls::new(Some("/nonexistent/bundle.pem")).err();
        assert!(matches!(e, Some(Error::Credential(_))), "{e:?}");
    }
}
