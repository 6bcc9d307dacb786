//! The manifest file: a 16-byte header and a postcard body, written once.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{decode_exact, fixed, from_ms, meta, to_ms};
use crate::error::{Corruption, Error, ErrorKind, Result};
use crate::transfer::{Header, Kind, Manifest, PayloadFacts, Request, RetryPolicy, TransferId};

pub(crate) const MAGIC: [u8; 4] = *b"WBMF";
pub(crate) const VERSION: u16 = 1;
/// Header: magic (4), version (2), reserved (2), body length (4), CRC-32 of the body (4).
pub(crate) const HEADER_LEN: usize = 16;
const VERSION_AT: usize = 4;
const RESERVED_AT: usize = 6;
const LEN_AT: usize = 8;
const CRC_AT: usize = 12;
/// The largest manifest body accepted, written or read.
pub(crate) const MAX_BODY: usize = 256 * 1024;
/// The largest manifest file accepted.
pub(crate) const MAX_FILE: u64 = (HEADER_LEN + MAX_BODY) as u64;

#[derive(Serialize, Deserialize)]
pub(crate) struct RequestV1 {
    pub method: String,
    pub url: String,
    /// `(name, value)`; `None` marks a secret header whose value is not stored.
    pub headers: Vec<(String, Option<String>)>,
}

#[derive(Serialize, Deserialize)]
enum PayloadV1 {
    None,
    Written {
        len: u64,
    },
    Copied {
        len: u64,
    },
    Linked {
        len: u64,
        dev: u64,
        ino: u64,
        mtime_ns: i128,
    },
}

#[derive(Serialize, Deserialize)]
enum KindV1 {
    Upload,
    Download,
}

#[derive(Serialize, Deserialize)]
struct ManifestV1 {
    id: [u8; 16],
    kind: KindV1,
    session: String,
    request: RequestV1,
    group: Option<String>,
    created_ms: u64,
    deadline_ms: Option<u64>,
    max_attempts: u32,
    initial_backoff_ms: u64,
    max_backoff_ms: u64,
    payload: PayloadV1,
    idempotency_key: String,
    metadata: Vec<u8>,
}

impl RequestV1 {
    pub(crate) fn from_request(r: &Request) -> Self {
        RequestV1 {
            method: r.method.clone(),
            url: r.url.clone(),
            headers: r
                .headers
                .iter()
                .map(|h| (h.name.clone(), (!h.secret).then(|| h.value.clone())))
                .collect(),
        }
    }

    pub(crate) fn into_request(self) -> Request {
        Request {
            method: self.method,
            url: self.url,
            headers: self
                .headers
                .into_iter()
                .map(|(name, value)| Header {
                    name,
                    secret: value.is_none(),
                    value: value.unwrap_or_default(),
                })
                .collect(),
        }
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Encodes a manifest file: header and body.
pub(crate) fn encode(m: &Manifest) -> Result<Vec<u8>> {
    let metadata = meta::encode(&m.metadata).map_err(Error::invalid)?;
    let v = ManifestV1 {
        id: *m.id.as_bytes(),
        kind: match m.kind {
            Kind::Upload => KindV1::Upload,
            Kind::Download => KindV1::Download,
        },
        session: m.session.clone(),
        request: RequestV1::from_request(&m.request),
        group: m.group.clone(),
        created_ms: to_ms(m.created),
        deadline_ms: m.deadline.map(to_ms),
        max_attempts: m.retry.max_attempts,
        initial_backoff_ms: ms(m.retry.initial_backoff),
        max_backoff_ms: ms(m.retry.max_backoff),
        payload: match m.payload {
            PayloadFacts::None => PayloadV1::None,
            PayloadFacts::Written { len } => PayloadV1::Written { len },
            PayloadFacts::Copied { len } => PayloadV1::Copied { len },
            PayloadFacts::Linked {
                len,
                dev,
                ino,
                mtime_ns,
            } => PayloadV1::Linked {
                len,
                dev,
                ino,
                mtime_ns,
            },
        },
        idempotency_key: m.idempotency_key.clone(),
        metadata,
    };
    let body = postcard::to_allocvec(&v)
        .map_err(|e| Error::invalid(format!("manifest does not encode: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(Error::invalid(format!(
            "the manifest would be {} bytes; the limit is {MAX_BODY}",
            body.len()
        )));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The body of a manifest file, after the header's checks. `path` is only used in errors.
fn body<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a [u8]> {
    let corrupt = |detail| Err(Error::corrupt(path, detail));
    let magic = fixed::<4>(bytes, 0);
    if magic != MAGIC {
        return corrupt(Corruption::BadMagic {
            expected: MAGIC,
            found: magic,
        });
    }
    if bytes.len() < HEADER_LEN {
        return corrupt(Corruption::Truncated {
            needed: HEADER_LEN as u64,
            found: bytes.len() as u64,
        });
    }
    let version = u16::from_le_bytes(fixed::<2>(bytes, VERSION_AT));
    let reserved = u16::from_le_bytes(fixed::<2>(bytes, RESERVED_AT));
    if reserved != 0 {
        // Outside the checksum, so checked here: a flipped bit must not go unnoticed.
        return corrupt(Corruption::Decode {
            slot: None,
            reason: format!("reserved header bytes are {reserved:#06x}, not zero"),
        });
    }
    let len = u32::from_le_bytes(fixed::<4>(bytes, LEN_AT)) as usize;
    let stored = u32::from_le_bytes(fixed::<4>(bytes, CRC_AT));
    if len > MAX_BODY {
        return corrupt(Corruption::Length {
            slot: None,
            found: len as u64,
            max: MAX_BODY as u64,
        });
    }
    let Some(body) = bytes.get(HEADER_LEN..HEADER_LEN + len) else {
        return corrupt(Corruption::Truncated {
            needed: (HEADER_LEN + len) as u64,
            found: bytes.len() as u64,
        });
    };
    if bytes.len() != HEADER_LEN + len {
        return corrupt(Corruption::Length {
            slot: None,
            found: bytes.len() as u64,
            max: (HEADER_LEN + len) as u64,
        });
    }
    let computed = crc32fast::hash(body);
    if computed != stored {
        return corrupt(Corruption::Checksum {
            slot: None,
            expected: stored,
            found: computed,
        });
    }
    if version != VERSION {
        return Err(ErrorKind::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: VERSION,
        }
        .into());
    }
    Ok(body)
}

/// Decodes a whole manifest file. `path` is only used in errors.
pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest> {
    let body = body(path, bytes)?;
    let decode_err =
        |reason: String| Error::corrupt(path, Corruption::Decode { slot: None, reason });
    let v: ManifestV1 = decode_exact(body).map_err(decode_err)?;
    let metadata = meta::decode(&v.metadata).map_err(decode_err)?;
    Ok(Manifest {
        id: TransferId::from_bytes(v.id),
        kind: kind(v.kind),
        session: v.session,
        request: v.request.into_request(),
        group: v.group,
        created: from_ms(v.created_ms),
        deadline: v.deadline_ms.map(from_ms),
        retry: retry(v.max_attempts, v.initial_backoff_ms, v.max_backoff_ms),
        payload: match v.payload {
            PayloadV1::None => PayloadFacts::None,
            PayloadV1::Written { len } => PayloadFacts::Written { len },
            PayloadV1::Copied { len } => PayloadFacts::Copied { len },
            PayloadV1::Linked {
                len,
                dev,
                ino,
                mtime_ns,
            } => PayloadFacts::Linked {
                len,
                dev,
                ino,
                mtime_ns,
            },
        },
        idempotency_key: v.idempotency_key,
        metadata,
    })
}

#[derive(Deserialize)]
struct RequestView<'a> {
    method: &'a str,
    url: &'a str,
    #[serde(borrow)]
    headers: Vec<(&'a str, Option<&'a str>)>,
}

/// [`ManifestV1`] borrowed from the bytes: the same fields in the same order (so the same
/// bytes decode, or fail to, exactly as they do there), nothing copied.
#[derive(Deserialize)]
struct ManifestView<'a> {
    id: [u8; 16],
    kind: KindV1,
    session: &'a str,
    #[serde(borrow)]
    request: RequestView<'a>,
    #[serde(borrow)]
    #[allow(dead_code, reason = "decoded to check the bytes, not read")]
    group: Option<&'a str>,
    #[allow(dead_code, reason = "decoded to check the bytes, not read")]
    created_ms: u64,
    deadline_ms: Option<u64>,
    max_attempts: u32,
    initial_backoff_ms: u64,
    max_backoff_ms: u64,
    #[allow(dead_code, reason = "decoded to check the bytes, not read")]
    payload: PayloadV1,
    idempotency_key: &'a str,
    metadata: &'a [u8],
}

/// What the planner reads of a manifest, borrowed from its bytes.
#[derive(Debug, Clone)]
pub(crate) struct ManifestRef<'a> {
    pub(crate) id: TransferId,
    pub(crate) kind: Kind,
    pub(crate) session: &'a str,
    pub(crate) method: &'a str,
    pub(crate) url: &'a str,
    headers: Vec<(&'a str, Option<&'a str>)>,
    pub(crate) deadline: Option<std::time::SystemTime>,
    pub(crate) retry: RetryPolicy,
    pub(crate) idempotency_key: &'a str,
}

impl ManifestRef<'_> {
    /// The manifest's request, as [`decode`] returns it.
    pub(crate) fn request(&self) -> Request {
        RequestV1 {
            method: self.method.to_owned(),
            url: self.url.to_owned(),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.map(str::to_owned)))
                .collect(),
        }
        .into_request()
    }
}

/// Decodes a manifest file as [`decode`] does (the same checks, the same errors), borrowing
/// its strings and leaving out what the planner does not read. `path` is only used in errors.
pub(crate) fn decode_ref<'a>(path: &Path, bytes: &'a [u8]) -> Result<ManifestRef<'a>> {
    let body = body(path, bytes)?;
    let decode_err =
        |reason: String| Error::corrupt(path, Corruption::Decode { slot: None, reason });
    let v: ManifestView<'a> = decode_exact(body).map_err(decode_err)?;
    meta::check(v.metadata).map_err(decode_err)?;
    Ok(ManifestRef {
        id: TransferId::from_bytes(v.id),
        kind: kind(v.kind),
        session: v.session,
        method: v.request.method,
        url: v.request.url,
        headers: v.request.headers,
        deadline: v.deadline_ms.map(from_ms),
        retry: retry(v.max_attempts, v.initial_backoff_ms, v.max_backoff_ms),
        idempotency_key: v.idempotency_key,
    })
}

fn kind(k: KindV1) -> Kind {
    match k {
        KindV1::Upload => Kind::Upload,
        KindV1::Download => Kind::Download,
    }
}

fn retry(max_attempts: u32, initial_ms: u64, max_ms: u64) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: std::time::Duration::from_millis(initial_ms),
        max_backoff: std::time::Duration::from_millis(max_ms),
    }
}

/// Panics unless [`decode_ref`] accepts exactly the bytes [`decode`] accepts (with the same
/// error) and reads the same fields from them.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn assert_views_agree(path: &Path, bytes: &[u8]) {
    match (decode(path, bytes), decode_ref(path, bytes)) {
        (Ok(m), Ok(v)) => {
            assert_eq!(v.id, m.id);
            assert_eq!(v.kind, m.kind);
            assert_eq!(v.session, m.session);
            assert_eq!(v.url, m.request.url);
            assert_eq!(v.method, m.request.method);
            assert_eq!(v.request(), m.request);
            assert_eq!(v.deadline, m.deadline);
            assert_eq!(v.retry, m.retry);
            assert_eq!(v.idempotency_key, m.idempotency_key);
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!(
            "decode and decode_ref disagree: {:?} / {:?}",
            a.map(|_| ()),
            b.map(|_| ())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::Header;
    use crate::value::Value;

    fn sample() -> Manifest {
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("album".to_owned(), Value::from("holiday"));
        meta.insert("n".to_owned(), Value::Array(vec![Value::Integer(3)]));
        Manifest {
            id: TransferId::from_bytes([9; 16]),
            kind: Kind::Download,
            session: "bg".into(),
            request: Request {
                method: "GET".into(),
                url: "https://example.com/a.jpg".into(),
                headers: vec![
                    Header {
                        name: "Authorization".into(),
                        value: String::new(),
                        secret: true,
                    },
                    Header {
                        name: "Accept".into(),
                        value: "image/*".into(),
                        secret: false,
                    },
                ],
            },
            group: Some("album".into()),
            created: from_ms(1_700_000_000_000),
            deadline: Some(from_ms(1_800_000_000_000)),
            retry: RetryPolicy::default(),
            payload: PayloadFacts::Written { len: 42 },
            idempotency_key: "k-1".into(),
            metadata: Value::Map(meta),
        }
    }

    #[test]
    fn the_borrowed_decoder_agrees_with_the_whole_one_byte_for_byte() {
        let path = Path::new("manifest");
        let good = encode(&sample()).expect("encodes");
        assert_views_agree(path, &good);
        assert!(decode_ref(path, &good).is_ok());
        for i in 0..good.len() {
            for bit in [0x01, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                assert_views_agree(path, &bad);
            }
            assert_views_agree(path, &good[..i]);
        }
        // A body that passes its checksum but not the decoder, and one whose metadata is bad.
        let bad_meta = ManifestV1 {
            id: [9; 16],
            kind: KindV1::Upload,
            session: "bg".into(),
            request: RequestV1::from_request(&sample().request),
            group: None,
            created_ms: 1,
            deadline_ms: None,
            max_attempts: 5,
            initial_backoff_ms: 1,
            max_backoff_ms: 2,
            payload: PayloadV1::None,
            idempotency_key: "k".into(),
            metadata: vec![9], // no such metadata tag
        };
        let bad_meta = postcard::to_allocvec(&bad_meta).expect("encodes");
        for body in [vec![0xffu8; 40], bad_meta] {
            let mut f = good[..HEADER_LEN].to_vec();
            f[LEN_AT..LEN_AT + 4].copy_from_slice(&(body.len() as u32).to_le_bytes());
            f[CRC_AT..CRC_AT + 4].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
            f.extend_from_slice(&body);
            assert!(decode_ref(path, &f).is_err());
            assert_views_agree(path, &f);
        }
    }
}
