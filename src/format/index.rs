//! The derived index's encodings (FORMAT.md §1.6, §1.7, §3.8): the change journal's header and frames, and
//! the records the index keeps per transfer. None of this is the source of truth: anything
//! that fails to decode makes the index rebuild itself from the transfer directories.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{decode_exact, fixed};

/// Magic at the start of the `journal` file.
pub(crate) const JOURNAL_MAGIC: [u8; 4] = *b"WBJN";
/// The journal format this build writes and reads.
pub(crate) const JOURNAL_VERSION: u16 = 1;
/// Journal header: magic (4), version (2), reserved (2), generation (16), boot kind (1),
/// reserved (7), boot value (16), CRC-32 of bytes 0..48 (4), reserved (4).
pub(crate) const JOURNAL_HEADER_LEN: usize = 56;
const GEN_AT: usize = 8;
const BOOT_KIND_AT: usize = 24;
const BOOT_VALUE_AT: usize = 32;
const HEADER_CRC_AT: usize = 48;

/// Frame header: tag (1), reserved (3), payload length (4), transfer id (16), CRC-32 of the
/// header's first 24 bytes and the payload (4).
pub(crate) const FRAME_HEADER_LEN: usize = 28;
const FRAME_LEN_AT: usize = 4;
const FRAME_ID_AT: usize = 8;
const FRAME_CRC_AT: usize = 24;
/// The largest frame payload: a manifest file and a state slot, with room for their framing.
pub(crate) const MAX_FRAME_PAYLOAD: usize =
    super::manifest::MAX_FILE as usize + super::state::SLOT_CAPACITY + 64;

/// A frame written before a transfer is changed: "this transfer may change now".
pub(crate) const TAG_INTENT: u8 = 1;
/// A frame written after a change, under the same lock: the transfer as it now is.
pub(crate) const TAG_ENTRY: u8 = 2;

/// Which instance of the running system wrote the journal. A reboot may have dropped
/// unsynced journal frames, so a journal from another boot is never trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Boot {
    /// The kernel's boot id (Linux, Android).
    Id([u8; 16]),
    /// The boot time in milliseconds since the Unix epoch, estimated from the wall clock and a
    /// clock that counts from boot (other systems). Two estimates within two seconds are the
    /// same boot.
    Since(i64),
}

/// Two boot-time estimates closer than this are the same boot.
pub(crate) const BOOT_SLACK_MS: i64 = 2_000;

impl Boot {
    /// Whether `self` and `other` name the same boot.
    pub(crate) fn same(&self, other: &Boot) -> bool {
        match (self, other) {
            (Boot::Id(a), Boot::Id(b)) => a == b,
            (Boot::Since(a), Boot::Since(b)) => a.abs_diff(*b) <= BOOT_SLACK_MS.unsigned_abs(),
            _ => false,
        }
    }
}

/// A decoded journal header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JournalHeader {
    /// Random; a new journal (new boot, or created) gets a new generation.
    pub(crate) generation: [u8; 16],
    pub(crate) boot: Boot,
}

pub(crate) fn encode_journal_header(h: &JournalHeader) -> [u8; JOURNAL_HEADER_LEN] {
    let mut b = [0u8; JOURNAL_HEADER_LEN];
    let (kind, value) = match h.boot {
        Boot::Id(id) => (1u8, id),
        Boot::Since(ms) => {
            let mut v = [0u8; 16];
            let (head, _) = v.split_at_mut(8);
            head.copy_from_slice(&ms.to_le_bytes());
            (2u8, v)
        }
    };
    let mut put = |at: usize, src: &[u8]| {
        if let Some(dst) = b.get_mut(at..at + src.len()) {
            dst.copy_from_slice(src);
        }
    };
    put(0, &JOURNAL_MAGIC);
    put(4, &JOURNAL_VERSION.to_le_bytes());
    put(GEN_AT, &h.generation);
    put(BOOT_KIND_AT, &[kind]);
    put(BOOT_VALUE_AT, &value);
    let crc = crc32fast::hash(b.get(..HEADER_CRC_AT).unwrap_or_default());
    if let Some(dst) = b.get_mut(HEADER_CRC_AT..HEADER_CRC_AT + 4) {
        dst.copy_from_slice(&crc.to_le_bytes());
    }
    b
}

/// Decodes a journal header; `None` for anything that is not one this build wrote.
pub(crate) fn decode_journal_header(b: &[u8]) -> Option<JournalHeader> {
    if b.len() < JOURNAL_HEADER_LEN
        || fixed::<4>(b, 0) != JOURNAL_MAGIC
        || u16::from_le_bytes(fixed::<2>(b, 4)) != JOURNAL_VERSION
        || u32::from_le_bytes(fixed::<4>(b, HEADER_CRC_AT))
            != crc32fast::hash(b.get(..HEADER_CRC_AT)?)
    {
        return None;
    }
    let value = fixed::<16>(b, BOOT_VALUE_AT);
    let boot = match fixed::<1>(b, BOOT_KIND_AT) {
        [1] => Boot::Id(value),
        [2] => Boot::Since(i64::from_le_bytes(fixed::<8>(&value, 0))),
        _ => return None,
    };
    Some(JournalHeader {
        generation: fixed::<16>(b, GEN_AT),
        boot,
    })
}

/// What an entry frame carries: the transfer as it is after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EntryBody {
    /// The newest state slot as written (header and body).
    #[serde(with = "super::bytes")]
    pub(crate) state: Vec<u8>,
    /// Whether the download's resume data exists.
    pub(crate) resume: bool,
    /// The manifest file, on creation only.
    pub(crate) manifest: Option<Vec<u8>>,
}

pub(crate) fn encode_frame(tag: u8, id: &[u8; 16], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.push(tag);
    out.extend_from_slice(&[0u8; 3]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(id);
    let mut h = crc32fast::Hasher::new();
    h.update(&out);
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The whole length of the frame starting `b`, once its header is there (for a length no frame
/// has: 0, so it always counts as whole).
pub(crate) fn frame_len(b: &[u8]) -> Option<usize> {
    let head = b.get(..FRAME_HEADER_LEN)?;
    let len = u32::from_le_bytes(fixed::<4>(head, FRAME_LEN_AT)) as usize;
    Some(if len > MAX_FRAME_PAYLOAD {
        0
    } else {
        FRAME_HEADER_LEN + len
    })
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Intent([u8; 16]),
    Entry([u8; 16], EntryBody),
}

/// Decodes the frame at the start of `b`: the frame and its length; `None` when `b` ends
/// before the frame does (a frame being appended) or the frame is damaged.
pub(crate) fn decode_frame(b: &[u8]) -> Option<(Frame, usize)> {
    let head = b.get(..FRAME_HEADER_LEN)?;
    let len = u32::from_le_bytes(fixed::<4>(head, FRAME_LEN_AT)) as usize;
    if len > MAX_FRAME_PAYLOAD {
        return None;
    }
    let payload = b.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len)?;
    let mut h = crc32fast::Hasher::new();
    h.update(head.get(..FRAME_CRC_AT)?);
    h.update(payload);
    if h.finalize() != u32::from_le_bytes(fixed::<4>(head, FRAME_CRC_AT)) {
        return None;
    }
    let id = fixed::<16>(head, FRAME_ID_AT);
    let frame = match fixed::<1>(head, 0) {
        [TAG_INTENT] if len == 0 => Frame::Intent(id),
        [TAG_ENTRY] => Frame::Entry(id, decode_exact(payload).ok()?),
        _ => return None,
    };
    Some((frame, FRAME_HEADER_LEN + len))
}

/// Bytes read as part of a larger buffer (the index's chunks, read into one), sharing it: the
/// records read together cost one allocation between them rather than two each, and that one
/// is large enough for the allocator to hand back to the system when it is freed.
#[derive(Clone)]
pub(crate) struct Shared {
    buf: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl Shared {
    /// `part` of `buf`, which it must lie within (else a copy of `part`).
    fn within(buf: &Arc<Vec<u8>>, part: &[u8]) -> Shared {
        let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
        let end = start.wrapping_add(part.len());
        if buf.get(start..end).is_none() {
            return Shared::from(part.to_vec());
        }
        Shared {
            buf: Arc::clone(buf),
            start,
            end,
        }
    }
}

impl From<Vec<u8>> for Shared {
    fn from(v: Vec<u8>) -> Shared {
        let end = v.len();
        Shared {
            buf: Arc::new(v),
            start: 0,
            end,
        }
    }
}

impl std::ops::Deref for Shared {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or_default()
    }
}

impl PartialEq for Shared {
    fn eq(&self, other: &Shared) -> bool {
        **self == **other
    }
}

impl Eq for Shared {}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", &**self)
    }
}

/// What the index keeps per transfer: the files the reconciler and the list queries decode, and
/// the facts the planner reads of them (derived from those files when the record is made).
/// The three are kept in one buffer: facts, then state, then manifest. A record read from the
/// index's facts table holds only its facts (and a record the journal changed since, its state
/// too): the rest is read on demand ([`Holds`]).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct IndexRecord {
    pub(crate) id: [u8; 16],
    /// Whether the download's resume data exists.
    pub(crate) resume: bool,
    body: Shared,
    facts_end: usize,
    state_end: usize,
    holds: Holds,
}

/// Which of a record's parts an [`IndexRecord`] holds (its facts, always).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holds {
    /// Facts, state slot and manifest.
    Whole,
    /// Facts and state slot.
    State,
    /// Facts only.
    Facts,
}

impl std::fmt::Debug for IndexRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexRecord")
            .field("id", &self.id)
            .field("resume", &self.resume)
            .field("holds", &self.holds)
            .field("facts", &self.facts())
            .field("state", &self.state())
            .field("manifest", &self.manifest())
            .finish()
    }
}

impl IndexRecord {
    /// A record of these files, with its facts derived from them.
    pub(crate) fn new(id: [u8; 16], resume: bool, state: &[u8], manifest: &[u8]) -> IndexRecord {
        let facts = Facts::encode_of(id, state, manifest);
        IndexRecord::of_parts(id, resume, &facts, state, manifest, Holds::Whole)
    }

    fn of_parts(
        id: [u8; 16],
        resume: bool,
        facts: &[u8],
        state: &[u8],
        manifest: &[u8],
        holds: Holds,
    ) -> IndexRecord {
        let mut body = Vec::with_capacity(facts.len() + state.len() + manifest.len());
        body.extend_from_slice(facts);
        body.extend_from_slice(state);
        body.extend_from_slice(manifest);
        IndexRecord {
            id,
            resume,
            body: body.into(),
            facts_end: facts.len(),
            state_end: facts.len() + state.len(),
            holds,
        }
    }

    /// This record (whose facts are read from the index, its manifest not) with a new state
    /// slot: the facts the manifest gave are kept, those of the state derived anew. `None` when
    /// its facts do not decode.
    pub(crate) fn with_state(&self, resume: bool, state: &[u8]) -> Option<IndexRecord> {
        let facts = Facts::decode(self.facts())?.with_state(state);
        Some(IndexRecord::of_parts(
            self.id,
            resume,
            &facts,
            state,
            &[],
            Holds::State,
        ))
    }

    /// Which parts this record holds.
    pub(crate) fn holds(&self) -> Holds {
        self.holds
    }

    /// The encoded [`Facts`].
    pub(crate) fn facts(&self) -> &[u8] {
        self.body.get(..self.facts_end).unwrap_or_default()
    }

    /// The newest valid state slot (header and body); empty when neither slot was valid, or
    /// when the record holds its facts only.
    pub(crate) fn state(&self) -> &[u8] {
        self.body
            .get(self.facts_end..self.state_end)
            .unwrap_or_default()
    }

    /// The manifest file as found (it may fail its checks: the record is then corrupt); empty
    /// when the record does not hold it.
    pub(crate) fn manifest(&self) -> &[u8] {
        self.body.get(self.state_end..).unwrap_or_default()
    }
}

/// What the planner reads of a record, derived from its manifest and newest state slot when the
/// record is made (FORMAT.md §1.7), so that planning decodes neither. Strings borrow from the
/// chunk. A record whose manifest fails its checks has `ok` false and nothing else set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct Facts<'a> {
    /// The manifest passed its checks and names the record's id.
    pub(crate) ok: bool,
    pub(crate) download: bool,
    pub(crate) session: &'a str,
    /// The idempotency key, when it is not the id's canonical text.
    pub(crate) key: Option<&'a str>,
    pub(crate) deadline_ms: Option<u64>,
    pub(crate) max_attempts: u32,
    pub(crate) initial_backoff_ms: u64,
    pub(crate) max_backoff_ms: u64,
    /// The manifest's URL.
    pub(crate) url: &'a str,
    /// The URL of the state's replacement request, when it has one.
    pub(crate) replaced_url: Option<&'a str>,
    /// The state's phase, as [`crate::Phase::ALL`] numbers it.
    pub(crate) phase: u8,
    pub(crate) failures: u32,
    pub(crate) next_attempt_ms: Option<u64>,
    /// The binding's session, task id and tag.
    pub(crate) binding: Option<(&'a str, u64, Option<&'a str>)>,
    pub(crate) partial_len: u64,
}

impl<'a> Facts<'a> {
    /// The facts of a record with these files, encoded.
    pub(crate) fn encode_of(id: [u8; 16], state: &[u8], manifest: &[u8]) -> Vec<u8> {
        let tid = crate::TransferId::from_bytes(id);
        let Ok(m) = super::manifest::decode_ref(std::path::Path::new(""), manifest) else {
            return Facts::default().encode();
        };
        if m.id != tid {
            return Facts::default().encode();
        }
        let mut own = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let own = uuid::Uuid::from_bytes(id)
            .hyphenated()
            .encode_lower(&mut own);
        let st = indexed_state(state);
        Facts {
            ok: true,
            download: m.kind == crate::Kind::Download,
            session: m.session,
            key: (m.idempotency_key != own).then_some(m.idempotency_key),
            deadline_ms: m.deadline.map(super::to_ms),
            max_attempts: m.retry.max_attempts,
            initial_backoff_ms: duration_ms(m.retry.initial_backoff),
            max_backoff_ms: duration_ms(m.retry.max_backoff),
            url: m.url,
            ..Facts::default()
        }
        .and_state(&st)
        .encode()
    }

    /// These facts (a valid manifest's) with those of a new state slot, encoded; unchanged
    /// when the manifest failed its checks.
    pub(crate) fn with_state(&self, state: &[u8]) -> Vec<u8> {
        if !self.ok {
            return self.encode();
        }
        self.clone().and_state(&indexed_state(state)).encode()
    }

    /// These facts with those of `st`.
    fn and_state<'s>(self, st: &'s crate::State) -> Facts<'s>
    where
        'a: 's,
    {
        let phase = crate::Phase::ALL
            .iter()
            .position(|p| *p == st.phase)
            .unwrap_or(0);
        Facts {
            replaced_url: st.current_request.as_ref().map(|r| r.url.as_str()),
            phase: u8::try_from(phase).unwrap_or(0),
            failures: st.failures,
            next_attempt_ms: st.next_attempt.map(super::to_ms),
            binding: st
                .binding
                .as_ref()
                .map(|b| (b.session.as_str(), b.task_id, b.tag.as_deref())),
            partial_len: st.partial_len,
            ..self
        }
    }

    fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes facts; `None` for bytes that are not facts. Reads postcard's encoding of
    /// [`Facts`] directly (a reconcile decodes every record's facts): it accepts exactly what
    /// `postcard` would (`decoding_facts_directly_agrees_with_postcard` checks).
    pub(crate) fn decode(b: &'a [u8]) -> Option<Facts<'a>> {
        let mut r = Wire { b };
        let f = Facts {
            ok: r.bool()?,
            download: r.bool()?,
            session: r.str()?,
            key: r.option(Wire::str)?,
            deadline_ms: r.option(Wire::u64)?,
            max_attempts: r.u32()?,
            initial_backoff_ms: r.u64()?,
            max_backoff_ms: r.u64()?,
            url: r.str()?,
            replaced_url: r.option(Wire::str)?,
            phase: r.byte()?,
            failures: r.u32()?,
            next_attempt_ms: r.option(Wire::u64)?,
            binding: r.option(|r| Some((r.str()?, r.u64()?, r.option(Wire::str)?)))?,
            partial_len: r.u64()?,
        };
        r.b.is_empty().then_some(f)
    }
}

/// Reads postcard's wire format: varints (LEB128, at most as many bytes as the type needs,
/// the last one bounded), bytes and options as one byte, strings as a length and UTF-8.
struct Wire<'a> {
    b: &'a [u8],
}

impl<'a> Wire<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.b.split_first()?;
        self.b = rest;
        Some(first)
    }

    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn option<T>(&mut self, some: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        match self.byte()? {
            0 => Some(None),
            1 => some(self).map(Some),
            _ => None,
        }
    }

    /// A varint of a `bits`-bit integer.
    fn varint(&mut self, bits: u32) -> Option<u64> {
        let max = bits.div_ceil(7);
        let mut out = 0u64;
        for i in 0..max {
            let v = self.byte()?;
            out |= u64::from(v & 0x7f) << (7 * i);
            if v & 0x80 == 0 {
                let last_max = (1u64 << (bits % 7)) - 1;
                return (i + 1 < max || u64::from(v) <= last_max).then_some(out);
            }
        }
        None
    }

    fn u64(&mut self) -> Option<u64> {
        self.varint(64)
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.varint(32)?).ok()
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.varint(usize::BITS)?).ok()?;
        if len > self.b.len() {
            return None;
        }
        let (s, rest) = self.b.split_at(len);
        self.b = rest;
        std::str::from_utf8(s).ok()
    }
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The state a record's newest slot holds; a state rebuilt from the manifest when neither slot
/// was valid (as [`crate::Store::scan`] reads such a record).
pub(crate) fn indexed_state(bytes: &[u8]) -> crate::State {
    match super::state::decode_slot(0, bytes) {
        Ok(slot) => slot.state,
        Err(_) => {
            let mut s = crate::State::new();
            s.rebuilt = true;
            s
        }
    }
}

/// The index's records are kept in this many chunks, by the top bits of the id: few, large
/// values read far faster cold than one small value per record.
pub(crate) const CHUNKS: u16 = 1024;

/// The chunk of an id: its top `log2(CHUNKS)` bits.
pub(crate) fn chunk_of(id: &[u8; 16]) -> u16 {
    u16::from_be_bytes([id[0], id[1]]) >> (16 - CHUNKS.trailing_zeros())
}

/// Chunk header: the number of records (4).
const CHUNK_HEADER_LEN: usize = 4;
/// Record header in a chunk of whole records: id (16), flags (1; bit 0: resume data exists),
/// then the lengths of the facts, the state slot and the manifest (4 each).
pub(crate) const RECORD_HEADER_LEN: usize = 29;
/// Record header in a chunk of facts: id (16), flags (1), the facts' length (4).
pub(crate) const FACTS_HEADER_LEN: usize = 21;
/// Chunk trailer: CRC-32 of every byte before it (4).
const CHUNK_TRAILER_LEN: usize = 4;

/// A chunk of `records` (whole ones): their whole records ([`Holds::Whole`]), or their facts
/// only ([`Holds::Facts`]).
pub(crate) fn encode_chunk(records: &[IndexRecord], parts: Holds) -> Vec<u8> {
    let facts_only = parts == Holds::Facts;
    let body: usize = records
        .iter()
        .map(|r| {
            if facts_only {
                FACTS_HEADER_LEN + r.facts().len()
            } else {
                RECORD_HEADER_LEN + r.body.len()
            }
        })
        .sum();
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + body + CHUNK_TRAILER_LEN);
    out.extend_from_slice(
        &u32::try_from(records.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    let len32 = |b: &[u8]| u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes();
    for r in records {
        debug_assert_eq!(r.holds, Holds::Whole, "only whole records are written");
        out.extend_from_slice(&r.id);
        out.push(u8::from(r.resume));
        out.extend_from_slice(&len32(r.facts()));
        if facts_only {
            out.extend_from_slice(r.facts());
        } else {
            out.extend_from_slice(&len32(r.state()));
            out.extend_from_slice(&len32(r.manifest()));
            out.extend_from_slice(&r.body);
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The number of records a chunk says it holds, for reserving room (a damaged chunk may say
/// anything: see [`decode_chunk_into`]'s caller).
pub(crate) fn chunk_len(b: &[u8]) -> usize {
    u32::from_le_bytes(fixed::<4>(b, 0)) as usize
}

/// Decodes the chunk at `range` of `buf` (written by [`encode_chunk`] with `parts`) and
/// appends its records to `out`, which share `buf`. On an error (the chunk's checksum fails,
/// or its records do not fill it exactly) `out` is unchanged.
pub(crate) fn decode_chunk_into(
    buf: &Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
    parts: Holds,
    out: &mut Vec<IndexRecord>,
) -> Result<(), String> {
    let b = buf.get(range).ok_or("chunk out of range")?;
    let crc_at = b
        .len()
        .checked_sub(CHUNK_TRAILER_LEN)
        .filter(|&n| n >= CHUNK_HEADER_LEN)
        .ok_or("chunk too short")?;
    let (content, trailer) = b.split_at(crc_at);
    if crc32fast::hash(content) != u32::from_le_bytes(fixed::<4>(trailer, 0)) {
        return Err("chunk checksum".into());
    }
    let count = chunk_len(content);
    let from = out.len();
    let mut at = CHUNK_HEADER_LEN;
    let facts_only = parts == Holds::Facts;
    let head_len = if facts_only {
        FACTS_HEADER_LEN
    } else {
        RECORD_HEADER_LEN
    };
    let parse = |at: &mut usize| -> Option<IndexRecord> {
        let head = content.get(*at..*at + head_len)?;
        let len = |i: usize| {
            head.get(17 + 4 * i..21 + 4 * i)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(usize::MAX, |b| u32::from_le_bytes(b) as usize)
        };
        let (facts, state, manifest) = if facts_only {
            (len(0), 0, 0)
        } else {
            (len(0), len(1), len(2))
        };
        let start = *at + head_len;
        let end = start
            .checked_add(facts)?
            .checked_add(state)?
            .checked_add(manifest)?;
        let body = content.get(start..end)?;
        *at = end;
        Some(IndexRecord {
            id: head.get(..16).and_then(|b| <[u8; 16]>::try_from(b).ok())?,
            resume: head.get(16).is_some_and(|f| f & 1 == 1),
            body: Shared::within(buf, body),
            facts_end: facts,
            state_end: facts + state,
            holds: if facts_only {
                Holds::Facts
            } else {
                Holds::Whole
            },
        })
    };
    for _ in 0..count {
        match parse(&mut at) {
            Some(r) => out.push(r),
            None => {
                out.truncate(from);
                return Err("record cut short".into());
            }
        }
    }
    if at != content.len() {
        out.truncate(from);
        return Err(format!("{} trailing bytes", content.len() - at));
    }
    Ok(())
}

/// Decodes one chunk on its own.
#[cfg(test)]
pub(crate) fn decode_chunk(b: &[u8], parts: Holds) -> Result<Vec<IndexRecord>, String> {
    let buf = Arc::new(b.to_vec());
    let mut out = Vec::new();
    decode_chunk_into(&buf, 0..b.len(), parts, &mut out)?;
    Ok(out)
}

/// The index's bookkeeping, kept beside the chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IndexMeta {
    /// The journal generation the chunks follow.
    pub(crate) generation: [u8; 16],
    /// The journal offset up to which the chunks are complete.
    pub(crate) consumed: u64,
    /// Names under `transfers/` that are not transfers, as of the last rebuild.
    pub(crate) unknown: Vec<String>,
}

/// The version of the index's tables; another version is rebuilt.
pub(crate) const INDEX_VERSION: u32 = 3;

pub(crate) fn encode_meta(m: &IndexMeta) -> Vec<u8> {
    let mut out = INDEX_VERSION.to_le_bytes().to_vec();
    out.extend(postcard::to_allocvec(m).unwrap_or_default());
    out
}

pub(crate) fn decode_meta(b: &[u8]) -> Option<IndexMeta> {
    if u32::from_le_bytes(fixed::<4>(b, 0)) != INDEX_VERSION {
        return None;
    }
    decode_exact(b.get(4..)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Facts of arbitrary field values (strings as owned parts).
    type Parts = (
        (
            bool,
            bool,
            String,
            Option<String>,
            Option<u64>,
            u32,
            u64,
            u64,
        ),
        (String, Option<String>, u8, u32, Option<u64>),
        (Option<(String, u64, Option<String>)>, u64),
    );

    fn facts_of(p: &Parts) -> Facts<'_> {
        let ((ok, download, session, key, deadline_ms, max_attempts, initial, max), rest, last) = p;
        let (url, replaced, phase, failures, next_attempt_ms) = rest;
        let (binding, partial_len) = last;
        Facts {
            ok: *ok,
            download: *download,
            session,
            key: key.as_deref(),
            deadline_ms: *deadline_ms,
            max_attempts: *max_attempts,
            initial_backoff_ms: *initial,
            max_backoff_ms: *max,
            url,
            replaced_url: replaced.as_deref(),
            phase: *phase,
            failures: *failures,
            next_attempt_ms: *next_attempt_ms,
            binding: binding
                .as_ref()
                .map(|(s, t, g)| (s.as_str(), *t, g.as_deref())),
            partial_len: *partial_len,
        }
    }

    proptest! {
        /// Facts read directly from postcard's bytes are the facts postcard wrote; and for any
        /// bytes (encoded facts with a byte changed, cut short or lengthened, or arbitrary
        /// bytes), reading them directly gives what postcard's decoder gives.
        #[test]
        fn decoding_facts_directly_agrees_with_postcard(
            parts in any::<Parts>(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
            extra in any::<u8>(),
            noise in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let f = facts_of(&parts);
            let bytes = f.encode();
            prop_assert_eq!(Facts::decode(&bytes), Some(f));
            let mut changed = bytes.clone();
            changed[at.index(bytes.len())] = byte;
            let short = &bytes[..cut.index(bytes.len())];
            let mut long = bytes.clone();
            long.push(extra);
            // Varints at their bounds, and a string that is not UTF-8.
            let bounds: [&[u8]; 4] = [
                &[0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f],
                &[0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x1f],
                &[0, 0, 0, 0, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
                &[0, 0, 2, 0xc3, 0x28],
            ];
            for b in [&changed[..], short, &long, &noise].into_iter().chain(bounds) {
                let want: Option<Facts<'_>> = decode_exact(b).ok();
                prop_assert_eq!(Facts::decode(b), want, "{:?}", b);
            }
        }
    }

    #[test]
    fn frames_round_trip_and_damage_reads_as_no_frame() {
        let id = [7u8; 16];
        let body = EntryBody {
            state: vec![1, 2, 3],
            resume: true,
            manifest: Some(vec![9; 40]),
        };
        let payload = postcard::to_allocvec(&body).unwrap_or_default();
        let mut j = encode_frame(TAG_INTENT, &id, &[]);
        j.extend(encode_frame(TAG_ENTRY, &id, &payload));
        let (f1, n1) = decode_frame(&j).expect("intent");
        assert_eq!(f1, Frame::Intent(id));
        let (f2, n2) = decode_frame(&j[n1..]).expect("entry");
        assert_eq!(f2, Frame::Entry(id, body));
        assert_eq!(n1 + n2, j.len());
        // A frame cut short (still being appended) or with any byte flipped is no frame.
        assert!(decode_frame(&j[n1..j.len() - 1]).is_none());
        for i in n1..j.len() {
            let mut bad = j.clone();
            bad[i] ^= 0x10;
            assert!(decode_frame(&bad[n1..]).is_none(), "byte {i} flipped");
        }
    }

    #[test]
    fn journal_header_round_trips_and_boots_compare() {
        for boot in [Boot::Id([3; 16]), Boot::Since(1_700_000_000_123)] {
            let h = JournalHeader {
                generation: [5; 16],
                boot,
            };
            let b = encode_journal_header(&h);
            assert_eq!(decode_journal_header(&b), Some(h));
            let mut bad = b;
            bad[BOOT_VALUE_AT] ^= 1;
            assert_eq!(decode_journal_header(&bad), None);
        }
        assert!(Boot::Since(10_000).same(&Boot::Since(11_500)));
        assert!(!Boot::Since(10_000).same(&Boot::Since(12_500)));
        assert!(!Boot::Id([1; 16]).same(&Boot::Id([2; 16])));
        assert!(!Boot::Id([0; 16]).same(&Boot::Since(0)));
    }

    #[test]
    fn chunks_and_meta_round_trip() {
        let r = IndexRecord::new([1; 16], false, &[4; 30], &[8; 200]);
        let q = IndexRecord::new([2; 16], true, &[], &[9; 10]);
        assert_eq!((r.state(), r.manifest()), (&[4u8; 30][..], &[8u8; 200][..]));
        // Files that are no manifest make facts that say so.
        assert_eq!(Facts::decode(r.facts()), Some(Facts::default()));
        let c = encode_chunk(&[r.clone(), q.clone()], Holds::Whole);
        assert_eq!(
            decode_chunk(&c, Holds::Whole),
            Ok(vec![r.clone(), q.clone()])
        );
        assert_eq!(chunk_len(&c), 2);
        // The facts chunk of the same records: each record's id, flags and facts, nothing else.
        let f = encode_chunk(&[r.clone(), q.clone()], Holds::Facts);
        let got = decode_chunk(&f, Holds::Facts).unwrap();
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip([&r, &q]) {
            assert_eq!((g.id, g.resume, g.facts()), (w.id, w.resume, w.facts()));
            assert_eq!((g.state(), g.manifest()), (&[][..], &[][..]));
            assert_eq!(g.holds(), Holds::Facts);
        }
        assert_eq!(
            f.len(),
            4 + 2 * FACTS_HEADER_LEN + r.facts().len() + q.facts().len() + 4
        );
        // Any byte flipped, or the chunk cut short, fails its checksum; so does reading a
        // chunk as the other kind.
        for (c, parts) in [(&c, Holds::Whole), (&f, Holds::Facts)] {
            for i in 0..c.len() {
                let mut bad = c.clone();
                bad[i] ^= 0x04;
                assert!(decode_chunk(&bad, parts).is_err(), "byte {i} flipped");
            }
            assert!(decode_chunk(&c[..c.len() - 1], parts).is_err());
            assert!(decode_chunk(&[], parts).is_err());
        }
        assert!(decode_chunk(&c, Holds::Facts).is_err());
        assert!(decode_chunk(&f, Holds::Whole).is_err());
        let m = IndexMeta {
            generation: [2; 16],
            consumed: 56,
            unknown: vec!["junk".into()],
        };
        assert_eq!(decode_meta(&encode_meta(&m)), Some(m));
        assert_eq!(chunk_of(&[0xff; 16]), CHUNKS - 1);
        assert_eq!(chunk_of(&[0; 16]), 0);
    }
}
