//! A group's tally of purged members (FORMAT.md §1.5): fixed-size checksummed records, one
//! per purged member, appended to the group's `purged` file.

use std::collections::HashMap;

use super::fixed;
use crate::transfer::{Outcome, TransferId};

/// A purged member: id (16), outcome code (1), reserved (3), bytes (8), CRC-32 of 0..28 (4).
pub(crate) const TALLY_RECORD_LEN: usize = 32;
const TALLY_OUTCOME_AT: usize = 16;
const TALLY_BYTES_AT: usize = 20;
const TALLY_CRC_AT: usize = 28;
/// The largest `purged` file read (two million members).
pub(crate) const MAX_TALLY_FILE: u64 = 64 * 1024 * 1024;

/// Outcome codes.
pub(crate) const SUCCEEDED: u8 = 1;
pub(crate) const FAILED: u8 = 2;
pub(crate) const CANCELLED: u8 = 3;

/// The code of an outcome in a tally record.
pub(crate) fn outcome_code(o: &Outcome) -> u8 {
    match o {
        Outcome::Succeeded { .. } => SUCCEEDED,
        Outcome::Failed { .. } => FAILED,
        Outcome::Cancelled => CANCELLED,
    }
}

/// One tally record.
pub(crate) fn encode_record(id: TransferId, code: u8, bytes: u64) -> [u8; TALLY_RECORD_LEN] {
    let mut r = [0u8; TALLY_RECORD_LEN];
    let (body, crc) = r.split_at_mut(TALLY_CRC_AT);
    let (idb, rest) = body.split_at_mut(TALLY_OUTCOME_AT);
    idb.copy_from_slice(id.as_bytes());
    let (code_b, rest) = rest.split_at_mut(TALLY_BYTES_AT - TALLY_OUTCOME_AT);
    if let Some(c) = code_b.first_mut() {
        *c = code;
    }
    rest.copy_from_slice(&bytes.to_le_bytes());
    crc.copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    r
}

/// Valid records of a `purged` file; a torn or damaged record is skipped.
pub(crate) fn decode_records(bytes: &[u8]) -> HashMap<TransferId, (u8, u64)> {
    let mut out = HashMap::new();
    for rec in bytes.chunks_exact(TALLY_RECORD_LEN) {
        let body = rec.get(..TALLY_CRC_AT).unwrap_or_default();
        let stored = u32::from_le_bytes(fixed::<4>(rec, TALLY_CRC_AT));
        let code = fixed::<1>(rec, TALLY_OUTCOME_AT)[0];
        if crc32fast::hash(body) != stored || !(SUCCEEDED..=CANCELLED).contains(&code) {
            continue;
        }
        let id = TransferId::from_bytes(fixed::<16>(rec, 0));
        let n = u64::from_le_bytes(fixed::<8>(rec, TALLY_BYTES_AT));
        out.insert(id, (code, n));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_and_duplicate_records_count_once() {
        let a = TransferId::new_v4();
        let b = TransferId::new_v4();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&encode_record(a, SUCCEEDED, 10));
        bytes.extend_from_slice(&encode_record(a, SUCCEEDED, 10));
        let mut torn = encode_record(b, FAILED, 5);
        torn[3] ^= 0x40;
        bytes.extend_from_slice(&torn);
        bytes.extend_from_slice(&[1, 2, 3]);
        let r = decode_records(&bytes);
        assert_eq!(r.len(), 1);
        assert_eq!(r.get(&a), Some(&(SUCCEEDED, 10)));
    }
}
