//! The envelope every stored object travels in.
//!
//! Layout, version 1 (integers little-endian; see docs/formats/envelope.md):
//! ```text
//! offset size field
//!  0     8    magic "TERNENV" followed by the version byte 0x01
//!  8     1    kind: 1 chunk, 2 index, 3 manifest, 4 segment
//!  9     1    compression: 0 none, 1 zstd
//! 10     2    reserved, zero
//! 12     4    plaintext length in bytes
//! 16    12    AES-256-GCM nonce (random per object)
//! 28     n    ciphertext of the (compressed) payload
//! 28+n  16    GCM tag
//! ```
//! The 28 header bytes are the GCM associated data, so no header field can be altered
//! without failing authentication. Compression is skipped when it does not shrink the
//! payload.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};

use crate::{ChunkAddress, Error, ErrorKind, Key, Result};

/// Magic and version. NEVER CHANGE the bytes of a released version: a new layout
/// gets a new version byte and the reader keeps accepting the old one.
const MAGIC_V1: [u8; 8] = *b"TERNENV\x01";
const HEADER_LEN: usize = 28;
const TAG_LEN: usize = 16;
/// Bytes an envelope adds to its (compressed) payload.
pub const ENVELOPE_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Largest plaintext an envelope may declare: bounds the allocation a hostile header
/// can cause on open.
const MAX_PLAINTEXT: u32 = 1 << 30;

const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;

/// What an envelope holds. Stored in the header and checked on open, so that an index
/// can never be read as a chunk or the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// A piece of a disk.
    Chunk = 1,
    /// A base index (chunk number -> address).
    Index = 2,
    /// A recovery point manifest.
    Manifest = 3,
    /// A delta segment.
    Segment = 4,
}

impl ObjectKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => ObjectKind::Chunk,
            2 => ObjectKind::Index,
            3 => ObjectKind::Manifest,
            4 => ObjectKind::Segment,
            _ => return None,
        })
    }
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

/// Compress (zstd at `level`, when it helps) and encrypt `plaintext` into an envelope.
pub fn seal(key: &Key, kind: ObjectKind, plaintext: &[u8], level: i32) -> Result<Vec<u8>> {
    let len = u32::try_from(plaintext.len())
        .ok()
        .filter(|&l| l <= MAX_PLAINTEXT)
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "object larger than 1 GiB"))?;
    // One allocation per envelope, sized for the incompressible case: zstd writes
    // straight into it, and a payload that does not shrink is copied in instead.
    let mut out = vec![0u8; HEADER_LEN + plaintext.len() + TAG_LEN];
    out[..8].copy_from_slice(&MAGIC_V1);
    out[8] = kind as u8;
    out[9] = COMPRESSION_NONE;
    out[12..16].copy_from_slice(&len.to_le_bytes());
    let mut nonce = [0u8; 12];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| Error::new(ErrorKind::Io, "no randomness for a nonce"))?;
    out[16..28].copy_from_slice(&nonce);

    let body = &mut out[HEADER_LEN..HEADER_LEN + plaintext.len()];
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        c.set_compression_level(level).ok()?;
        if !worth_compressing(&mut c, plaintext, body) {
            return None;
        }
        c.compress_to_buffer(plaintext, body).ok()
    });
    let payload_len = match compressed {
        Some(n) if n < plaintext.len() => {
            out[9] = COMPRESSION_ZSTD;
            n
        }
        _ => {
            out[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(plaintext);
            plaintext.len()
        }
    };
    out.truncate(HEADER_LEN + payload_len);
    let (header, payload) = out.split_at_mut(HEADER_LEN);
    let tag = cipher(key)
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&*header), payload)
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "encryption failed"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Payloads from this size on are sampled before they are compressed whole.
const SAMPLE_FROM: usize = 256 << 10;
/// Samples taken, spread evenly over the payload, and the length of each.
const SAMPLES: usize = 16;
const SAMPLE_LEN: usize = 4096;

/// Whether compressing `plaintext` whole may pay, judged by compressing evenly spread
/// samples (as borg's `auto` compression judges by a fast trial, and btrfs by its
/// heuristics): yes as soon as one sample shrinks by a tenth. Random data, the bulk of
/// many disks (encrypted or already compressed files), then costs 1/64 of a full
/// attempt instead of a full one that is thrown away. A payload whose compressible
/// parts all fall between samples is stored uncompressed: space lost, never data.
fn worth_compressing(c: &mut zstd::bulk::Compressor<'static>, plaintext: &[u8], scratch: &mut [u8]) -> bool {
    if plaintext.len() < SAMPLE_FROM {
        return true;
    }
    let stride = plaintext.len() / SAMPLES;
    (0..SAMPLES).any(|i| {
        let sample = &plaintext[i * stride..i * stride + SAMPLE_LEN];
        // An error (no room) means the sample did not shrink.
        matches!(c.compress_to_buffer(sample, scratch), Ok(n) if n < SAMPLE_LEN * 9 / 10)
    })
}

thread_local! {
    /// A zstd context per thread: creating one costs more than compressing a small chunk.
    static COMPRESSOR: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(1).expect("zstd context"));
}

fn cipher(key: &Key) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.encryption_key()).expect("32-byte AES-256 key"))
}

/// The address of a chunk's plaintext under `key`.
pub fn chunk_address(key: &Key, plaintext: &[u8]) -> ChunkAddress {
    ChunkAddress(*blake3::keyed_hash(key.address_key(), plaintext).as_bytes())
}

/// Address and envelope of one chunk.
pub fn seal_chunk(key: &Key, plaintext: &[u8], level: i32) -> Result<(ChunkAddress, Vec<u8>)> {
    Ok((chunk_address(key, plaintext), seal(key, ObjectKind::Chunk, plaintext, level)?))
}

/// Check an envelope's header for `kind`: the declared plaintext length and whether the
/// payload is compressed. Nothing is authenticated yet.
fn check_header(kind: ObjectKind, envelope: &[u8]) -> Result<(usize, bool)> {
    if envelope.len() < ENVELOPE_OVERHEAD {
        return Err(corrupt(format!("object is {} bytes, shorter than an envelope header", envelope.len())));
    }
    if envelope[..7] != MAGIC_V1[..7] {
        return Err(corrupt("not a tern object (bad magic)"));
    }
    if envelope[7] != MAGIC_V1[7] {
        return Err(corrupt(format!(
            "envelope version {} is not supported (this tern reads version 1)",
            envelope[7]
        )));
    }
    let found = ObjectKind::from_u8(envelope[8]);
    if found != Some(kind) {
        return Err(corrupt(format!(
            "object holds {found:?} (kind byte {}), expected {kind:?}",
            envelope[8]
        )));
    }
    let compression = envelope[9];
    if compression > COMPRESSION_ZSTD || envelope[10..12] != [0, 0] {
        return Err(corrupt("unknown compression or reserved bits set"));
    }
    let len = u32::from_le_bytes(envelope[12..16].try_into().expect("4 bytes"));
    if len > MAX_PLAINTEXT {
        return Err(corrupt(format!("declared plaintext length {len} is beyond the 1 GiB limit")));
    }
    Ok((len as usize, compression == COMPRESSION_ZSTD))
}

/// Authenticate and decrypt `sealed` (ciphertext and tag, as they follow `header`) in
/// place; the (possibly compressed) payload.
fn decrypt_in_place<'a>(key: &Key, header: &[u8], sealed: &'a mut [u8]) -> Result<&'a mut [u8]> {
    let nonce = Nonce::assume_unique_for_key(header[16..28].try_into().expect("12 bytes"));
    cipher(key)
        .open_in_place(nonce, Aad::from(header), sealed)
        .map_err(|_| corrupt("authentication failed: the object was altered or written with another key"))
}

fn decompress_into(payload: &[u8], out: &mut [u8]) -> Result<()> {
    let n = DECOMPRESSOR
        .with(|d| d.borrow_mut().decompress_to_buffer(payload, out))
        .map_err(|e| corrupt(format!("authenticated payload does not decompress: {e}")))?;
    if n != out.len() {
        return Err(corrupt(format!("payload decompresses to {n} bytes, header says {}", out.len())));
    }
    Ok(())
}

thread_local! {
    /// A zstd decompression context per thread, reused like [`COMPRESSOR`].
    static DECOMPRESSOR: std::cell::RefCell<zstd::bulk::Decompressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().expect("zstd context"));
}

/// Authenticate, decrypt and decompress an envelope that must hold `kind`.
pub fn open_envelope(key: &Key, kind: ObjectKind, envelope: &[u8]) -> Result<Vec<u8>> {
    let (len, compressed) = check_header(kind, envelope)?;
    let (header, sealed) = envelope.split_at(HEADER_LEN);
    let mut copy = sealed.to_vec();
    let payload_len = decrypt_in_place(key, header, &mut copy)?.len();
    copy.truncate(payload_len);
    if compressed {
        let mut plain = vec![0u8; len];
        decompress_into(&copy, &mut plain)?;
        Ok(plain)
    } else if payload_len != len {
        Err(corrupt(format!("payload is {payload_len} bytes, header says {len}")))
    } else {
        Ok(copy)
    }
}

/// Open a chunk envelope and check that its plaintext has address `address`.
pub fn open_chunk(key: &Key, address: &ChunkAddress, envelope: &[u8]) -> Result<Vec<u8>> {
    let (len, _) = check_header(ObjectKind::Chunk, envelope)
        .map_err(|e| Error::new(e.kind(), format!("chunk {address}: {e}")))?;
    let mut plain = vec![0u8; len];
    open_chunk_into(key, address, &mut envelope.to_vec(), &mut plain)?;
    Ok(plain)
}

/// [`open_chunk`] without allocating: `envelope` is decrypted in place (its contents
/// are garbage afterwards) and the plaintext lands in `out`, which must be exactly the
/// plaintext's length (the length the index gives the chunk). For readers that write
/// chunks straight from their own (for instance aligned) buffers.
pub fn open_chunk_into(key: &Key, address: &ChunkAddress, envelope: &mut [u8], out: &mut [u8]) -> Result<()> {
    let in_chunk = |e: Error| Error::new(e.kind(), format!("chunk {address}: {e}"));
    let (len, compressed) = check_header(ObjectKind::Chunk, envelope).map_err(in_chunk)?;
    if len != out.len() {
        return Err(in_chunk(corrupt(format!("holds {len} bytes, {} expected", out.len()))));
    }
    let (header, sealed) = envelope.split_at_mut(HEADER_LEN);
    let payload = decrypt_in_place(key, header, sealed).map_err(in_chunk)?;
    if compressed {
        decompress_into(payload, out).map_err(in_chunk)?;
    } else if payload.len() != len {
        return Err(in_chunk(corrupt(format!("payload is {} bytes, header says {len}", payload.len()))));
    } else {
        out.copy_from_slice(payload);
    }
    check_address(key, address, out)
}

fn check_address(key: &Key, address: &ChunkAddress, plain: &[u8]) -> Result<()> {
    let actual = chunk_address(key, plain);
    if actual != *address {
        return Err(corrupt(format!(
            "chunk {address}: content has address {actual}: the object was swapped"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> Key {
        Key::from_bytes([42; 32])
    }

    #[test]
    fn round_trip_compressible_and_random() {
        let k = key();
        let text = b"hello hello hello hello hello hello hello".repeat(100);
        let (a, env) = seal_chunk(&k, &text, 1).unwrap();
        assert!(env.len() < text.len());
        assert_eq!(open_chunk(&k, &a, &env).unwrap(), text);
        let mut rnd = vec![0u8; 5000];
        SystemRandom::new().fill(&mut rnd).unwrap();
        let (a, env) = seal_chunk(&k, &rnd, 1).unwrap();
        assert_eq!(env.len(), rnd.len() + ENVELOPE_OVERHEAD);
        assert_eq!(open_chunk(&k, &a, &env).unwrap(), rnd);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let k = key();
        let (a, env) = seal_chunk(&k, b"some chunk content, some chunk content", 1).unwrap();
        for i in 0..env.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = env.clone();
                bad[i] ^= bit;
                let e = open_chunk(&k, &a, &bad).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Corrupt, "byte {i}");
            }
        }
        for cut in [0, 10, 27, 43, env.len() - 1] {
            assert_eq!(open_chunk(&k, &a, &env[..cut]).unwrap_err().kind(), ErrorKind::Corrupt);
        }
    }

    #[test]
    fn wrong_key_wrong_kind_and_swapped_chunk_are_refused() {
        let k = key();
        let (a, env) = seal_chunk(&k, b"abc", 1).unwrap();
        let other = Key::from_bytes([1; 32]);
        assert!(open_chunk(&other, &a, &env).unwrap_err().to_string().contains("another key"));
        assert!(open_envelope(&k, ObjectKind::Index, &env)
            .unwrap_err()
            .to_string()
            .contains("expected Index"));
        let (b, _) = seal_chunk(&k, b"xyz", 1).unwrap();
        assert!(open_chunk(&k, &b, &env).unwrap_err().to_string().contains("swapped"));
    }

    #[test]
    fn open_chunk_into_matches_open_chunk_and_refuses_the_same() {
        let k = key();
        let text = b"into into into into into into into into".repeat(200);
        let mut rnd = vec![0u8; 7000];
        SystemRandom::new().fill(&mut rnd).unwrap();
        for plain in [&text[..], &rnd[..]] {
            let (a, env) = seal_chunk(&k, plain, 1).unwrap();
            let mut out = vec![0u8; plain.len()];
            open_chunk_into(&k, &a, &mut env.clone(), &mut out).unwrap();
            assert_eq!(out, plain);
            // Wrong length expected, flipped byte, swapped address, wrong key.
            let mut short = vec![0u8; plain.len() - 1];
            assert!(open_chunk_into(&k, &a, &mut env.clone(), &mut short)
                .unwrap_err()
                .to_string()
                .contains("expected"));
            for i in [0, 9, 20, 40, env.len() - 1] {
                let mut bad = env.clone();
                bad[i] ^= 1;
                assert_eq!(
                    open_chunk_into(&k, &a, &mut bad, &mut out).unwrap_err().kind(),
                    ErrorKind::Corrupt
                );
            }
            let (b, _) = seal_chunk(&k, b"other", 1).unwrap();
            assert!(open_chunk_into(&k, &b, &mut env.clone(), &mut out)
                .unwrap_err()
                .to_string()
                .contains("swapped"));
            let other = Key::from_bytes([1; 32]);
            assert!(open_chunk_into(&other, &a, &mut env.clone(), &mut out)
                .unwrap_err()
                .to_string()
                .contains("another key"));
        }
    }

    #[test]
    fn sampling_skips_random_chunks_and_keeps_mixed_ones_compressed() {
        let k = key();
        let mut rnd = vec![0u8; 4 << 20];
        SystemRandom::new().fill(&mut rnd).unwrap();
        let env = seal(&k, ObjectKind::Chunk, &rnd, 1).unwrap();
        assert_eq!(env[9], COMPRESSION_NONE);
        // One compressible MiB among random ones (disk extents): compressed.
        let mut mixed = rnd.clone();
        let text = b"replica disk sector cluster block chunk store point ".repeat(1 << 15);
        mixed[2 << 20..3 << 20].copy_from_slice(&text[..1 << 20]);
        let env = seal(&k, ObjectKind::Chunk, &mixed, 1).unwrap();
        assert_eq!(env[9], COMPRESSION_ZSTD);
        assert!(env.len() < mixed.len() - (900 << 10), "{}", env.len());
        assert_eq!(open_envelope(&k, ObjectKind::Chunk, &env).unwrap(), mixed);
        // Small objects are always tried whole.
        let small = &text[..1000];
        assert_eq!(seal(&k, ObjectKind::Index, small, 1).unwrap()[9], COMPRESSION_ZSTD);
    }

    #[test]
    fn addresses_depend_on_the_key() {
        assert_ne!(chunk_address(&key(), b"x"), chunk_address(&Key::from_bytes([1; 32]), b"x"));
        assert_ne!(chunk_address(&key(), b"x").0, *blake3::hash(b"x").as_bytes());
    }

    proptest! {
        #[test]
        fn seal_open_round_trips(data in proptest::collection::vec(any::<u8>(), 0..20000), level in 1i32..4) {
            let k = key();
            let env = seal(&k, ObjectKind::Segment, &data, level).unwrap();
            prop_assert_eq!(open_envelope(&k, ObjectKind::Segment, &env).unwrap(), data);
        }

        #[test]
        fn open_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = open_envelope(&key(), ObjectKind::Chunk, &data);
        }
    }
}
