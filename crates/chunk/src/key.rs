//! The store key: one 256-bit master secret per store, kept in a key file on the
//! hosts and never written to the store in the clear.
//!
//! Subkeys are derived with BLAKE3's key derivation mode, one context string per use,
//! so that the address of a chunk and its encryption never share key material.
//!
//! Key file (text, mode 0600):
//! ```text
//! tern-key v1
//! <64 lowercase hex digits>
//! ```

use std::fmt;
use std::io::Write;
use std::path::Path;

use crate::{Error, ErrorKind, Result};

/// Context strings for subkey derivation. NEVER CHANGE: changing one changes every
/// address or makes every stored object unreadable.
const CTX_ADDRESS: &str = "tern 2026-11 chunk address v1";
const CTX_ENCRYPT: &str = "tern 2026-11 envelope aes-256-gcm v1";
const CTX_KEY_ID: &str = "tern 2026-11 key id v1";

const FILE_HEADER: &str = "tern-key v1";

/// A store key with its derived subkeys.
#[derive(Clone)]
pub struct Key {
    master: [u8; 32],
    address: [u8; 32],
    encrypt: [u8; 32],
}

/// A public fingerprint of a key: safe to store beside the data, so that a wrong key
/// is reported as such instead of as corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 16]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for KeyId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).map_err(|_| {
            Error::new(ErrorKind::InvalidInput, format!("{s:?} is not a key id (32 hex digits)"))
        })?;
        Ok(KeyId(out))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(id {})", self.id())
    }
}

impl Key {
    /// A key from its 32 master bytes.
    pub fn from_bytes(master: [u8; 32]) -> Self {
        Key {
            master,
            address: blake3::derive_key(CTX_ADDRESS, &master),
            encrypt: blake3::derive_key(CTX_ENCRYPT, &master),
        }
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self> {
        let mut master = [0u8; 32];
        use ring::rand::{SecureRandom, SystemRandom};
        SystemRandom::new()
            .fill(&mut master)
            .map_err(|_| Error::new(ErrorKind::Io, "no randomness for a new key"))?;
        Ok(Self::from_bytes(master))
    }

    /// The key's public fingerprint.
    pub fn id(&self) -> KeyId {
        let d = blake3::derive_key(CTX_KEY_ID, &self.master);
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        KeyId(id)
    }

    pub(crate) fn address_key(&self) -> &[u8; 32] {
        &self.address
    }

    pub(crate) fn encryption_key(&self) -> &[u8; 32] {
        &self.encrypt
    }

    /// The key file's text.
    pub fn to_file_text(&self) -> String {
        format!("{FILE_HEADER}\n{}\n", hex::encode(self.master))
    }

    /// Parse a key file's text.
    pub fn from_file_text(text: &str) -> Result<Self> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(FILE_HEADER) {
            return Err(Error::new(
                ErrorKind::Key,
                format!("not a tern key file (first line must be {FILE_HEADER:?})"),
            ));
        }
        let hexkey = lines.next().ok_or_else(|| Error::new(ErrorKind::Key, "key file has no key line"))?;
        let mut master = [0u8; 32];
        hex::decode_to_slice(hexkey, &mut master)
            .map_err(|_| Error::new(ErrorKind::Key, "key line is not 64 hex digits"))?;
        if lines.next().is_some() {
            return Err(Error::new(ErrorKind::Key, "key file has extra lines"));
        }
        Ok(Self::from_bytes(master))
    }

    /// Load a key file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(ErrorKind::Key, format!("cannot read key file {}: {e}", path.display()))
        })?;
        Self::from_file_text(&text)
            .map_err(|e| Error::new(ErrorKind::Key, format!("key file {}: {e}", path.display())))
    }

    /// Write the key file at `path` with mode 0600, refusing to replace an existing file.
    pub fn save_new(&self, path: &Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |e: std::io::Error| {
            Error::new(ErrorKind::Io, format!("cannot write key file {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
        f.write_all(self.to_file_text().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// Load the key at `path`, or create it there if there is no file yet.
    /// Returns the key and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool)> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let key = Self::generate()?;
        key.save_new(path)?;
        Ok((key, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let (k, created) = Key::load_or_create(&p).unwrap();
        assert!(created);
        let (k2, created) = Key::load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(k.id(), k2.id());
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(k.save_new(&p).is_err(), "never overwrites a key file");
    }

    #[test]
    fn malformed_key_files_are_refused() {
        for bad in ["", "tern-key v1\n", "tern-key v2\n00", "tern-key v1\nzz\n", "tern-key v1\n00\nextra"] {
            let e = Key::from_file_text(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Key, "{bad:?}");
        }
    }

    #[test]
    fn subkeys_differ() {
        let k = Key::from_bytes([7; 32]);
        assert_ne!(k.address_key(), k.encryption_key());
        assert_ne!(&k.address_key()[..16], &k.id().0[..]);
    }
}
