//! App metadata: a small property-list-like value stored in the manifest.

use std::collections::BTreeMap;

/// The deepest nesting of arrays and maps allowed in metadata (the top-level map is depth 1).
pub const MAX_METADATA_DEPTH: usize = 16;

/// The largest encoded size of a transfer's metadata, in bytes.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// A metadata value, like a property list: string, integer, bool, bytes, array or map.
///
/// Limits (checked at create, and again when a manifest is read): at most
/// [`MAX_METADATA_DEPTH`] levels of nesting and [`MAX_METADATA_BYTES`] once encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// UTF-8 text.
    String(String),
    /// A signed 64-bit integer.
    Integer(i64),
    /// A boolean.
    Bool(bool),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// An ordered list.
    Array(Vec<Value>),
    /// A map with string keys, kept sorted.
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// An empty map, the default metadata of a transfer.
    pub fn empty_map() -> Self {
        Value::Map(BTreeMap::new())
    }

    /// The value under `key` when this is a map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(m) => m.get(key),
            _ => None,
        }
    }

    /// The text when this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The integer when this is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Integer(i) => Some(*i),
            _ => None,
        }
    }
}

impl Default for Value {
    fn default() -> Self {
        Value::empty_map()
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Integer(i)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Bytes(b)
    }
}
