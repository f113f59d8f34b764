//! Property tests of the batch codec: arbitrary bytes never panic the decoder, every encoded
//! batch decodes to the same records, and any single-byte change to a batch is rejected.

use bytes::Bytes;
use proptest::prelude::*;
use tern::log::batch::{validate, Batch, BatchBuilder, Header, Record, HEADER_LEN, VERSION};
use tern::types::{Offset, Term, TimestampMs};

fn record() -> impl Strategy<Value = Record> {
    (
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(
            ("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..16)),
            0..4,
        ),
        any::<i64>(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(key, value, headers, ts, ttl)| Record {
            key: key.map(Bytes::from),
            value: Bytes::from(value),
            headers: headers
                .into_iter()
                .map(|(name, value)| Header {
                    name,
                    value: Bytes::from(value),
                })
                .collect(),
            timestamp: TimestampMs(ts),
            ttl_ms: ttl,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = validate(&data);
        let _ = Batch::decode(Bytes::from(data));
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..1024),
        count in 1u32..50,
    ) {
        // A header with the right magic, length and CRC, followed by random "records": this
        // reaches the record parser, which random bytes alone almost never do.
        let len = HEADER_LEN + body.len();
        let mut b = vec![0u8; HEADER_LEN];
        b[0..3].copy_from_slice(b"TRN");
        b[3] = VERSION;
        b[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        b[20..24].copy_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&body);
        let crc = crc32c::crc32c(&b[12..]);
        b[8..12].copy_from_slice(&crc.to_le_bytes());
        if let Ok(batch) = Batch::decode(Bytes::from(b)) {
            // Whatever decodes must iterate exactly `count` records without trouble.
            prop_assert_eq!(batch.records().count() as u32, count);
        }
    }

    #[test]
    fn round_trip(records in proptest::collection::vec(record(), 1..20), base in 0u64..1 << 60, term in any::<u64>(), index in any::<u64>()) {
        let mut b = BatchBuilder::new(1 << 20);
        for r in &records {
            b.push(r).unwrap();
        }
        let batch = b.finish().unwrap().stamped_entry(Offset(base), Term(term), index);
        let back = Batch::decode(batch.bytes().clone()).unwrap();
        prop_assert_eq!(back.base_offset(), Offset(base));
        prop_assert_eq!(back.meta().term, Term(term));
        prop_assert_eq!(back.meta().raft_index, index);
        let got: Vec<Record> = back.records().map(|r| r.to_record()).collect();
        prop_assert_eq!(got, records);
    }

    #[test]
    fn encoded_len_bound_is_an_upper_bound(r in record()) {
        let mut b = BatchBuilder::new(64 << 20);
        b.push(&r).unwrap();
        let actual = b.len() - tern::log::batch::HEADER_LEN;
        prop_assert!(actual <= r.encoded_len_bound(), "{} > {}", actual, r.encoded_len_bound());
        // And a builder whose limit is exactly the bound accepts the record.
        let mut tight = BatchBuilder::new(tern::log::batch::HEADER_LEN + r.encoded_len_bound());
        prop_assert!(tight.push(&r).is_ok());
    }

    #[test]
    fn any_changed_byte_is_rejected(records in proptest::collection::vec(record(), 1..5), at in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let mut b = BatchBuilder::new(1 << 20);
        for r in &records {
            b.push(r).unwrap();
        }
        let mut bytes = b.finish().unwrap().bytes().to_vec();
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        prop_assert!(validate(&bytes).is_err(), "change at byte {} accepted", i);
    }
}
