//! The master key and authenticated encryption of small secrets at rest.
//!
//! Guarantees:
//! - The master key is 32 random bytes from a file or an environment variable, held in zeroizing
//!   memory, never logged (its `Debug` prints nothing of it).
//! - Each use gets its own subkey, HMAC-SHA256(master, purpose), so the master key itself never
//!   encrypts data.
//! - Sealed values are AES-256-GCM with a random 96-bit nonce and associated data binding them to
//!   their place (e.g. tenant and grant id); moved or altered ciphertext does not open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;

/// What a subkey is for; each purpose has its own key.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// Device codes of pending grants (they let anyone holding them collect the approver's tokens).
    DeviceCode,
    /// Tenant data keys (which in turn seal secret values).
    DataKeyWrap,
    /// The master key's public fingerprint.
    KeyId,
    /// The MAC key of the audit chain.
    Audit,
    /// The PKCE verifier and nonce of a sign-in at a tenant's IdP, while it is in progress.
    SignIn,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::DeviceCode => b"custodian/device-code/v1",
            Purpose::DataKeyWrap => b"custodian/data-key-wrap/v1",
            Purpose::KeyId => b"custodian/key-id/v1",
            Purpose::Audit => b"custodian/audit-chain/v1",
            Purpose::SignIn => b"custodian/sign-in/v1",
        }
    }
}

/// The gateway's master key.
pub struct MasterKey(Zeroizing<[u8; KEY_BYTES]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no master key: set secrets.master_key_file, or the environment variable named by secrets.master_key_env (generate one with `custodian admin master-key generate`)"
    )]
    Missing,
    #[error("cannot read the master key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the master key must be 32 bytes, base64-encoded ({0})")]
    Malformed(&'static str),
    #[error("sealed value does not open (altered, moved, or sealed under another key)")]
    Open,
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        rand::rng().fill_bytes(key.as_mut_slice());
        Self(key)
    }

    /// Parses the base64 text form.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| KeyError::Malformed("not base64"))?,
        );
        let array: [u8; KEY_BYTES] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Malformed("wrong length"))?;
        Ok(Self(Zeroizing::new(array)))
    }

    /// The base64 text form, for writing a new key file once.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0.as_slice()))
    }

    /// Loads the key from `file` if given, else from the environment variable `env_name` as found
    /// in `env`.
    pub fn load(
        file: Option<&std::path::Path>,
        env_name: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, KeyError> {
        if let Some(path) = file {
            let text =
                Zeroizing::new(
                    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                        path: path.display().to_string(),
                        source,
                    })?,
                );
            return Self::from_base64(&text);
        }
        let value = env
            .into_iter()
            .find(|(name, _)| name == env_name)
            .map(|(_, value)| Zeroizing::new(value))
            .ok_or(KeyError::Missing)?;
        Self::from_base64(&value)
    }

    pub(crate) fn subkey(&self, purpose: Purpose) -> Zeroizing<[u8; KEY_BYTES]> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_slice())
            .expect("HMAC takes keys of any length");
        mac.update(purpose.label());
        let mut subkey = Zeroizing::new([0u8; KEY_BYTES]);
        subkey.copy_from_slice(&mac.finalize().into_bytes());
        subkey
    }

    /// A public fingerprint of this key (which key wraps what), safe to store and show.
    pub fn id(&self) -> String {
        hex::encode(&self.subkey(Purpose::KeyId)[..8])
    }

    /// Encrypts `plaintext` bound to `aad`; returns base64(nonce || ciphertext).
    pub fn seal(&self, purpose: Purpose, aad: &str, plaintext: &[u8]) -> String {
        seal_with(&self.subkey(purpose), aad, plaintext)
    }

    /// Decrypts what [`MasterKey::seal`] produced with the same purpose and `aad`.
    pub fn open(
        &self,
        purpose: Purpose,
        aad: &str,
        sealed: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        open_with(&self.subkey(purpose), aad, sealed)
    }
}

/// A tenant's data key: seals secret values; stored only wrapped by the master key.
pub struct DataKey(Zeroizing<[u8; KEY_BYTES]>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        rand::rng().fill_bytes(key.as_mut_slice());
        Self(key)
    }

    /// The data key sealed under the master key, bound to `aad`.
    pub fn wrap(&self, master: &MasterKey, aad: &str) -> String {
        master.seal(Purpose::DataKeyWrap, aad, self.0.as_slice())
    }

    pub fn unwrap_with(master: &MasterKey, aad: &str, wrapped: &str) -> Result<Self, KeyError> {
        let bytes = master.open(Purpose::DataKeyWrap, aad, wrapped)?;
        let array: [u8; KEY_BYTES] = bytes.as_slice().try_into().map_err(|_| KeyError::Open)?;
        Ok(Self(Zeroizing::new(array)))
    }

    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> String {
        seal_with(&self.0, aad, plaintext)
    }

    pub fn open(&self, aad: &str, sealed: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        open_with(&self.0, aad, sealed)
    }
}

fn seal_with(key: &[u8; KEY_BYTES], aad: &str, plaintext: &[u8]) -> String {
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rng().fill_bytes(&mut nonce);
    let ciphertext = Aes256Gcm::new_from_slice(key)
        .expect("a 32-byte key")
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: aad.as_bytes(),
            },
        )
        .expect("AES-GCM encryption of a small value cannot fail");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ciphertext);
    STANDARD.encode(out)
}

fn open_with(
    key: &[u8; KEY_BYTES],
    aad: &str,
    sealed: &str,
) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let raw = STANDARD.decode(sealed).map_err(|_| KeyError::Open)?;
    if raw.len() < NONCE_BYTES {
        return Err(KeyError::Open);
    }
    let (nonce, ciphertext) = raw.split_at(NONCE_BYTES);
    let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| KeyError::Open)?;
    Aes256Gcm::new_from_slice(key)
        .expect("a 32-byte key")
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: ciphertext,
                aad: aad.as_bytes(),
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| KeyError::Open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_in_their_place_under_their_key() {
        let key = MasterKey::generate();
        let sealed = key.seal(Purpose::DeviceCode, "acme/gr_1", b"device-code-canary");
        assert!(!sealed.contains("device-code-canary"));
        let opened = key.open(Purpose::DeviceCode, "acme/gr_1", &sealed).unwrap();
        assert_eq!(opened.as_slice(), b"device-code-canary");
        assert!(key.open(Purpose::DeviceCode, "acme/gr_2", &sealed).is_err());
        assert!(
            MasterKey::generate()
                .open(Purpose::DeviceCode, "acme/gr_1", &sealed)
                .is_err()
        );
        let mut altered = STANDARD.decode(&sealed).unwrap();
        *altered.last_mut().unwrap() ^= 1;
        assert!(
            key.open(Purpose::DeviceCode, "acme/gr_1", &STANDARD.encode(altered))
                .is_err()
        );
    }

    #[test]
    fn keys_load_from_text_and_refuse_bad_lengths() {
        let key = MasterKey::generate();
        let text = key.to_base64();
        let env = vec![("K".to_owned(), text.to_string())];
        let loaded = MasterKey::load(None, "K", env).unwrap();
        let sealed = key.seal(Purpose::DeviceCode, "a", b"x");
        assert!(loaded.open(Purpose::DeviceCode, "a", &sealed).is_ok());
        assert!(matches!(
            MasterKey::from_base64("c2hvcnQ="),
            Err(KeyError::Malformed(_))
        ));
        assert!(matches!(
            MasterKey::load(None, "K", vec![]),
            Err(KeyError::Missing)
        ));
        assert_eq!(format!("{key:?}"), "MasterKey(..)");
    }
}
