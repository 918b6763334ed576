//! Mutual TLS with the swarm's own PKI, so that only members of this swarm
//! can follow a manager's view, and a worker follows only managers.
//!
//! Every node holds, under its dockerd's data root, `swarm/certificates/`:
//! the swarm's root CA (`swarm-root-ca.crt`), and its node certificate and
//! key (`swarm-node.crt`, `swarm-node.key`), issued by that CA with the
//! node's role as a DNS name (`swarm-manager` or `swarm-worker`) and its
//! node id as another. So:
//! - a manager's meshd serves with its node certificate and asks every
//!   client for a certificate chaining to the root CA (any node of the
//!   swarm, and no one else);
//! - a worker's meshd presents its node certificate and accepts a server
//!   only if its certificate chains to the root CA and names
//!   `swarm-manager`, which only managers' certificates do.
//!
//! The files are read again for every connection: Docker renews node
//! certificates (every 90 days by default) and may rotate the root CA
//! (the file then holds old and new). An autolocked swarm keeps the key
//! encrypted; meshd cannot use it and says so.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The DNS name only managers' node certificates carry.
pub const MANAGER_NAME: &str = "swarm-manager";

/// Where a node's swarm certificates are.
#[derive(Clone, Debug)]
pub struct SwarmPki {
    pub dir: PathBuf,
}

/// What a node's certificate files hold.
struct Loaded {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// Drops PEM header lines ("kek-version: 0", "raft-dek: ..."), which
/// swarmkit writes into the key file and plain PEM parsers refuse.
fn strip_headers(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.contains(':') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl SwarmPki {
    /// The certificates of the dockerd whose data root is `data_root`.
    pub fn under(data_root: &Path) -> SwarmPki {
        SwarmPki {
            dir: data_root.join("swarm/certificates"),
        }
    }

    fn read(&self, name: &str) -> Result<String> {
        let p = self.dir.join(name);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }

    fn load(&self) -> Result<Loaded> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.read("swarm-root-ca.crt")?.as_bytes()) {
            roots
                .add(c.context("swarm-root-ca.crt")?)
                .context("swarm-root-ca.crt")?;
        }
        if roots.is_empty() {
            bail!(
                "{}: no certificate",
                self.dir.join("swarm-root-ca.crt").display()
            );
        }
        let chain = CertificateDer::pem_slice_iter(self.read("swarm-node.crt")?.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("swarm-node.crt")?;
        let key_pem = self.read("swarm-node.key")?;
        if key_pem.contains("ENCRYPTED") {
            bail!(
                "{}: the key is encrypted (an autolocked swarm); meshd cannot use it",
                self.dir.join("swarm-node.key").display()
            );
        }
        let key = PrivateKeyDer::from_pem_slice(strip_headers(&key_pem).as_bytes())
            .context("swarm-node.key")?;
        Ok(Loaded {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    /// A manager's side: its node certificate, and a client certificate
    /// from this swarm required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let l = self.load()?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(l.roots, provider())
                .build()
                .context("building the client verifier")?;
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(l.chain, l.key)
            .context("the node certificate and key")?;
        Ok(Arc::new(cfg))
    }

    /// A worker's side: its node certificate, and a server accepted only
    /// as a manager of this swarm.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let l = self.load()?;
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(l.roots)
            .with_client_auth_cert(l.chain, l.key)
            .context("the node certificate and key")?;
        Ok(Arc::new(cfg))
    }

    /// The name a worker checks the server's certificate for.
    pub fn manager_name() -> ServerName<'static> {
        ServerName::try_from(MANAGER_NAME).expect("a DNS name")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swarmkit_key_headers_are_dropped() {
        let pem = "-----BEGIN PRIVATE KEY-----\nkek-version: 0\nraft-dek: abc\n\nMIGH\nAgEA\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            strip_headers(pem),
            "-----BEGIN PRIVATE KEY-----\nMIGH\nAgEA\n-----END PRIVATE KEY-----\n"
        );
    }
}
