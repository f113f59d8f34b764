//! The record batch: the unit Tern appends, replicates, stores and reads.
//!
//! A batch is a 72-byte header followed by its records; `docs/storage.md` gives the layout byte
//! by byte. The CRC covers every field after it, base offset and term included, so a flipped
//! bit anywhere in a stored batch is caught; stamping the offset and term (the log or a Raft
//! leader does it once per append) recomputes it.
//!
//! Encoding and decoding check every length before using it: any byte string either decodes to
//! a [`Batch`] whose records can all be read, or yields a [`BatchError`]. Nothing here panics on
//! input.

use bytes::Bytes;

use super::varint;
use crate::types::{Offset, ProducerId, Sequence, Term, TimestampMs};

/// Bytes in a batch header.
pub const HEADER_LEN: usize = 72;
/// The three magic bytes that start every batch.
pub const MAGIC: [u8; 3] = *b"TRN";
/// The format version this code writes and reads.
pub const VERSION: u8 = 2;
/// The largest batch the format allows; logs and the network enforce smaller limits.
pub const BATCH_LEN_MAX: usize = 64 << 20;
/// Most headers one record may carry.
pub const HEADERS_PER_RECORD_MAX: usize = 1024;

// Field positions inside the header (see docs/storage.md).
const AT_MAGIC: usize = 0;
const AT_VERSION: usize = 3;
const AT_BATCH_LEN: usize = 4;
const AT_CRC: usize = 8;
/// The CRC covers everything from here to the end of the batch.
const CRC_START: usize = 12;
const AT_BASE_OFFSET: usize = 12;
const AT_RECORD_COUNT: usize = 20;
const AT_TERM: usize = 24;
const AT_FIRST_TS: usize = 32;
const AT_MAX_TS: usize = 40;
const AT_PRODUCER_ID: usize = 48;
const AT_BASE_SEQUENCE: usize = 56;
const AT_ATTRIBUTES: usize = 60;
const AT_RESERVED: usize = 62;
const AT_RAFT_INDEX: usize = 64;

/// Batch attribute bits.
const ATTR_COMPRESSION_MASK: u16 = 0b111;
const ATTR_CONTROL: u16 = 1 << 4;
const ATTR_KNOWN: u16 = ATTR_COMPRESSION_MASK | ATTR_CONTROL;
/// Record attribute bits.
const REC_ATTR_TTL: u8 = 1;

/// Why a byte string is not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch truncated: needs {need} bytes, {have} available")]
    Truncated { need: usize, have: usize },
    #[error("bad batch magic {0:?}")]
    BadMagic([u8; 3]),
    #[error("unsupported batch version {0}")]
    UnsupportedVersion(u8),
    #[error("batch length {0} outside [{HEADER_LEN}, {BATCH_LEN_MAX}]")]
    BadLength(u64),
    #[error("batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("malformed batch: {0}")]
    Malformed(&'static str),
    #[error("compression codec {0} is not supported yet")]
    UnsupportedCompression(u16),
    #[error("batch would be {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("a batch needs at least one record")]
    Empty,
}

/// One header of a record: a UTF-8 name and an opaque value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Bytes,
}

/// A record as a producer hands it to a batch builder.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    pub timestamp: TimestampMs,
    /// Time to live after `timestamp`; reads hide the record once it has passed.
    pub ttl_ms: Option<u64>,
}

impl Record {
    /// An upper bound of the bytes this record takes in a batch (every varint counted at its
    /// longest): if `HEADER_LEN + bound` fits a batch limit, pushing it into an empty builder
    /// with that limit cannot fail.
    pub fn encoded_len_bound(&self) -> usize {
        const V: usize = varint::MAX_VARINT_LEN;
        // length prefix, attributes, timestamp, offset delta, key tag, value length, header
        // count, time to live
        let fixed = V + 1 + V + V + V + V + V + V;
        fixed
            + self.key.as_ref().map_or(0, |k| k.len())
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|h| 2 * V + h.name.len() + h.value.len())
                .sum::<usize>()
    }
}

/// What the header of a valid batch says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchMeta {
    pub base_offset: Offset,
    pub term: Term,
    /// The Raft log index of the entry this batch is (0 outside Raft).
    pub raft_index: u64,
    /// Total bytes, header included.
    pub len: usize,
    pub record_count: u32,
    pub first_timestamp: TimestampMs,
    pub max_timestamp: TimestampMs,
    pub producer_id: ProducerId,
    pub base_sequence: Sequence,
    pub control: bool,
}

impl BatchMeta {
    /// The offset of the last record in the batch.
    pub fn last_offset(&self) -> Offset {
        self.base_offset.plus(self.record_count as u64 - 1)
    }

    /// The offset right after the batch.
    pub fn next_offset(&self) -> Offset {
        self.base_offset.plus(self.record_count as u64)
    }
}

/// Builds one batch from records. The base offset and term are left at zero: the log stamps
/// them when it appends.
pub struct BatchBuilder {
    buf: Vec<u8>,
    scratch: Vec<u8>,
    count: u32,
    first_ts: i64,
    max_ts: i64,
    producer_id: ProducerId,
    base_sequence: Sequence,
    control: bool,
    len_max: usize,
}

impl BatchBuilder {
    /// A builder whose batch may grow to `len_max` bytes (capped at [`BATCH_LEN_MAX`]).
    pub fn new(len_max: usize) -> Self {
        Self {
            buf: vec![0; HEADER_LEN],
            scratch: Vec::new(),
            count: 0,
            first_ts: 0,
            max_ts: 0,
            producer_id: ProducerId::NONE,
            base_sequence: Sequence::NONE,
            control: false,
            len_max: len_max.min(BATCH_LEN_MAX),
        }
    }

    /// Marks the batch as written by an idempotent producer.
    pub fn producer(mut self, id: ProducerId, base_sequence: Sequence) -> Self {
        self.producer_id = id;
        self.base_sequence = base_sequence;
        self
    }

    /// Marks the batch as a control batch (written by the broker, not a producer).
    pub fn control(mut self) -> Self {
        self.control = true;
        self
    }

    pub fn record_count(&self) -> u32 {
        self.count
    }

    /// Bytes the batch takes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends a record. On error the builder is unchanged.
    pub fn push(&mut self, r: &Record) -> Result<(), BatchError> {
        if self.count == 0 {
            self.first_ts = r.timestamp.0;
            self.max_ts = r.timestamp.0;
        }
        if r.headers.len() > HEADERS_PER_RECORD_MAX {
            return Err(BatchError::Malformed("too many headers on one record"));
        }
        let ts_delta = r.timestamp.0.wrapping_sub(self.first_ts);
        let s = &mut self.scratch;
        s.clear();
        s.push(if r.ttl_ms.is_some() { REC_ATTR_TTL } else { 0 });
        varint::put_i64(s, ts_delta);
        varint::put_u64(s, self.count as u64);
        match &r.key {
            None => varint::put_u64(s, 0),
            Some(k) => {
                varint::put_u64(s, k.len() as u64 + 1);
                s.extend_from_slice(k);
            }
        }
        varint::put_u64(s, r.value.len() as u64);
        s.extend_from_slice(&r.value);
        varint::put_u64(s, r.headers.len() as u64);
        for h in &r.headers {
            varint::put_u64(s, h.name.len() as u64);
            s.extend_from_slice(h.name.as_bytes());
            varint::put_u64(s, h.value.len() as u64);
            s.extend_from_slice(&h.value);
        }
        if let Some(ttl) = r.ttl_ms {
            varint::put_u64(s, ttl);
        }
        let len = self.buf.len() + varint::len_u64(s.len() as u64) + s.len();
        if len > self.len_max {
            if self.count == 0 {
                self.first_ts = 0;
                self.max_ts = 0;
            }
            return Err(BatchError::TooLarge {
                len,
                max: self.len_max,
            });
        }
        varint::put_u64(&mut self.buf, s.len() as u64);
        self.buf.extend_from_slice(s);
        self.count += 1;
        self.max_ts = self.max_ts.max(r.timestamp.0);
        Ok(())
    }

    /// Fills in the header and checksum.
    pub fn finish(mut self) -> Result<Batch, BatchError> {
        if self.count == 0 {
            return Err(BatchError::Empty);
        }
        let len = self.buf.len();
        let b = &mut self.buf;
        b[AT_BATCH_LEN..AT_BATCH_LEN + 4].copy_from_slice(&(len as u32).to_le_bytes());
        b[AT_MAGIC..AT_MAGIC + 3].copy_from_slice(&MAGIC);
        b[AT_VERSION] = VERSION;
        let attrs: u16 = if self.control { ATTR_CONTROL } else { 0 };
        b[AT_ATTRIBUTES..AT_ATTRIBUTES + 2].copy_from_slice(&attrs.to_le_bytes());
        b[AT_RECORD_COUNT..AT_RECORD_COUNT + 4].copy_from_slice(&self.count.to_le_bytes());
        b[AT_FIRST_TS..AT_FIRST_TS + 8].copy_from_slice(&self.first_ts.to_le_bytes());
        b[AT_MAX_TS..AT_MAX_TS + 8].copy_from_slice(&self.max_ts.to_le_bytes());
        b[AT_PRODUCER_ID..AT_PRODUCER_ID + 8].copy_from_slice(&self.producer_id.0.to_le_bytes());
        b[AT_BASE_SEQUENCE..AT_BASE_SEQUENCE + 4]
            .copy_from_slice(&self.base_sequence.0.to_le_bytes());
        let crc = crc32c::crc32c(&b[CRC_START..]);
        b[AT_CRC..AT_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        Ok(Batch {
            bytes: Bytes::from(self.buf),
        })
    }
}

/// Writes the base offset, term and Raft index into an encoded batch (exactly one whole batch)
/// and recomputes its CRC.
pub fn stamp(batch: &mut [u8], base_offset: Offset, term: Term, raft_index: u64) {
    batch[AT_BASE_OFFSET..AT_BASE_OFFSET + 8].copy_from_slice(&base_offset.0.to_le_bytes());
    batch[AT_TERM..AT_TERM + 8].copy_from_slice(&term.0.to_le_bytes());
    batch[AT_RAFT_INDEX..AT_RAFT_INDEX + 8].copy_from_slice(&raft_index.to_le_bytes());
    let crc = crc32c::crc32c(&batch[CRC_START..]);
    batch[AT_CRC..AT_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Reads the length of the batch at the front of `buf` from its header, checking only the
/// magic and the length bounds (not the CRC). Used to know how many bytes to read.
pub fn peek_len(buf: &[u8]) -> Result<usize, BatchError> {
    if buf.len() < HEADER_LEN {
        return Err(BatchError::Truncated {
            need: HEADER_LEN,
            have: buf.len(),
        });
    }
    let magic = [buf[AT_MAGIC], buf[AT_MAGIC + 1], buf[AT_MAGIC + 2]];
    if magic != MAGIC {
        return Err(BatchError::BadMagic(magic));
    }
    let len = u32_at(buf, AT_BATCH_LEN) as usize;
    if !(HEADER_LEN..=BATCH_LEN_MAX).contains(&len) {
        return Err(BatchError::BadLength(len as u64));
    }
    Ok(len)
}

/// Checks the batch at the front of `buf` completely: header, CRC, and every record.
/// Bytes after the batch are ignored.
pub fn validate(buf: &[u8]) -> Result<BatchMeta, BatchError> {
    let len = peek_len(buf)?;
    if buf.len() < len {
        return Err(BatchError::Truncated {
            need: len,
            have: buf.len(),
        });
    }
    let b = &buf[..len];
    let stored = u32_at(b, AT_CRC);
    let computed = crc32c::crc32c(&b[CRC_START..]);
    if stored != computed {
        return Err(BatchError::CrcMismatch { stored, computed });
    }
    if b[AT_VERSION] != VERSION {
        return Err(BatchError::UnsupportedVersion(b[AT_VERSION]));
    }
    let attrs = u16_at(b, AT_ATTRIBUTES);
    if attrs & !ATTR_KNOWN != 0 || u16_at(b, AT_RESERVED) != 0 {
        return Err(BatchError::Malformed("unknown attribute bits"));
    }
    if attrs & ATTR_COMPRESSION_MASK != 0 {
        return Err(BatchError::UnsupportedCompression(
            attrs & ATTR_COMPRESSION_MASK,
        ));
    }
    let meta = BatchMeta {
        base_offset: Offset(u64_at(b, AT_BASE_OFFSET)),
        term: Term(u64_at(b, AT_TERM)),
        raft_index: u64_at(b, AT_RAFT_INDEX),
        len,
        record_count: u32_at(b, AT_RECORD_COUNT),
        first_timestamp: TimestampMs(u64_at(b, AT_FIRST_TS) as i64),
        max_timestamp: TimestampMs(u64_at(b, AT_MAX_TS) as i64),
        producer_id: ProducerId(u64_at(b, AT_PRODUCER_ID) as i64),
        base_sequence: Sequence(u32_at(b, AT_BASE_SEQUENCE) as i32),
        control: attrs & ATTR_CONTROL != 0,
    };
    if meta.record_count == 0 {
        return Err(BatchError::Empty);
    }
    if meta
        .base_offset
        .0
        .checked_add(meta.record_count as u64)
        .is_none()
    {
        return Err(BatchError::Malformed("offsets overflow"));
    }
    // Walk every record once; afterwards iteration cannot fail.
    let mut pos = HEADER_LEN;
    let mut max_ts = i64::MIN;
    for i in 0..meta.record_count {
        let (rec, used) = parse_record(&b[pos..], meta.first_timestamp.0)?;
        if rec.offset_delta != i {
            return Err(BatchError::Malformed("offset deltas are not consecutive"));
        }
        if i == 0 && rec.timestamp != meta.first_timestamp.0 {
            return Err(BatchError::Malformed(
                "first timestamp differs from first record",
            ));
        }
        max_ts = max_ts.max(rec.timestamp);
        pos += used;
    }
    if pos != len {
        return Err(BatchError::Malformed("bytes left after the last record"));
    }
    if max_ts != meta.max_timestamp.0 {
        return Err(BatchError::Malformed(
            "max timestamp does not match records",
        ));
    }
    Ok(meta)
}

/// A record read in place from a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub offset: Offset,
    pub timestamp: TimestampMs,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    headers: &'a [u8],
    header_count: usize,
    pub ttl_ms: Option<u64>,
}

impl<'a> RecordView<'a> {
    /// When the record stops being readable, if it has a time to live.
    pub fn expires_at(&self) -> Option<TimestampMs> {
        self.ttl_ms.map(|ttl| {
            TimestampMs(
                self.timestamp
                    .0
                    .saturating_add(ttl.min(i64::MAX as u64) as i64),
            )
        })
    }

    pub fn is_expired(&self, now: TimestampMs) -> bool {
        self.expires_at().is_some_and(|at| at <= now)
    }

    /// The record's headers in order.
    pub fn headers(&self) -> HeaderIter<'a> {
        HeaderIter {
            buf: self.headers,
            left: self.header_count,
        }
    }

    /// An owned copy, for handing the record elsewhere.
    pub fn to_record(&self) -> Record {
        Record {
            key: self.key.map(Bytes::copy_from_slice),
            value: Bytes::copy_from_slice(self.value),
            headers: self
                .headers()
                .map(|(n, v)| Header {
                    name: n.to_string(),
                    value: Bytes::copy_from_slice(v),
                })
                .collect(),
            timestamp: self.timestamp,
            ttl_ms: self.ttl_ms,
        }
    }
}

/// Headers of a validated record.
pub struct HeaderIter<'a> {
    buf: &'a [u8],
    left: usize,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let (name, n) = take_bytes(self.buf)?;
        let (value, m) = take_bytes(&self.buf[n..])?;
        self.buf = &self.buf[n + m..];
        self.left -= 1;
        // Validated as UTF-8 when the batch was decoded.
        Some((std::str::from_utf8(name).ok()?, value))
    }
}

struct ParsedRecord<'a> {
    offset_delta: u32,
    timestamp: i64,
    key: Option<&'a [u8]>,
    value: &'a [u8],
    headers: &'a [u8],
    header_count: usize,
    ttl_ms: Option<u64>,
}

/// Reads a length-prefixed byte string.
fn take_bytes(buf: &[u8]) -> Option<(&[u8], usize)> {
    let (len, n) = varint::get_u64(buf)?;
    let end = n.checked_add(usize::try_from(len).ok()?)?;
    Some((buf.get(n..end)?, end))
}

fn parse_record(buf: &[u8], first_ts: i64) -> Result<(ParsedRecord<'_>, usize), BatchError> {
    const BAD: BatchError = BatchError::Malformed("record fields overrun the record");
    let (body_len, n) = varint::get_u64(buf).ok_or(BAD)?;
    let end = usize::try_from(body_len)
        .ok()
        .and_then(|l| n.checked_add(l))
        .ok_or(BAD)?;
    let body = buf.get(n..end).ok_or(BAD)?;
    let attrs = *body.first().ok_or(BAD)?;
    if attrs & !REC_ATTR_TTL != 0 {
        return Err(BatchError::Malformed("unknown record attribute bits"));
    }
    let mut p = 1;
    let (ts_delta, k) = varint::get_i64(&body[p..]).ok_or(BAD)?;
    p += k;
    let (offset_delta, k) = varint::get_u64(&body[p..]).ok_or(BAD)?;
    p += k;
    let offset_delta =
        u32::try_from(offset_delta).map_err(|_| BatchError::Malformed("offset delta"))?;
    let (key_tag, k) = varint::get_u64(&body[p..]).ok_or(BAD)?;
    p += k;
    let key = if key_tag == 0 {
        None
    } else {
        let len = usize::try_from(key_tag - 1).map_err(|_| BAD)?;
        let end = p.checked_add(len).ok_or(BAD)?;
        let key = body.get(p..end).ok_or(BAD)?;
        p = end;
        Some(key)
    };
    let (value, k) = take_bytes(&body[p..]).ok_or(BAD)?;
    p += k;
    let (header_count, k) = varint::get_u64(&body[p..]).ok_or(BAD)?;
    p += k;
    if header_count > HEADERS_PER_RECORD_MAX as u64 {
        return Err(BatchError::Malformed("too many headers on one record"));
    }
    let headers_start = p;
    for _ in 0..header_count {
        let (name, k) = take_bytes(&body[p..]).ok_or(BAD)?;
        if std::str::from_utf8(name).is_err() {
            return Err(BatchError::Malformed("header name is not UTF-8"));
        }
        p += k;
        let (_, k) = take_bytes(&body[p..]).ok_or(BAD)?;
        p += k;
    }
    let headers = &body[headers_start..p];
    let ttl_ms = if attrs & REC_ATTR_TTL != 0 {
        let (ttl, k) = varint::get_u64(&body[p..]).ok_or(BAD)?;
        p += k;
        Some(ttl)
    } else {
        None
    };
    if p != body.len() {
        return Err(BatchError::Malformed("bytes left inside a record"));
    }
    Ok((
        ParsedRecord {
            offset_delta,
            timestamp: first_ts.wrapping_add(ts_delta),
            key,
            value,
            headers,
            header_count: header_count as usize,
            ttl_ms,
        },
        end,
    ))
}

/// A validated batch held in shared memory. Cloning is cheap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    bytes: Bytes,
}

impl Batch {
    /// Validates `bytes` as exactly one batch.
    pub fn decode(bytes: Bytes) -> Result<Batch, BatchError> {
        let meta = validate(&bytes)?;
        if meta.len != bytes.len() {
            return Err(BatchError::Malformed("bytes after the batch"));
        }
        Ok(Batch { bytes })
    }

    /// Validates the batch at the front of `bytes`; returns it and its length.
    pub fn decode_prefix(bytes: &Bytes) -> Result<(Batch, usize), BatchError> {
        let meta = validate(bytes)?;
        Ok((
            Batch {
                bytes: bytes.slice(..meta.len),
            },
            meta.len,
        ))
    }

    /// The header fields. Cheap: reads fixed positions of an already validated batch.
    pub fn meta(&self) -> BatchMeta {
        let b = &self.bytes[..];
        BatchMeta {
            base_offset: Offset(u64_at(b, AT_BASE_OFFSET)),
            term: Term(u64_at(b, AT_TERM)),
            raft_index: u64_at(b, AT_RAFT_INDEX),
            len: b.len(),
            record_count: u32_at(b, AT_RECORD_COUNT),
            first_timestamp: TimestampMs(u64_at(b, AT_FIRST_TS) as i64),
            max_timestamp: TimestampMs(u64_at(b, AT_MAX_TS) as i64),
            producer_id: ProducerId(u64_at(b, AT_PRODUCER_ID) as i64),
            base_sequence: Sequence(u32_at(b, AT_BASE_SEQUENCE) as i32),
            control: u16_at(b, AT_ATTRIBUTES) & ATTR_CONTROL != 0,
        }
    }

    pub fn base_offset(&self) -> Offset {
        Offset(u64_at(&self.bytes, AT_BASE_OFFSET))
    }

    pub fn record_count(&self) -> u32 {
        u32_at(&self.bytes, AT_RECORD_COUNT)
    }

    pub fn last_offset(&self) -> Offset {
        self.base_offset().plus(self.record_count() as u64 - 1)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The encoded bytes, as stored and sent.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// A copy with the base offset and term stamped in (Raft index 0).
    pub fn stamped(&self, base_offset: Offset, term: Term) -> Batch {
        self.stamped_entry(base_offset, term, 0)
    }

    /// A copy stamped as Raft entry `raft_index` of `term`, starting at `base_offset`.
    pub fn stamped_entry(&self, base_offset: Offset, term: Term, raft_index: u64) -> Batch {
        let mut v = self.bytes.to_vec();
        stamp(&mut v, base_offset, term, raft_index);
        Batch {
            bytes: Bytes::from(v),
        }
    }

    /// The records, in offset order.
    pub fn records(&self) -> RecordIter<'_> {
        RecordIter {
            buf: &self.bytes[HEADER_LEN..],
            base: self.base_offset(),
            first_ts: u64_at(&self.bytes, AT_FIRST_TS) as i64,
        }
    }
}

/// Records of a validated batch.
pub struct RecordIter<'a> {
    buf: &'a [u8],
    base: Offset,
    first_ts: i64,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = RecordView<'a>;
    fn next(&mut self) -> Option<RecordView<'a>> {
        if self.buf.is_empty() {
            return None;
        }
        // The batch was validated when it was built or decoded, so this cannot fail; if it
        // somehow did, iteration ends rather than returning garbage.
        let (r, used) = match parse_record(self.buf, self.first_ts) {
            Ok(x) => x,
            Err(_) => {
                debug_assert!(false, "validated batch failed to parse");
                self.buf = &[];
                return None;
            }
        };
        self.buf = &self.buf[used..];
        Some(RecordView {
            offset: self.base.plus(r.offset_delta as u64),
            timestamp: TimestampMs(r.timestamp),
            key: r.key,
            value: r.value,
            headers: r.headers,
            header_count: r.header_count,
            ttl_ms: r.ttl_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32) -> Record {
        Record {
            key: (i % 2 == 0).then(|| Bytes::from(format!("k{i}"))),
            value: Bytes::from(vec![i as u8; i as usize]),
            headers: (0..i % 3)
                .map(|h| Header {
                    name: format!("h{h}"),
                    value: Bytes::from_static(b"v"),
                })
                .collect(),
            timestamp: TimestampMs(1_000 + (i as i64 % 5) - 2),
            ttl_ms: (i % 4 == 0).then_some(60_000),
        }
    }

    #[test]
    fn round_trip() {
        let mut b = BatchBuilder::new(1 << 20).producer(ProducerId(7), Sequence(3));
        let recs: Vec<Record> = (0..20).map(rec).collect();
        for r in &recs {
            b.push(r).unwrap();
        }
        let batch = b.finish().unwrap().stamped(Offset(100), Term(4));
        let decoded = Batch::decode(batch.bytes().clone()).unwrap();
        let m = decoded.meta();
        assert_eq!(m.base_offset, Offset(100));
        assert_eq!(m.last_offset(), Offset(119));
        assert_eq!(m.term, Term(4));
        assert_eq!(m.producer_id, ProducerId(7));
        assert_eq!(m.base_sequence, Sequence(3));
        assert_eq!(m.first_timestamp, TimestampMs(998));
        assert_eq!(m.max_timestamp, TimestampMs(1002));
        let out: Vec<Record> = decoded.records().map(|r| r.to_record()).collect();
        assert_eq!(out, recs);
        let offsets: Vec<u64> = decoded.records().map(|r| r.offset.0).collect();
        assert_eq!(offsets, (100..120).collect::<Vec<_>>());
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let mut b = BatchBuilder::new(1 << 20);
        for i in 0..3 {
            b.push(&rec(i)).unwrap();
        }
        let good = b.finish().unwrap().bytes().to_vec();
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                assert!(validate(&bad).is_err(), "flip at {byte}:{bit} not caught");
            }
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        let mut b = BatchBuilder::new(1 << 20);
        b.push(&rec(5)).unwrap();
        let good = b.finish().unwrap().bytes().to_vec();
        for cut in 0..good.len() {
            assert!(validate(&good[..cut]).is_err());
        }
    }

    #[test]
    fn size_limit_is_enforced_and_builder_unchanged() {
        let mut b = BatchBuilder::new(200);
        b.push(&rec(10)).unwrap();
        let big = Record {
            value: Bytes::from(vec![0; 500]),
            ..Record::default()
        };
        assert!(matches!(b.push(&big), Err(BatchError::TooLarge { .. })));
        assert_eq!(b.record_count(), 1);
        let batch = b.finish().unwrap();
        assert_eq!(batch.records().count(), 1);
        assert_eq!(BatchBuilder::new(100).finish(), Err(BatchError::Empty));
    }

    #[test]
    fn expiry() {
        let mut b = BatchBuilder::new(1 << 20);
        b.push(&Record {
            timestamp: TimestampMs(1000),
            ttl_ms: Some(500),
            ..Record::default()
        })
        .unwrap();
        let batch = b.finish().unwrap();
        let r = batch.records().next().unwrap();
        assert_eq!(r.expires_at(), Some(TimestampMs(1500)));
        assert!(!r.is_expired(TimestampMs(1499)));
        assert!(r.is_expired(TimestampMs(1500)));
    }
}
