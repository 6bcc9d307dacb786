//! The two-slot state file as the store reads it (FORMAT.md §2.2): the slots' regions read
//! through the seam, and the newest valid slot picked out. The slot encoding itself is
//! `format::state`'s.

use std::path::Path;

use crate::Result;
use crate::format::state::{self as state_fmt, SLOT_CAPACITY, SLOT_HEADER_LEN, slot_len_hint};
use crate::fs::{Fs, Handle};

/// Reads a two-slot state file as [`crate::format::state::decode_file`] expects it: slot 0's
/// region, then, if the file reaches it, slot 1's. Each slot is read from its start for as
/// long as its header says; the unused gap between the slots is never read (reading that
/// sparse gap made the following `fdatasync` measurably slower on ext4), and is returned
/// as zeros.
pub(crate) fn read_slots(fs: &Fs, f: &Handle, path: &Path) -> Result<Vec<u8>> {
    const FIRST: usize = 4096;
    let read = |off: u64, len: usize, buf: &mut Vec<u8>| fs.read_at(f, path, off, len, buf);
    let mut buf = Vec::with_capacity(SLOT_CAPACITY + FIRST);
    // Slot 0: its first page, then the rest of its body if the header says it is longer.
    let got = read(0, FIRST, &mut buf)?;
    if got == FIRST {
        let want = slot_len_hint(&buf).map_or(SLOT_CAPACITY, |n| {
            (SLOT_HEADER_LEN + n).clamp(FIRST, SLOT_CAPACITY)
        });
        read(FIRST as u64, want - FIRST, &mut buf)?;
    }
    if buf.len() < FIRST {
        return Ok(buf);
    }
    // Slot 1, if the file reaches it: one read, and a second only when what the first
    // returned ends before the slot its header describes.
    let mut s1 = Vec::with_capacity(FIRST);
    let mut got = fs.read_at_once(f, path, SLOT_CAPACITY as u64, FIRST, &mut s1)?;
    let whole = |s: &[u8]| slot_len_hint(s).is_some_and(|n| SLOT_HEADER_LEN + n <= s.len());
    if got > 0 && got < FIRST && !whole(&s1) {
        got += read((SLOT_CAPACITY + got) as u64, FIRST - got, &mut s1)?;
    }
    if got == 0 {
        // The file may still end inside slot 0's region past what was read; what lies
        // there is not part of slot 0's body, so it does not matter.
        return Ok(buf);
    }
    if got == FIRST {
        let want = slot_len_hint(&s1).map_or(SLOT_CAPACITY, |n| {
            (SLOT_HEADER_LEN + n).clamp(FIRST, SLOT_CAPACITY)
        });
        read((SLOT_CAPACITY + FIRST) as u64, want - FIRST, &mut s1)?;
    }
    buf.resize(SLOT_CAPACITY, 0);
    buf.extend_from_slice(&s1);
    Ok(buf)
}

/// The newest valid slot of a state file's bytes (header and body), or nothing.
pub(crate) fn newest_slot(bytes: &[u8]) -> Vec<u8> {
    let slots = state_fmt::decode_file(bytes);
    let Some((i, _)) = slots.newest() else {
        return Vec::new();
    };
    let region = bytes.get(i * SLOT_CAPACITY..).unwrap_or_default();
    let len = slot_len_hint(region).unwrap_or(0) + SLOT_HEADER_LEN;
    region.get(..len).unwrap_or_default().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    /// Reading a state file slot by slot decodes exactly as reading all of it does, whatever
    /// the file holds: one slot, two, long bodies, garbage headers, files ending anywhere.
    #[test]
    fn state_slots_read_apart_decode_like_the_whole_file() -> Result<()> {
        use crate::format::state::{self as st, SLOT_CAPACITY};
        use crate::transfer::State;
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
        let fs = Fs::real();
        let mut small = State::new();
        small.bytes_done = 7;
        let mut long = State::new();
        long.last_error = Some("e".repeat(9000));
        let a = st::encode_slot(3, &small)?;
        let b = st::encode_slot(4, &long)?;
        assert!(b.len() > 4096, "the long body crosses the first page");
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), a.clone(), b.clone()];
        for (s0, s1) in [(&a, &b), (&b, &a), (&a, &a)] {
            let mut f = s0.clone();
            f.resize(SLOT_CAPACITY, 0);
            f.extend_from_slice(s1);
            cases.push(f.clone());
            // Cut off inside slot 1, and with slot 1's header damaged.
            cases.push(f.get(..SLOT_CAPACITY + 30).unwrap_or_default().to_vec());
            let mut g = f.clone();
            if let Some(x) = g.get_mut(SLOT_CAPACITY) {
                *x ^= 0xff;
            }
            cases.push(g);
        }
        // Garbage slot 0 reaching into the gap; a file ending between the slots.
        let mut g = vec![0xabu8; 9000];
        cases.push(g.clone());
        g.resize(SLOT_CAPACITY, 0);
        g.extend_from_slice(&a);
        cases.push(g);
        for (i, bytes) in cases.iter().enumerate() {
            let path = d.path().join(format!("state{i}"));
            std::fs::write(&path, bytes).map_err(|e| Error::io("write", &path, e))?;
            let h = fs.open_read(&path)?;
            let read = read_slots(&fs, &h, &path)?;
            let whole = st::decode_file(bytes);
            let apart = st::decode_file(&read);
            let seqs = |s: &st::Slots| {
                s.slot
                    .iter()
                    .map(|r| r.as_ref().ok().map(|x| (x.seq, x.state.clone())))
                    .collect::<Vec<_>>()
            };
            assert_eq!(seqs(&whole), seqs(&apart), "case {i}");
            assert_eq!(
                bytes.len() > SLOT_CAPACITY,
                read.len() > SLOT_CAPACITY,
                "case {i}: whether slot 1 was ever written"
            );
        }
        Ok(())
    }
}
