//! decode -> convert -> validate -> apply on untrusted bytes. Shared by the
//! cargo-fuzz target (`fuzz/fuzz_targets/decode_validate_merge.rs`) and the
//! corpus replay test that CI runs (`tests/in_process/fuzz_corpus.rs`). It must never
//! panic: every assert here is an invariant of the service.

use metadata_service::api::{ApiKind, Users};
use metadata_service::json::{Limits, apply, measure, validate_command};
use metadata_service::model::{Field, Fields, Mode};
use metadata_service::proto::v1::{MergeUserMetadataRequest, ReplaceUserMetadataRequest};
use prost::Message;
use serde_json::json;

/// How far an input got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    Empty,
    Undecodable,
    Unconvertible,
    Invalid,
    Refused,
    Applied,
}

/// What the request is applied to: within the default limits, with a stored
/// null in one field.
fn stored() -> Fields {
    Fields {
        public: json!({"a":{"b":1,"c":[1,2,{"d":null}]},"e":"é\u{1F600}","f":1.5}),
        private: json!({"secret":"x","n":-9007199254740992i64}),
        unsafe_: json!(null),
    }
}

/// The first byte picks the message (even: Merge, odd: Replace); the rest is
/// its protobuf encoding.
pub fn decode_validate_apply(data: &[u8]) -> Outcome {
    let Some((&selector, body)) = data.split_first() else {
        return Outcome::Empty;
    };
    let converted = if selector % 2 == 0 {
        match MergeUserMetadataRequest::decode(body) {
            Ok(request) => Users::merge_command(request),
            Err(_) => return Outcome::Undecodable,
        }
    } else {
        match ReplaceUserMetadataRequest::decode(body) {
            Ok(request) => Users::replace_command(request),
            Err(_) => return Outcome::Undecodable,
        }
    };
    let command = match converted {
        Ok(command) => command,
        Err(err) => {
            assert_located_in_a_field(&err.path.to_string());
            return Outcome::Unconvertible;
        }
    };
    let limits = Limits::default();
    if let Err(err) = validate_command(&command, &limits) {
        let path = err.path.to_string();
        if path != "user_id" {
            assert_located_in_a_field(&path);
        }
        return Outcome::Invalid;
    }
    let current = stored();
    let next = match apply(command.mode, &command.values, &current, &limits) {
        Ok(next) => next,
        Err(err) => {
            let path = err.path.to_string();
            assert!(Field::ALL.iter().any(|f| path == f.name()), "{path}");
            return Outcome::Refused;
        }
    };
    for field in Field::ALL {
        let after = next.get(field);
        match command.values.iter().find(|(f, _)| *f == field) {
            None => assert_eq!(after, current.get(field), "{field:?} untouched"),
            Some((_, value)) if command.mode == Mode::Replace => assert_eq!(after, value),
            Some(_) => assert!(after.is_object(), "a merge result is an object"),
        }
        assert!(after.is_object() || after.is_null(), "{field:?}: {after}");
        let (bytes, depth) = measure(after);
        assert!(bytes <= limits.max_field_bytes && depth <= limits.max_depth);
    }
    Outcome::Applied
}

fn assert_located_in_a_field(path: &str) {
    assert!(
        Field::ALL.iter().any(|f| path.starts_with(f.name())),
        "error path {path:?} is not under a field"
    );
}
