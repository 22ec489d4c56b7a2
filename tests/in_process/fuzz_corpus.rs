//! Replays the fuzz target's harness (decode -> convert -> validate -> apply)
//! on a deterministic corpus, so that CI exercises the no-panic property on
//! stable Rust: hand-crafted requests with known outcomes, every truncation
//! and random mutations of them, random well-formed requests, and random
//! bytes. `cargo +nightly fuzz run decode_validate_merge` explores further
//! (see fuzz/README.md).

#[path = "../fuzz_harness/mod.rs"]
mod fuzz_harness;

use std::collections::BTreeMap;

use fuzz_harness::{Outcome, decode_validate_apply};
use metadata_service::proto::v1::{MergeUserMetadataRequest, ReplaceUserMetadataRequest};
use prost::Message;
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

const MERGE: u8 = 0;
const REPLACE: u8 = 1;

/// SplitMix64: a fixed seed gives the same corpus on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn input(selector: u8, message: &impl Message) -> Vec<u8> {
    let mut data = vec![selector];
    message.encode(&mut data).expect("a Vec grows");
    data
}

fn value(kind: Kind) -> Value {
    Value { kind: Some(kind) }
}

fn number(n: f64) -> Value {
    value(Kind::NumberValue(n))
}

fn text(s: &str) -> Value {
    value(Kind::StringValue(s.to_owned()))
}

fn null() -> Value {
    value(Kind::NullValue(0))
}

fn structure(fields: Vec<(&str, Value)>) -> Struct {
    Struct {
        fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}

fn merge(id: &str, public: Option<Struct>, private: Option<Struct>) -> MergeUserMetadataRequest {
    MergeUserMetadataRequest {
        user_id: id.to_owned(),
        public_metadata: public,
        private_metadata: private,
        ..Default::default()
    }
}

fn replace(id: &str, public: Option<Value>, unsafe_: Option<Value>) -> ReplaceUserMetadataRequest {
    ReplaceUserMetadataRequest {
        user_id: id.to_owned(),
        public_metadata: public,
        unsafe_metadata: unsafe_,
        ..Default::default()
    }
}

/// `{"k":{"k":...}}`, `levels` structs deep.
fn nested_struct(levels: usize) -> Struct {
    (1..levels).fold(structure(vec![]), |inner, _| {
        structure(vec![("k", value(Kind::StructValue(inner)))])
    })
}

/// A request whose public_metadata nests `levels` containers: lists in a
/// Replace, `{"k":{"k":...}}` in a Merge. Encoded by hand, as prost would
/// recurse to build it: written back to front, then reversed, so that each
/// length is known when its prefix is written.
fn deep_request(selector: u8, levels: usize) -> Vec<u8> {
    fn push_prefix(reversed: &mut Vec<u8>, tag: u8) {
        let mut len = reversed.len() as u64;
        let mut varint = Vec::new();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                varint.push(byte);
                break;
            }
            varint.push(byte | 0x80);
        }
        reversed.extend(varint.iter().rev());
        reversed.push(tag);
    }
    // Value { number_value: 1.0 }, reversed.
    let mut reversed: Vec<u8> = [0x11]
        .into_iter()
        .chain(1.0f64.to_le_bytes())
        .rev()
        .collect();
    for level in 0..levels {
        if selector == REPLACE {
            push_prefix(&mut reversed, 0x0a); // ListValue.values = 1
            push_prefix(&mut reversed, 0x32); // Value.list_value = 6
        } else {
            push_prefix(&mut reversed, 0x12); // map entry value = 2
            reversed.extend([b'k', 1, 0x0a]); // map entry key = 1: "k"
            push_prefix(&mut reversed, 0x0a); // Struct.fields = 1
            if level + 1 < levels {
                push_prefix(&mut reversed, 0x2a); // Value.struct_value = 5
            }
        }
    }
    push_prefix(&mut reversed, 0x12); // public_metadata = 2
    reversed.extend([b'u', 1, 0x0a]); // user_id = 1: "u"
    reversed.push(selector);
    reversed.reverse();
    reversed
}

/// Inputs with the outcome each must have.
fn seeds() -> Vec<(&'static str, Vec<u8>, Outcome)> {
    let issue_patch = structure(vec![
        (
            "a",
            value(Kind::StructValue(structure(vec![
                ("c", null()),
                ("e", number(3.0)),
            ]))),
        ),
        (
            "d",
            value(Kind::ListValue(ListValue {
                values: vec![number(3.0)],
            })),
        ),
    ]);
    let mut versioned = merge("user_1", Some(issue_patch.clone()), None);
    versioned.expected_version = Some(7);
    let nan_list = value(Kind::ListValue(ListValue {
        values: vec![number(1.0), number(f64::NAN)],
    }));
    vec![
        ("empty input", vec![], Outcome::Empty),
        ("default merge: empty id", vec![MERGE], Outcome::Invalid),
        ("default replace: empty id", vec![REPLACE], Outcome::Invalid),
        (
            "merge the issue's example",
            input(MERGE, &merge("user_1", Some(issue_patch), None)),
            Outcome::Applied,
        ),
        (
            "merge with expected version",
            input(MERGE, &versioned),
            Outcome::Applied,
        ),
        (
            "merge into a stored null",
            input(
                MERGE,
                &MergeUserMetadataRequest {
                    user_id: "u".into(),
                    unsafe_metadata: Some(structure(vec![("k", text("v"))])),
                    ..Default::default()
                },
            ),
            Outcome::Applied,
        ),
        (
            "replace with a struct and a null",
            input(
                REPLACE,
                &replace(
                    "user_1",
                    Some(value(Kind::StructValue(structure(vec![(
                        "z",
                        number(0.5),
                    )])))),
                    Some(null()),
                ),
            ),
            Outcome::Applied,
        ),
        (
            "merge 32 levels deep",
            input(MERGE, &merge("u", Some(nested_struct(32)), None)),
            Outcome::Applied,
        ),
        (
            "merge 33 levels deep",
            input(MERGE, &merge("u", Some(nested_struct(33)), None)),
            Outcome::Invalid,
        ),
        (
            "merge growing a field past 8 KiB",
            input(
                MERGE,
                &merge(
                    "u",
                    Some(structure(vec![("big", text(&"x".repeat(8_150)))])),
                    None,
                ),
            ),
            Outcome::Refused,
        ),
        (
            "NaN in a list",
            input(
                MERGE,
                &merge("u", None, Some(structure(vec![("a", nan_list)]))),
            ),
            Outcome::Unconvertible,
        ),
        (
            "infinity",
            input(REPLACE, &replace("u", Some(number(f64::INFINITY)), None)),
            Outcome::Unconvertible,
        ),
        (
            "unset value",
            input(REPLACE, &replace("u", Some(Value { kind: None }), None)),
            Outcome::Unconvertible,
        ),
        (
            "replace with a number",
            input(REPLACE, &replace("u", Some(number(1.0)), None)),
            Outcome::Invalid,
        ),
        (
            "U+0000 in a key",
            input(
                MERGE,
                &merge("u", Some(structure(vec![("a\0", null())])), None),
            ),
            Outcome::Invalid,
        ),
        (
            "U+0000 in a string",
            input(
                MERGE,
                &merge("u", Some(structure(vec![("a", text("\0"))])), None),
            ),
            Outcome::Invalid,
        ),
        (
            "id with a space",
            input(MERGE, &merge("a b", Some(structure(vec![])), None)),
            Outcome::Invalid,
        ),
        (
            "id of 257 bytes",
            input(MERGE, &merge(&"a".repeat(257), None, None)),
            Outcome::Invalid,
        ),
        (
            "user_id not UTF-8",
            vec![MERGE, 0x0a, 0x02, 0xc3, 0x28],
            Outcome::Undecodable,
        ),
        (
            "hand-encoded merge 32 levels deep",
            deep_request(MERGE, 32),
            Outcome::Applied,
        ),
        (
            "hand-encoded replace 33 levels deep",
            deep_request(REPLACE, 33),
            Outcome::Invalid,
        ),
        (
            "50,000 nested lists (prost's recursion limit, not a stack overflow)",
            deep_request(REPLACE, 50_000),
            Outcome::Undecodable,
        ),
        (
            "50,000 nested structs",
            deep_request(MERGE, 50_000),
            Outcome::Undecodable,
        ),
        (
            "nested lists read as a merge: an unknown field, skipped",
            {
                let mut data = deep_request(REPLACE, 50_000);
                data[0] = MERGE;
                data
            },
            Outcome::Applied,
        ),
    ]
}

/// A random protobuf Value: any kind, including unset, NaN, infinities,
/// U+0000 and keys that collide with the stored ones.
fn random_value(rng: &mut Rng, depth: usize) -> Value {
    let kinds = if depth == 0 { 5 } else { 8 };
    let kind = match rng.below(kinds) {
        0 => None,
        1 => Some(Kind::NullValue(0)),
        2 => Some(Kind::BoolValue(rng.chance(2))),
        3 => Some(Kind::NumberValue(random_number(rng))),
        4 => Some(Kind::StringValue(random_string(rng))),
        5 | 6 => Some(Kind::StructValue(random_struct(rng, depth - 1))),
        _ => Some(Kind::ListValue(ListValue {
            values: (0..rng.below(4))
                .map(|_| random_value(rng, depth - 1))
                .collect(),
        })),
    };
    Value { kind }
}

fn random_struct(rng: &mut Rng, depth: usize) -> Struct {
    Struct {
        fields: (0..rng.below(5))
            .map(|_| (random_key(rng), random_value(rng, depth)))
            .collect(),
    }
}

fn random_number(rng: &mut Rng) -> f64 {
    match rng.below(12) {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => -0.0,
        3 => 9_007_199_254_740_993.0,
        4 => f64::from_bits(rng.next()),
        _ => (rng.below(2001) as f64 - 1000.0) / [1.0, 4.0][rng.below(2)],
    }
}

fn random_key(rng: &mut Rng) -> String {
    const KEYS: [&str; 8] = ["a", "b", "c", "d", "e", "secret", "", "k\0"];
    match rng.below(4) {
        0 => random_string(rng),
        _ => KEYS[rng.below(KEYS.len())].to_owned(),
    }
}

fn random_string(rng: &mut Rng) -> String {
    (0..rng.below(6))
        .map(|_| match rng.below(10) {
            0 => '\0',
            1 => char::from_u32(rng.next() as u32 % 0x11_0000).unwrap_or('\u{FFFD}'),
            _ => (b'a' + rng.below(26) as u8) as char,
        })
        .collect()
}

fn random_id(rng: &mut Rng) -> String {
    match rng.below(20) {
        0 => String::new(),
        1 => "a b".to_owned(),
        _ => format!("user_{}", rng.below(1000)),
    }
}

/// A well-formed request with random contents, 1 to 6 levels deep.
fn random_request(rng: &mut Rng) -> Vec<u8> {
    let depth = 1 + rng.below(6);
    if rng.chance(2) {
        let mut field = || rng.chance(2).then(|| random_struct(rng, depth));
        let (public, private, unsafe_) = (field(), field(), field());
        let request = MergeUserMetadataRequest {
            user_id: random_id(rng),
            public_metadata: public,
            private_metadata: private,
            unsafe_metadata: unsafe_,
            expected_version: rng.chance(2).then(|| rng.next()),
        };
        input(MERGE, &request)
    } else {
        let mut field = || {
            rng.chance(2).then(|| match rng.below(3) {
                0 => random_value(rng, depth),
                _ => value(Kind::StructValue(random_struct(rng, depth))),
            })
        };
        let (public, private, unsafe_) = (field(), field(), field());
        let request = ReplaceUserMetadataRequest {
            user_id: random_id(rng),
            public_metadata: public,
            private_metadata: private,
            unsafe_metadata: unsafe_,
            expected_version: None,
        };
        input(REPLACE, &request)
    }
}

/// One to four random edits: bit flips, overwrites, insertions, deletions,
/// duplicated chunks, a flipped selector.
fn mutate(rng: &mut Rng, data: &[u8]) -> Vec<u8> {
    let mut data = data.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(6) {
            0 if at < data.len() => data[at] ^= 1 << rng.below(8),
            1 if at < data.len() => data[at] = rng.next() as u8,
            2 => data.insert(at, rng.next() as u8),
            3 if at < data.len() => {
                data.remove(at);
            }
            4 if at < data.len() => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                let chunk = data[at..end].to_vec();
                data.splice(end..end, chunk);
            }
            _ if !data.is_empty() => data[0] ^= 1,
            _ => data.push(rng.next() as u8),
        }
    }
    data
}

/// Up to ~300 prefix lengths: all of them for short inputs.
fn truncation_lengths(len: usize) -> Vec<usize> {
    if len <= 300 {
        (0..len).collect()
    } else {
        (0..300).map(|i| i * len / 300).collect()
    }
}

#[derive(Default)]
struct Tally(BTreeMap<Outcome, usize>);

impl Tally {
    fn run(&mut self, data: &[u8]) -> Outcome {
        let outcome = decode_validate_apply(data);
        *self.0.entry(outcome).or_default() += 1;
        outcome
    }
}

#[test]
fn seeds_have_their_expected_outcomes() {
    for (name, data, expected) in seeds() {
        assert_eq!(decode_validate_apply(&data), expected, "{name}");
    }
}

#[test]
fn truncated_seeds_never_panic() {
    let mut tally = Tally::default();
    for (_, data, _) in seeds() {
        for len in truncation_lengths(data.len()) {
            tally.run(&data[..len]);
        }
    }
    eprintln!("truncations: {:?}", tally.0);
    assert!(tally.0.contains_key(&Outcome::Undecodable));
}

#[test]
fn mutated_seeds_never_panic() {
    let mut rng = Rng(0x5EED_0001);
    let mut tally = Tally::default();
    for (_, data, _) in seeds() {
        if data.len() > 100_000 {
            continue; // the 50,000-level seeds: truncations cover them
        }
        for _ in 0..500 {
            tally.run(&mutate(&mut rng, &data));
        }
    }
    eprintln!("mutations: {:?}", tally.0);
    for outcome in [
        Outcome::Undecodable,
        Outcome::Unconvertible,
        Outcome::Invalid,
        Outcome::Refused,
        Outcome::Applied,
    ] {
        assert!(
            tally.0.contains_key(&outcome),
            "no mutation was {outcome:?}"
        );
    }
}

#[test]
fn random_requests_never_panic() {
    let mut rng = Rng(0x5EED_0002);
    let mut tally = Tally::default();
    for _ in 0..2_000 {
        let data = random_request(&mut rng);
        assert_ne!(tally.run(&data), Outcome::Undecodable, "{data:?}");
        tally.run(&mutate(&mut rng, &data));
    }
    eprintln!("random requests: {:?}", tally.0);
    for outcome in [Outcome::Unconvertible, Outcome::Invalid, Outcome::Applied] {
        assert!(
            tally.0.contains_key(&outcome),
            "no random request was {outcome:?}"
        );
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x5EED_0003);
    let mut tally = Tally::default();
    for _ in 0..2_000 {
        let len = rng.below(257);
        tally.run(&rng.bytes(len));
    }
    eprintln!("random bytes: {:?}", tally.0);
    assert!(tally.0.contains_key(&Outcome::Undecodable));
}
