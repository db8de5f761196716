//! TLS for tests: a throwaway CA made with `rcgen` ([`TestCa`]), certificates
//! it signs, and a local HTTPS server ([`https_server`]) that serves an axum
//! router, optionally asking for a client certificate signed by a given CA.
//! Every request it serves carries the client certificate's DER (if any) as
//! a [`PeerCert`] extension.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower::Service;

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl Pem {
    /// Writes `<name>.crt` and `<name>.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, &self.cert).unwrap();
        std::fs::write(&k, &self.key).unwrap();
        (c, k)
    }
}

/// A certificate authority made for one test.
pub struct TestCa {
    /// The CA certificate, PEM.
    pub cert: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap().pem();
        TestCa {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str], cn: &str) -> Pem {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, cn: &str) -> Pem {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Pem {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// The client certificate of the connection a request came on (DER), if any.
#[derive(Clone, Debug)]
pub struct PeerCert(pub Option<Vec<u8>>);

/// Serves `router` over TLS on 127.0.0.1 with `server`'s certificate; asks
/// for (and requires) a client certificate signed by `client_ca` when given.
pub async fn https_server(router: Router, server: &Pem, client_ca: Option<&str>) -> SocketAddr {
    super::client(); // the process-wide rustls provider
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(server.cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(server.key.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return; // a client without the right certificate
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec());
                let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                    let mut router = router.clone();
                    req.extensions_mut().insert(PeerCert(peer.clone()));
                    async move {
                        let resp = router.call(req.map(Body::new)).await;
                        resp.map_err(|e: Infallible| match e {})
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// The subject common name in a DER certificate, for assertions (a plain
/// search for the CN attribute; the test certificates have one).
pub fn common_name(der: &[u8]) -> Option<String> {
    // OID 2.5.4.3 (commonName) = 06 03 55 04 03, then a string tag and length
    let oid = [0x06, 0x03, 0x55, 0x04, 0x03];
    let mut found = None;
    for i in 0..der.len().saturating_sub(oid.len() + 2) {
        if der[i..i + oid.len()] == oid {
            let len = der[i + oid.len() + 1] as usize;
            let start = i + oid.len() + 2;
            found = der
                .get(start..start + len)
                .map(|b| String::from_utf8_lossy(b).into_owned());
        }
    }
    found // the last one: the subject comes after the issuer
}
