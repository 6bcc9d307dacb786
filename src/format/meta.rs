//! The metadata codec: a small tagged encoding with an explicit depth limit, so that hostile
//! nesting can never exhaust the stack while decoding.

use std::collections::BTreeMap;

use crate::value::{MAX_METADATA_BYTES, MAX_METADATA_DEPTH, Value};

const TAG_STRING: u8 = 0;
const TAG_INTEGER: u8 = 1;
const TAG_BOOL: u8 = 2;
const TAG_BYTES: u8 = 3;
const TAG_ARRAY: u8 = 4;
const TAG_MAP: u8 = 5;

/// Encodes `v`, checking the depth and size limits.
pub(crate) fn encode(v: &Value) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    put(v, 1, &mut out)?;
    if out.len() > MAX_METADATA_BYTES {
        return Err(format!(
            "metadata is {} bytes encoded; the limit is {MAX_METADATA_BYTES}",
            out.len()
        ));
    }
    Ok(out)
}

fn put_len(n: usize, out: &mut Vec<u8>) -> Result<(), String> {
    let n = u32::try_from(n).map_err(|_| "metadata item too large".to_owned())?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put(v: &Value, depth: usize, out: &mut Vec<u8>) -> Result<(), String> {
    if depth > MAX_METADATA_DEPTH {
        return Err(format!(
            "metadata nests deeper than {MAX_METADATA_DEPTH} levels"
        ));
    }
    if out.len() > MAX_METADATA_BYTES {
        return Err(format!("metadata exceeds {MAX_METADATA_BYTES} bytes"));
    }
    match v {
        Value::String(s) => {
            out.push(TAG_STRING);
            put_len(s.len(), out)?;
            out.extend_from_slice(s.as_bytes());
        }
        Value::Integer(i) => {
            out.push(TAG_INTEGER);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Bool(b) => {
            out.push(TAG_BOOL);
            out.push(u8::from(*b));
        }
        Value::Bytes(b) => {
            out.push(TAG_BYTES);
            put_len(b.len(), out)?;
            out.extend_from_slice(b);
        }
        Value::Array(items) => {
            out.push(TAG_ARRAY);
            put_len(items.len(), out)?;
            for item in items {
                put(item, depth + 1, out)?;
            }
        }
        Value::Map(m) => {
            out.push(TAG_MAP);
            put_len(m.len(), out)?;
            for (k, item) in m {
                put_len(k.len(), out)?;
                out.extend_from_slice(k.as_bytes());
                put(item, depth + 1, out)?;
            }
        }
    }
    Ok(())
}

/// Decodes metadata, requiring every byte to be used.
pub(crate) fn decode(bytes: &[u8]) -> Result<Value, String> {
    read(bytes, true).map(Option::unwrap_or_default)
}

/// Checks metadata as [`decode`] does, building nothing.
pub(crate) fn check(bytes: &[u8]) -> Result<(), String> {
    read(bytes, false).map(drop)
}

/// Reads (and with `build`, returns) one whole metadata value.
fn read(bytes: &[u8], build: bool) -> Result<Option<Value>, String> {
    if bytes.len() > MAX_METADATA_BYTES {
        return Err(format!(
            "metadata is {} bytes; the limit is {MAX_METADATA_BYTES}",
            bytes.len()
        ));
    }
    let mut r = Reader { bytes, at: 0 };
    let v = r.value(1, build)?;
    if r.at != bytes.len() {
        return Err(format!(
            "{} trailing bytes after metadata",
            bytes.len() - r.at
        ));
    }
    Ok(v)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| "metadata ends early".to_owned())?;
        let s = self.bytes.get(self.at..end).ok_or("metadata ends early")?;
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(super::fixed::<1>(self.take(1)?, 0)[0])
    }

    /// A length or count, bounded by the bytes that remain (every item takes at least one).
    fn len(&mut self) -> Result<usize, String> {
        let n = u32::from_le_bytes(super::fixed::<4>(self.take(4)?, 0)) as usize;
        if n > self.bytes.len() - self.at {
            return Err(format!("metadata length {n} exceeds the bytes left"));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<&'a str, String> {
        let n = self.len()?;
        let b = self.take(n)?;
        std::str::from_utf8(b).map_err(|_| "metadata string is not UTF-8".to_owned())
    }

    /// One value; built only when `build` (a check reads the same bytes and allocates nothing).
    fn value(&mut self, depth: usize, build: bool) -> Result<Option<Value>, String> {
        if depth > MAX_METADATA_DEPTH {
            return Err(format!(
                "metadata nests deeper than {MAX_METADATA_DEPTH} levels"
            ));
        }
        let v = match self.u8()? {
            TAG_STRING => {
                let s = self.string()?;
                build.then(|| Value::String(s.to_owned()))
            }
            TAG_INTEGER => {
                let i = i64::from_le_bytes(super::fixed::<8>(self.take(8)?, 0));
                build.then_some(Value::Integer(i))
            }
            TAG_BOOL => match self.u8()? {
                0 => build.then_some(Value::Bool(false)),
                1 => build.then_some(Value::Bool(true)),
                b => return Err(format!("metadata bool byte {b}")),
            },
            TAG_BYTES => {
                let n = self.len()?;
                let b = self.take(n)?;
                build.then(|| Value::Bytes(b.to_vec()))
            }
            TAG_ARRAY => {
                let n = self.len()?;
                let mut items = Vec::with_capacity(if build { n } else { 0 });
                for _ in 0..n {
                    items.extend(self.value(depth + 1, build)?);
                }
                build.then_some(Value::Array(items))
            }
            TAG_MAP => {
                let n = self.len()?;
                let mut m = BTreeMap::new();
                let mut last: Option<&str> = None;
                for _ in 0..n {
                    let k = self.string()?;
                    if last.is_some_and(|l| l >= k) {
                        return Err("metadata map keys are not strictly ascending".to_owned());
                    }
                    let v = self.value(depth + 1, build)?;
                    last = Some(k);
                    if let Some(v) = v {
                        m.insert(k.to_owned(), v);
                    }
                }
                build.then_some(Value::Map(m))
            }
            t => return Err(format!("unknown metadata tag {t}")),
        };
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_variant() -> Result<(), String> {
        let mut m = BTreeMap::new();
        m.insert("s".to_owned(), Value::from("x"));
        m.insert("i".to_owned(), Value::Integer(-7));
        m.insert("b".to_owned(), Value::Bool(true));
        m.insert("y".to_owned(), Value::Bytes(vec![0, 255]));
        m.insert(
            "a".to_owned(),
            Value::Array(vec![Value::Integer(1), Value::empty_map()]),
        );
        let v = Value::Map(m);
        assert_eq!(decode(&encode(&v)?)?, v);
        Ok(())
    }

    #[test]
    fn depth_limit_holds_both_ways() {
        let mut v = Value::Integer(0);
        for _ in 0..MAX_METADATA_DEPTH {
            v = Value::Array(vec![v]);
        }
        assert!(encode(&v).is_err());
        // Hand-built deep nesting: decode must refuse it without recursing past the limit.
        let mut bytes = Vec::new();
        for _ in 0..100_000 {
            bytes.push(TAG_ARRAY);
            bytes.extend_from_slice(&1u32.to_le_bytes());
        }
        assert!(decode(&bytes).is_err());
    }

    #[test]
    fn check_refuses_exactly_what_decode_refuses() -> Result<(), String> {
        let mut m = BTreeMap::new();
        m.insert(
            "a".to_owned(),
            Value::Array(vec![Value::Integer(1), Value::Bool(true)]),
        );
        m.insert("b".to_owned(), Value::Bytes(vec![1, 2]));
        m.insert("c".to_owned(), Value::from("x"));
        let good = encode(&Value::Map(m))?;
        assert_eq!(check(&good), Ok(()));
        for i in 0..good.len() {
            for bit in [0x01, 0x02, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                assert_eq!(check(&bad).err(), decode(&bad).err(), "byte {i} ^ {bit:#x}");
            }
            assert_eq!(check(&good[..i]).err(), decode(&good[..i]).err());
        }
        Ok(())
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut bytes = vec![TAG_ARRAY];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&bytes).is_err_and(|e| e.contains("exceeds")));
    }
}
