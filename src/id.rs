//! The identity of a transfer. A leaf: the error type names it, and everything else does.

use std::fmt;

use uuid::Uuid;

/// The identity of a transfer: a random (version 4) UUID, written lowercase and hyphenated.
/// Ordered as its bytes are (which is also the order of its text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransferId(Uuid);

impl Ord for TransferId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // The bytes' order, compared as one big-endian number: no call to `memcmp` for each
        // comparison of a sort or a search.
        u128::from_be_bytes(*self.as_bytes()).cmp(&u128::from_be_bytes(*other.as_bytes()))
    }
}

impl PartialOrd for TransferId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Where each byte's two hex digits start in the canonical text.
const PAIR_AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];

/// Marks a character that is not a lowercase hex digit in [`HEX`].
const NOT_HEX: u8 = 0x80;

/// Each character's value as a lowercase hex digit, or [`NOT_HEX`].
#[allow(
    clippy::indexing_slicing,
    reason = "evaluated at compile time: an index out of range fails the build"
)]
const HEX: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut c = 0;
    while c < 10 {
        t[b'0' as usize + c] = c as u8;
        c += 1;
    }
    let mut c = 0;
    while c < 6 {
        t[b'a' as usize + c] = 10 + c as u8;
        c += 1;
    }
    t
};

impl TransferId {
    /// A fresh random id.
    pub fn new_v4() -> Self {
        #[cfg(any(test, feature = "fuzzing"))]
        if let Some(id) = crate::testkit::seeded_ids::next() {
            return id;
        }
        TransferId(Uuid::new_v4())
    }

    /// Parses only the canonical form: 36 characters, lowercase, hyphenated, exactly as
    /// `Display` writes it. Directory names that are not canonical are never treated as records.
    pub fn parse_canonical(s: &str) -> Option<Self> {
        // One pass: a reconcile parses every task's tag. Canonical text is exactly lowercase
        // hex digits with hyphens at 8, 13, 18 and 23, which is what parsing with `uuid` and
        // comparing with the lowercase hyphenated text accepts (tested against it).
        let text: &[u8; 36] = s.as_bytes().try_into().ok()?;
        let mut bytes = [0u8; 16];
        let mut bad = 0u8;
        for (b, &at) in bytes.iter_mut().zip(&PAIR_AT) {
            let digit = |i: usize| {
                text.get(i).map_or(NOT_HEX, |&c| {
                    HEX.get(usize::from(c)).copied().unwrap_or(NOT_HEX)
                })
            };
            let (hi, lo) = (digit(at), digit(at + 1));
            bad |= hi | lo;
            *b = (hi << 4) | (lo & 0x0f);
        }
        let hyphens = [8, 13, 18, 23].iter().all(|&i| text.get(i) == Some(&b'-'));
        (bad & NOT_HEX == 0 && hyphens).then_some(TransferId(Uuid::from_bytes(bytes)))
    }

    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Builds an id from its raw 16 bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        TransferId(Uuid::from_bytes(b))
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
    use super::*;
    use proptest::prelude::*;

    /// What canonical means, said the slow way: `uuid` parses it, and it is exactly the
    /// lowercase hyphenated text of what was parsed.
    fn canonical_by_uuid(s: &str) -> Option<TransferId> {
        let u = Uuid::try_parse(s).ok()?;
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        (u.hyphenated().encode_lower(&mut buf) == s).then_some(TransferId(u))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// The one-pass parser accepts exactly what `uuid` parses and writes back the same,
        /// with the same value: canonical text, and that text with one character changed
        /// (uppercase, a hyphen moved, a brace, a non-ASCII character, a digit), cut or grown.
        #[test]
        fn parsing_canonical_text_agrees_with_uuid(
            bytes in any::<[u8; 16]>(),
            at in 0usize..36,
            with in prop::sample::select(vec![
                None, Some('A'), Some('F'), Some('G'), Some('g'), Some('-'), Some('{'),
                Some('0'), Some('9'), Some('a'), Some('f'), Some('é'), Some(' '),
            ]),
            cut in prop::option::of(0usize..40),
        ) {
            let mut s = TransferId::from_bytes(bytes).to_string();
            if let Some(c) = with {
                s.replace_range(at..=at, c.encode_utf8(&mut [0; 4]));
            }
            if let Some(n) = cut {
                if n < s.len() && s.is_char_boundary(n) {
                    s.truncate(n);
                } else if n >= s.len() {
                    s.push('0');
                }
            }
            prop_assert_eq!(TransferId::parse_canonical(&s), canonical_by_uuid(&s), "{:?}", s);
        }

        /// Ids order as their bytes do, and so as their text does.
        #[test]
        fn ids_order_as_their_bytes_and_their_text(a in any::<[u8; 16]>(), b in any::<[u8; 16]>(), same in any::<bool>()) {
            let b = if same { a } else { b };
            let (x, y) = (TransferId::from_bytes(a), TransferId::from_bytes(b));
            prop_assert_eq!(x.cmp(&y), a.cmp(&b));
            prop_assert_eq!(x.cmp(&y), x.to_string().cmp(&y.to_string()));
            prop_assert_eq!(x.partial_cmp(&y), Some(a.cmp(&b)));
        }
    }
}
