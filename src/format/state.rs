//! The state file: two fixed-capacity slots, each a 24-byte header and a postcard body.
//!
//! An update writes the slot that does not hold the newest valid copy, then syncs. On read the
//! valid slot with the higher sequence number wins; a torn slot fails its checksum and reads as
//! absent, so the older slot is used.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::manifest::RequestV1;
use super::{decode_exact, fixed, from_ms, to_ms};
use crate::error::{Corruption, Error, Result};
use crate::transfer::{FailReason, Outcome, Phase, State, TaskBinding};

pub(crate) const MAGIC: [u8; 4] = *b"WBST";
pub(crate) const VERSION: u16 = 1;
/// Slot header: magic (4), version (2), reserved (2), sequence (8), body length (4),
/// CRC-32 over header bytes 0..20 followed by the body (4).
pub(crate) const SLOT_HEADER_LEN: usize = 24;
const VERSION_AT: usize = 4;
const SEQ_AT: usize = 8;
const LEN_AT: usize = 16;
const CRC_AT: usize = 20;
/// Each slot's capacity; slot `i` starts at byte `i * SLOT_CAPACITY`.
pub(crate) const SLOT_CAPACITY: usize = 16 * 1024;
/// The largest state body.
pub(crate) const MAX_BODY: usize = SLOT_CAPACITY - SLOT_HEADER_LEN;
/// The largest state file read.
pub(crate) const MAX_FILE: u64 = 2 * SLOT_CAPACITY as u64;

#[derive(Serialize, Deserialize)]
enum PhaseV1 {
    Pending,
    Running,
    WaitingToRetry,
    Completed,
    Failed,
    Cancelled,
}

#[derive(Serialize, Deserialize)]
enum OutcomeV1 {
    Succeeded { status: Option<u16> },
    Failed { reason: u8, error: String },
    Cancelled,
}

#[derive(Serialize, Deserialize)]
struct BindingV1 {
    session: String,
    task_id: u64,
    tag: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct StateV1 {
    phase: PhaseV1,
    failures: u32,
    next_attempt_ms: Option<u64>,
    binding: Option<BindingV1>,
    current_request: Option<RequestV1>,
    bytes_done: u64,
    bytes_total: Option<u64>,
    last_error: Option<String>,
    outcome: Option<OutcomeV1>,
    partial_len: u64,
    downloaded: bool,
}

/// A decoded, valid slot.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub seq: u64,
    pub state: State,
}

/// What reading both slots found.
#[derive(Debug)]
pub(crate) struct Slots {
    pub slot: [Result<Slot, Corruption>; 2],
}

impl Slots {
    /// The index and content of the newest valid slot.
    pub(crate) fn newest(&self) -> Option<(usize, &Slot)> {
        let mut best: Option<(usize, &Slot)> = None;
        for (i, s) in self.slot.iter().enumerate() {
            if let Ok(s) = s
                && best.is_none_or(|(_, b)| s.seq > b.seq)
            {
                best = Some((i, s));
            }
        }
        best
    }
}

fn reason_code(r: FailReason) -> u8 {
    match r {
        FailReason::Permanent => 0,
        FailReason::GaveUp => 1,
        FailReason::Expired => 2,
    }
}

/// Encodes one slot (header and body) with sequence `seq`.
pub(crate) fn encode_slot(seq: u64, s: &State) -> Result<Vec<u8>> {
    let v = StateV1 {
        phase: match s.phase {
            Phase::Pending => PhaseV1::Pending,
            Phase::Running => PhaseV1::Running,
            Phase::WaitingToRetry => PhaseV1::WaitingToRetry,
            Phase::Completed => PhaseV1::Completed,
            Phase::Failed => PhaseV1::Failed,
            Phase::Cancelled => PhaseV1::Cancelled,
        },
        failures: s.failures,
        next_attempt_ms: s.next_attempt.map(to_ms),
        binding: s.binding.as_ref().map(|b| BindingV1 {
            session: b.session.clone(),
            task_id: b.task_id,
            tag: b.tag.clone(),
        }),
        current_request: s.current_request.as_ref().map(RequestV1::from_request),
        bytes_done: s.bytes_done,
        bytes_total: s.bytes_total,
        last_error: s.last_error.clone(),
        outcome: s.outcome.as_ref().map(|o| match o {
            Outcome::Succeeded { status } => OutcomeV1::Succeeded { status: *status },
            Outcome::Failed { reason, error } => OutcomeV1::Failed {
                reason: reason_code(*reason),
                error: error.clone(),
            },
            Outcome::Cancelled => OutcomeV1::Cancelled,
        }),
        partial_len: s.partial_len,
        downloaded: s.downloaded,
    };
    let body = postcard::to_allocvec(&v)
        .map_err(|e| Error::invalid(format!("state does not encode: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(Error::invalid(format!(
            "the state would be {} bytes; the limit is {MAX_BODY} (shorten the request or error text)",
            body.len()
        )));
    }
    let mut out = Vec::with_capacity(SLOT_HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out);
    h.update(&body);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes one slot's bytes (which may run past the slot's body; the rest is ignored).
pub(crate) fn decode_slot(index: u8, bytes: &[u8]) -> Result<Slot, Corruption> {
    let slot = Some(index);
    let magic = fixed::<4>(bytes, 0);
    if magic != MAGIC {
        return Err(Corruption::BadMagic {
            expected: MAGIC,
            found: magic,
        });
    }
    let len = u32::from_le_bytes(fixed::<4>(bytes, LEN_AT)) as usize;
    if len > MAX_BODY {
        return Err(Corruption::Length {
            slot,
            found: len as u64,
            max: MAX_BODY as u64,
        });
    }
    let (Some(head), Some(body)) = (
        bytes.get(..CRC_AT),
        bytes.get(SLOT_HEADER_LEN..SLOT_HEADER_LEN + len),
    ) else {
        return Err(Corruption::Truncated {
            needed: (SLOT_HEADER_LEN + len) as u64,
            found: bytes.len() as u64,
        });
    };
    let stored = u32::from_le_bytes(fixed::<4>(bytes, CRC_AT));
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(body);
    let computed = h.finalize();
    if computed != stored {
        return Err(Corruption::Checksum {
            slot,
            expected: stored,
            found: computed,
        });
    }
    let version = u16::from_le_bytes(fixed::<2>(bytes, VERSION_AT));
    if version != VERSION {
        return Err(Corruption::Decode {
            slot,
            reason: format!("unknown state version {version}"),
        });
    }
    let seq = u64::from_le_bytes(fixed::<8>(bytes, SEQ_AT));
    let v: StateV1 = decode_exact(body).map_err(|reason| Corruption::Decode { slot, reason })?;
    let outcome = match v.outcome {
        None => None,
        Some(OutcomeV1::Succeeded { status }) => Some(Outcome::Succeeded { status }),
        Some(OutcomeV1::Cancelled) => Some(Outcome::Cancelled),
        Some(OutcomeV1::Failed { reason, error }) => Some(Outcome::Failed {
            reason: match reason {
                0 => FailReason::Permanent,
                1 => FailReason::GaveUp,
                2 => FailReason::Expired,
                r => {
                    return Err(Corruption::Decode {
                        slot,
                        reason: format!("unknown failure reason {r}"),
                    });
                }
            },
            error,
        }),
    };
    Ok(Slot {
        seq,
        state: State {
            phase: match v.phase {
                PhaseV1::Pending => Phase::Pending,
                PhaseV1::Running => Phase::Running,
                PhaseV1::WaitingToRetry => Phase::WaitingToRetry,
                PhaseV1::Completed => Phase::Completed,
                PhaseV1::Failed => Phase::Failed,
                PhaseV1::Cancelled => Phase::Cancelled,
            },
            failures: v.failures,
            next_attempt: v.next_attempt_ms.map(from_ms),
            binding: v.binding.map(|b| TaskBinding {
                session: b.session,
                task_id: b.task_id,
                tag: b.tag,
            }),
            current_request: v.current_request.map(RequestV1::into_request),
            bytes_done: v.bytes_done,
            bytes_total: v.bytes_total,
            last_error: v.last_error,
            outcome,
            partial_len: v.partial_len,
            downloaded: v.downloaded,
            rebuilt: false,
        },
    })
}

/// The body length a slot's header claims, if the header's magic is right (unchecked
/// otherwise: the CRC decides validity later). Used to read no more of a slot than needed.
pub(crate) fn slot_len_hint(slot: &[u8]) -> Option<usize> {
    if slot.get(..4)? != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(slot.get(LEN_AT..LEN_AT + 4)?.try_into().ok()?);
    usize::try_from(len).ok().filter(|&n| n <= MAX_BODY)
}

/// Decodes both slots of a state file's bytes.
pub(crate) fn decode_file(bytes: &[u8]) -> Slots {
    let s0 = bytes
        .get(..SLOT_CAPACITY.min(bytes.len()))
        .unwrap_or_default();
    let s1 = bytes.get(SLOT_CAPACITY..).unwrap_or_default();
    Slots {
        slot: [decode_slot(0, s0), decode_slot(1, s1)],
    }
}

/// The newest valid state, or the corruption of both slots.
pub(crate) fn newest_or_corrupt(path: &Path, slots: &Slots) -> Result<(usize, Slot)> {
    if let Some((i, s)) = slots.newest() {
        return Ok((i, s.clone()));
    }
    let why = |r: &Result<Slot, Corruption>| match r {
        Err(c) => Box::new(c.clone()),
        Ok(_) => Box::new(Corruption::Decode {
            slot: None,
            reason: "unreachable".into(),
        }),
    };
    Err(Error::corrupt(
        path,
        Corruption::BothSlots {
            slot0: why(&slots.slot[0]),
            slot1: why(&slots.slot[1]),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_reads_as_older() -> Result<()> {
        let mut a = State::new();
        a.bytes_done = 10;
        let mut b = a.clone();
        b.bytes_done = 20;
        let mut file = vec![0u8; 2 * SLOT_CAPACITY];
        let ea = encode_slot(5, &a)?;
        let eb = encode_slot(6, &b)?;
        file[..ea.len()].copy_from_slice(&ea);
        file[SLOT_CAPACITY..SLOT_CAPACITY + eb.len()].copy_from_slice(&eb);
        let slots = decode_file(&file);
        assert_eq!(slots.newest().map(|(i, s)| (i, s.seq)), Some((1, 6)));
        // Tear slot 1: the last byte of its body is garbage.
        file[SLOT_CAPACITY + eb.len() - 1] ^= 0xff;
        let slots = decode_file(&file);
        let (i, s) = newest_or_corrupt(Path::new("state"), &slots)?;
        assert_eq!((i, s.seq, s.state.bytes_done), (0, 5, 10));
        assert!(matches!(
            slots.slot[1],
            Err(Corruption::Checksum { slot: Some(1), .. })
        ));
        Ok(())
    }
}
