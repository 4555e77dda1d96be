//! Encryption of store records at rest: the only module that touches
//! cryptography. XChaCha20-Poly1305 from RustCrypto; a random 192-bit
//! nonce per write, so nonces never repeat in practice; the record's key
//! (the session name) bound as associated data, so a record copied under
//! another name fails to open.
//!
//! Where the 32-byte key comes from, in order:
//! 1. the systemd credential `store-key` (`$CREDENTIALS_DIRECTORY/store-key`);
//! 2. the key file named in the configuration;
//! 3. `key` in the store folder, created 0600 with a fresh random key when
//!    the store itself is new.
//!
//! A key file holds the 32 bytes raw, or as 64 hexadecimal digits.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// The first byte of every sealed value: the format, so that a later format
/// can be told apart.
const FORMAT: u8 = 1;
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the store key from {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the store key in {0} is not 32 bytes (raw) or 64 hexadecimal digits")]
    BadKey(PathBuf),
    #[error("cannot create the store key at {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a sealed value is damaged, or was sealed with another key")]
    Open,
}

/// Where the key came from, for the log and for error messages.
#[derive(Debug, Clone)]
pub enum KeySource {
    SystemdCredential(PathBuf),
    ConfiguredFile(PathBuf),
    StoreFile(PathBuf),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::SystemdCredential(p) => write!(f, "systemd credential {}", p.display()),
            KeySource::ConfiguredFile(p) => write!(f, "configured key file {}", p.display()),
            KeySource::StoreFile(p) => write!(f, "key file {}", p.display()),
        }
    }
}

pub struct Sealer {
    cipher: XChaCha20Poly1305,
    pub source: KeySource,
}

impl Sealer {
    /// Finds the key as the module documentation describes. The store-folder
    /// key is created only when `may_create` (the store is new): creating a
    /// fresh key for a store that has data would lock that data away.
    pub fn find_key(
        store_dir: &Path,
        configured: Option<&Path>,
        may_create: bool,
    ) -> Result<Option<Sealer>, SealError> {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join("store-key");
            if path.exists() {
                return Ok(Some(Sealer::from_file(
                    &path,
                    KeySource::SystemdCredential(path.clone()),
                )?));
            }
        }
        if let Some(path) = configured {
            return Ok(Some(Sealer::from_file(
                path,
                KeySource::ConfiguredFile(path.into()),
            )?));
        }

        let path = store_dir.join("key");
        if path.exists() {
            return Ok(Some(Sealer::from_file(
                &path,
                KeySource::StoreFile(path.clone()),
            )?));
        }
        if !may_create {
            return Ok(None);
        }
        create_key_file(&path)?;
        Ok(Some(Sealer::from_file(
            &path,
            KeySource::StoreFile(path.clone()),
        )?))
    }

    fn from_file(path: &Path, source: KeySource) -> Result<Sealer, SealError> {
        let bytes = Zeroizing::new(fs::read(path).map_err(|source| SealError::Read {
            path: path.to_path_buf(),
            source,
        })?);
        let key = parse_key(&bytes).ok_or_else(|| SealError::BadKey(path.to_path_buf()))?;
        Ok(Sealer::from_key(&key, source))
    }

    pub fn from_key(key: &[u8; 32], source: KeySource) -> Sealer {
        Sealer {
            cipher: XChaCha20Poly1305::new(key.into()),
            source,
        }
    }

    /// `FORMAT || nonce || ciphertext+tag`, bound to `context`.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory input");

        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        sealed.push(FORMAT);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    /// The plaintext of a value sealed with this key and `context`.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != FORMAT {
            return Err(SealError::Open);
        }
        let (nonce, ciphertext) = sealed[1..].split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealError::Open)
    }
}

/// An Argon2id hash of the lock passphrase (PHC string, salted).
pub fn hash_passphrase(passphrase: &token_agent_proto::Secret) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};

    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(passphrase.expose().as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| format!("cannot hash the passphrase: {err}"))
}

/// Whether `passphrase` matches a hash from [`hash_passphrase`].
pub fn verify_passphrase(hash: &str, passphrase: &token_agent_proto::Secret) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};

    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(passphrase.expose().as_bytes(), &parsed)
            .is_ok()
    })
}

fn parse_key(bytes: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() == 32 {
        key.copy_from_slice(bytes);
        return Some(key);
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// Writes 32 random bytes to a new owner-only file; never replaces one.
fn create_key_file(path: &Path) -> Result<(), SealError> {
    let mut key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(&mut key[..]);
    let create_err = |source| SealError::Create {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(create_err)?;
    file.write_all(&key[..]).map_err(create_err)?;
    file.sync_all().map_err(create_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(byte: u8) -> Sealer {
        Sealer::from_key(&[byte; 32], KeySource::StoreFile("test".into()))
    }

    #[test]
    fn a_sealed_value_opens_with_the_same_key_and_context_only() {
        let sealed = sealer(1).seal(b"work", b"rt-secret");
        assert_eq!(
            sealer(1).open(b"work", &sealed).unwrap().as_slice(),
            b"rt-secret"
        );
        assert!(sealer(2).open(b"work", &sealed).is_err());
        assert!(sealer(1).open(b"home", &sealed).is_err());
    }

    #[test]
    fn sealing_hides_the_plaintext_and_uses_a_fresh_nonce() {
        let a = sealer(1).seal(b"work", b"rt-secret-value");
        let b = sealer(1).seal(b"work", b"rt-secret-value");
        assert_ne!(a, b);
        assert!(!a.windows(9).any(|w| w == b"rt-secret"));
    }

    #[test]
    fn damaged_values_do_not_open() {
        let mut sealed = sealer(1).seal(b"work", b"x");
        *sealed.last_mut().unwrap() ^= 1;
        assert!(sealer(1).open(b"work", &sealed).is_err());
        assert!(sealer(1).open(b"work", &[FORMAT]).is_err());
        assert!(sealer(1).open(b"work", &[]).is_err());
    }

    #[test]
    fn a_passphrase_hash_accepts_that_passphrase_only() {
        use token_agent_proto::Secret;
        let hash = hash_passphrase(&Secret::new("correct horse")).unwrap();
        assert!(!hash.contains("correct horse"));
        assert!(verify_passphrase(&hash, &Secret::new("correct horse")));
        assert!(!verify_passphrase(&hash, &Secret::new("wrong horse")));
    }

    #[test]
    fn keys_are_read_raw_or_as_hex() {
        assert!(parse_key(&[7u8; 32]).is_some());
        let hex = "ab".repeat(32) + "\n";
        assert_eq!(*parse_key(hex.as_bytes()).unwrap(), [0xab; 32]);
        assert!(parse_key(b"short").is_none());
        assert!(parse_key("zz".repeat(32).as_bytes()).is_none());
    }

    #[test]
    fn the_store_key_is_created_owner_only_and_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(Sealer::find_key(dir.path(), None, false).unwrap().is_none());

        Sealer::find_key(dir.path(), None, true).unwrap().unwrap();
        let key_path = dir.path().join("key");
        let mode = fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let first = fs::read(&key_path).unwrap();
        Sealer::find_key(dir.path(), None, true).unwrap().unwrap();
        assert_eq!(fs::read(&key_path).unwrap(), first);
    }
}
