//! Untrusted bytes as a MergeUserMetadataRequest (first byte even) or a
//! ReplaceUserMetadataRequest (odd): decode, convert, validate with the
//! default limits, apply to a fixed stored value. Must never panic.
//! The same harness runs on a fixed corpus in `tests/in_process/fuzz_corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzz_harness/mod.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::decode_validate_apply(data);
});
