//! The on-disk encoding. Every byte layout here is described in `docs/FORMAT.md`; offsets and
//! sizes come from the named constants below. All integers are little-endian.

pub(crate) mod group;
pub(crate) mod index;
pub(crate) mod manifest;
pub(crate) mod meta;
pub(crate) mod state;

use std::path::Path;

use crate::error::{Corruption, Error, ErrorKind, Result};
pub(crate) use crate::transfer::{from_ms, to_ms};

/// The format version this build writes, and the newest it reads.
pub const FORMAT_VERSION: u16 = 2;

/// Magic at the start of the store's `FORMAT` file.
pub(crate) const STORE_MAGIC: [u8; 8] = *b"waybill\n";
/// Size of the `FORMAT` file: magic (8), version (2), reserved (2), CRC-32 of bytes 0..12 (4).
pub(crate) const STORE_FORMAT_LEN: usize = 16;
const STORE_VERSION_AT: usize = 8;
const STORE_CRC_AT: usize = 12;

/// Encodes the `FORMAT` file.
pub(crate) fn encode_store_format() -> [u8; STORE_FORMAT_LEN] {
    let mut b = [0u8; STORE_FORMAT_LEN];
    let (head, tail) = b.split_at_mut(STORE_CRC_AT);
    let (magic, rest) = head.split_at_mut(STORE_VERSION_AT);
    magic.copy_from_slice(&STORE_MAGIC);
    let (version, _reserved) = rest.split_at_mut(2);
    version.copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    tail.copy_from_slice(&crc32fast::hash(head).to_le_bytes());
    b
}

/// Checks the `FORMAT` file and returns its version.
pub(crate) fn decode_store_format(path: &Path, bytes: &[u8]) -> Result<u16> {
    let found = fixed::<8>(bytes, 0);
    if found != STORE_MAGIC {
        return Err(Error::corrupt(
            path,
            Corruption::BadMagic {
                expected: first4(&STORE_MAGIC),
                found: first4(&found),
            },
        ));
    }
    if bytes.len() != STORE_FORMAT_LEN {
        return Err(Error::corrupt(
            path,
            Corruption::Length {
                slot: None,
                found: bytes.len() as u64,
                max: STORE_FORMAT_LEN as u64,
            },
        ));
    }
    let stored = u32::from_le_bytes(fixed::<4>(bytes, STORE_CRC_AT));
    let computed = crc32fast::hash(bytes.get(..STORE_CRC_AT).unwrap_or_default());
    if stored != computed {
        return Err(Error::corrupt(
            path,
            Corruption::Checksum {
                slot: None,
                expected: stored,
                found: computed,
            },
        ));
    }
    let version = u16::from_le_bytes(fixed::<2>(bytes, STORE_VERSION_AT));
    if version > FORMAT_VERSION || version == 0 {
        return Err(ErrorKind::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        }
        .into());
    }
    Ok(version)
}

/// Copies `N` bytes at `at`, zero-filling whatever lies past the end of `bytes`.
pub(crate) fn fixed<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = at
            .checked_add(i)
            .and_then(|j| bytes.get(j))
            .copied()
            .unwrap_or(0);
    }
    out
}

fn first4(b: &[u8]) -> [u8; 4] {
    fixed::<4>(b, 0)
}

/// Decodes a postcard body and requires that it is consumed exactly.
pub(crate) fn decode_exact<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(format!("{} trailing bytes", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_format_round_trips_and_refuses_newer() -> Result<()> {
        let p = Path::new("FORMAT");
        let b = encode_store_format();
        assert_eq!(decode_store_format(p, &b)?, FORMAT_VERSION);
        let mut newer = b;
        newer[STORE_VERSION_AT] = 0xe7; // 999
        newer[STORE_VERSION_AT + 1] = 0x03;
        let crc = crc32fast::hash(&newer[..STORE_CRC_AT]).to_le_bytes();
        newer[STORE_CRC_AT..].copy_from_slice(&crc);
        let err = decode_store_format(p, &newer).expect_err("newer version must be refused");
        assert!(matches!(
            err.kind(),
            ErrorKind::UnsupportedVersion { found: 999, .. }
        ));
        let mut flipped = b;
        flipped[3] ^= 1;
        assert!(decode_store_format(p, &flipped).is_err_and(|e| e.is_corrupt()));
        Ok(())
    }
}

/// `#[serde(with = "bytes")]` for `Vec<u8>`: the same postcard bytes as serde's default (a
/// length, then the bytes), read with one copy instead of one byte at a time.
pub(crate) mod bytes {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub(crate) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: Error>(self, b: &[u8]) -> Result<Vec<u8>, E> {
                Ok(b.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, b: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(b)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<u8>()? {
                    v.push(x);
                }
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}
