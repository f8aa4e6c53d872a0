//! The broker's TLS identity: a given certificate and key, or a self-signed
//! certificate generated on first start and kept in the data directory, so
//! clients started in the same working directory trust it with no options.

use anyhow::Context;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

/// Folder inside the data directory for the generated identity.
pub const TLS_DIR: &str = "tls";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
/// Secret for QUIC stateless resets, kept across restarts.
pub const RESET_KEY_FILE: &str = "stateless-reset.key";
/// Bytes of the stateless-reset secret.
const RESET_KEY_BYTES: usize = 32;

/// The keys QUIC stateless resets and connection ids are derived from. They survive restarts, so
/// a restarted broker answers packets of its previous incarnation's
/// connections with a reset the client recognises: clients notice the
/// restart at once instead of after their idle timeout.
pub fn stateless_reset_key(data_dir: &Path) -> anyhow::Result<(ring::hmac::Key, u64)> {
    let dir = data_dir.join(TLS_DIR);
    let path = dir.join(RESET_KEY_FILE);
    let secret = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == RESET_KEY_BYTES => bytes,
        _ => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let bytes: [u8; RESET_KEY_BYTES] = rand::random();
            write_private(&path, &bytes)?;
            bytes.to_vec()
        }
    };
    // The connection-id check key comes from the same secret, so the new
    // process recognises the old connection ids as its own and resets them.
    let cid_key = u64::from_le_bytes(secret[..8].try_into().expect("8 bytes"));
    Ok((
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        cid_key,
    ))
}

/// Certificate chain and key for the server, generating them if needed.
/// Returns the path of the certificate clients should trust.
pub fn load_or_generate(
    data_dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<(
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    PathBuf,
)> {
    let (cert_path, key_path) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf()),
        _ => {
            let dir = data_dir.join(TLS_DIR);
            let (c, k) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
            if !c.exists() || !k.exists() {
                generate(&dir, &c, &k)?;
            }
            (c, k)
        }
    };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading certificate {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificate {}", cert_path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no certificate",
        cert_path.display()
    );
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading private key {}", key_path.display()))?;
    Ok((certs, key, cert_path))
}

fn generate(dir: &Path, cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let certified = rcgen::generate_simple_self_signed(names).context("generating certificate")?;
    write_private(key_path, certified.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(cert_path, certified.cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed certificate");
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}
