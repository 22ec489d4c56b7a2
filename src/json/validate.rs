use serde_json::Value;

use crate::model::{DeleteCommand, Kind, Mode, WriteCommand};
use crate::validation::{JsonPath, Problem, Segment, TreeError, ValidationError, within};

pub const MAX_ID_BYTES: usize = 256;

/// Most distinct ids one Watch may filter on: a stream holds its filter for
/// as long as it is open, and every event is checked against it.
pub const MAX_WATCH_IDS: usize = 1000;

/// Limits applied to every write, from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Each metadata field of the result, as compact UTF-8 JSON.
    pub max_field_bytes: usize,
    /// Containers nested inside each other, the field itself counting as 1.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_field_bytes: 8192,
            max_depth: 32,
        }
    }
}

/// Ids are 1 to 256 bytes of printable ASCII without spaces, so that they are
/// safe in logs, URLs and shell commands.
pub fn validate_id(kind: Kind, id: &str) -> Result<(), ValidationError> {
    validate_id_at(|| JsonPath::root(kind.id_field()), id)
}

/// Most distinct ids in one BatchGet.
pub const MAX_BATCH_IDS: usize = 1000;

/// Most ids in one BatchGet, duplicates included.
pub const MAX_BATCH_REQUESTED: usize = 10 * MAX_BATCH_IDS;

/// The ids of a BatchGet: 1 to [`MAX_BATCH_IDS`] distinct ones, each valid
/// as in Get; an error names the index, e.g. `user_ids[3]`.
pub fn validate_batch_ids(kind: Kind, ids: &[String]) -> Result<(), ValidationError> {
    let path = || JsonPath::root(kind.ids_field());
    if ids.is_empty() {
        return Err(ValidationError::new(path(), Problem::NoIds));
    }
    for (index, id) in ids.iter().enumerate() {
        validate_id_at(|| path().index(index), id)?;
    }
    if ids.len() > MAX_BATCH_REQUESTED {
        return Err(ValidationError::new(
            path(),
            Problem::TooManyIds {
                count: ids.len(),
                limit: MAX_BATCH_REQUESTED,
            },
        ));
    }
    let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
    if distinct > MAX_BATCH_IDS {
        return Err(ValidationError::new(
            path(),
            Problem::TooManyDistinctIds {
                count: distinct,
                limit: MAX_BATCH_IDS,
            },
        ));
    }
    Ok(())
}

fn validate_id_at(path: impl Fn() -> JsonPath, id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::new(path(), Problem::EmptyId));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(ValidationError::new(
            path(),
            Problem::IdTooLong {
                len: id.len(),
                limit: MAX_ID_BYTES,
            },
        ));
    }
    if let Some(position) = id.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(ValidationError::new(
            path(),
            Problem::IdCharacter { position },
        ));
    }
    Ok(())
}

/// The id filter of a Watch: at most [`MAX_WATCH_IDS`], each a valid id.
pub fn validate_watch_ids<'a, I>(kind: Kind, ids: I) -> Result<(), ValidationError>
where
    I: IntoIterator<Item = &'a String>,
    I::IntoIter: ExactSizeIterator,
{
    let ids = ids.into_iter();
    if ids.len() > MAX_WATCH_IDS {
        return Err(ValidationError::new(
            JsonPath::root(kind.ids_field()),
            Problem::TooManyIds {
                count: ids.len(),
                limit: MAX_WATCH_IDS,
            },
        ));
    }
    ids.into_iter().try_for_each(|id| validate_id(kind, id))
}

/// Everything that can be checked on the request alone, before any I/O.
pub fn validate_command(command: &WriteCommand, limits: &Limits) -> Result<(), ValidationError> {
    validate_id(command.kind, &command.id)?;
    for (field, value) in &command.values {
        match (command.mode, value) {
            (Mode::Patch, _) => {
                super::patch::decode(*field, value)?;
            }
            (_, Value::Object(_)) | (Mode::Replace, Value::Null) => {}
            (_, other) => {
                return Err(ValidationError::new(
                    JsonPath::root(field.name()),
                    Problem::NotAnObject {
                        found: type_name(other),
                    },
                ));
            }
        }
        check_tree(value, limits).map_err(|(problem, segments)| {
            ValidationError::new(JsonPath::from_reversed(field.name(), &segments), problem)
        })?;
        // Refused here, before the write queues for the database, rather
        // than inside its transaction: a write that cannot fit must not hold
        // up the writes behind it. `apply` still checks the actual result.
        let limit = limits.max_field_bytes;
        let problem = match command.mode {
            // A patch's values are at most what it stores.
            Mode::Replace | Mode::Patch => {
                let bytes = compact_size(value);
                (bytes > limit).then_some(Problem::TooLarge { bytes, limit })
            }
            Mode::Merge => {
                let bytes = size_without_nulls(value);
                (bytes > limit).then_some(Problem::MergeTooLarge { bytes, limit })
            }
        };
        if let Some(problem) = problem {
            return Err(ValidationError::new(JsonPath::root(field.name()), problem));
        }
    }
    Ok(())
}

pub fn validate_delete(command: &DeleteCommand) -> Result<(), ValidationError> {
    validate_id(command.kind, &command.id)
}

/// Compact JSON size in bytes and nesting depth of a value, without
/// allocating the serialized form.
pub fn measure(value: &Value) -> (usize, usize) {
    (compact_size(value), depth(value))
}

fn compact_size<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value).expect("writing to a counter cannot fail");
    counter.0
}

/// The compact JSON size of a merge patch with its null members left out: a
/// lower bound of the merged field's size, whatever is stored. A null member
/// deletes a key, so it may shrink the result; every other member ends up in
/// it as sent (a scalar or list replaces the stored value, with any nulls
/// inside a list kept as values), or, for an object, merges into an object
/// that then holds at least the object's own non-null members, at every
/// level. Adding members to an object only lengthens its JSON.
fn size_without_nulls(patch: &Value) -> usize {
    let Value::Object(map) = patch else {
        return compact_size(patch);
    };
    let members = map.iter().filter(|(_, value)| !value.is_null());
    let (count, bytes) = members.fold((0usize, 0), |(count, bytes), (key, value)| {
        // `"key":value`
        (
            count + 1,
            bytes + compact_size(key) + 1 + size_without_nulls(value),
        )
    });
    // Braces, and a comma between members.
    2 + bytes + count.saturating_sub(1)
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a struct",
    }
}

/// Depth and U+0000 checks. The path is collected only on failure, in
/// reverse while unwinding, so valid input costs no allocation.
fn check_tree(value: &Value, limits: &Limits) -> Result<(), TreeError> {
    fn walk(value: &Value, level: usize, limits: &Limits) -> Result<(), TreeError> {
        let too_deep = || {
            Err((
                Problem::TooDeep {
                    depth: level,
                    limit: limits.max_depth,
                },
                Vec::new(),
            ))
        };
        match value {
            Value::String(s) if s.contains('\0') => Err((Problem::NulInString, Vec::new())),
            Value::Object(map) => {
                if level > limits.max_depth {
                    return too_deep();
                }
                for (key, child) in map {
                    if key.contains('\0') {
                        return Err((Problem::NulInKey, vec![Segment::Key(key.clone())]));
                    }
                    walk(child, level + 1, limits).map_err(within(|| Segment::Key(key.clone())))?;
                }
                Ok(())
            }
            Value::Array(items) => {
                if level > limits.max_depth {
                    return too_deep();
                }
                for (index, child) in items.iter().enumerate() {
                    walk(child, level + 1, limits).map_err(within(|| Segment::Index(index)))?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    walk(value, 1, limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Field;
    use serde_json::{Map, json};

    fn command(mode: Mode, value: Value) -> WriteCommand {
        WriteCommand {
            kind: Kind::User,
            id: "user_1".into(),
            mode,
            values: vec![(Field::Public, value)],
            expected_version: None,
        }
    }

    fn nested(levels: usize) -> Value {
        (1..levels).fold(json!({}), |inner, _| json!({ "k": inner }))
    }

    #[test]
    fn ids() {
        assert!(validate_id(Kind::User, "user_2abc-XYZ.~!").is_ok());
        assert!(validate_id(Kind::User, &"a".repeat(256)).is_ok());
        let err = validate_id(Kind::User, "").unwrap_err();
        assert_eq!(err.to_string(), "user_id: must not be empty");
        let err = validate_id(Kind::Organization, &"a".repeat(257)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "organization_id: is 257 bytes long, the limit is 256"
        );
        for bad in ["a b", "a\tb", "a\nb", "é", "a\u{7f}", "a\0"] {
            let err = validate_id(Kind::User, bad).unwrap_err();
            assert!(
                matches!(err.problem, Problem::IdCharacter { .. }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn watch_filters_have_at_most_1000_ids() {
        let ids = |n: usize| (0..n).map(|i| format!("id_{i}")).collect::<Vec<_>>();
        assert!(validate_watch_ids(Kind::User, &ids(1000)).is_ok());
        let err = validate_watch_ids(Kind::User, &ids(1001)).unwrap_err();
        assert_eq!(err.to_string(), "user_ids: has 1001 ids, the limit is 1000");
        let err = validate_watch_ids(Kind::Organization, &ids(1001)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "organization_ids: has 1001 ids, the limit is 1000"
        );
        let err = validate_watch_ids(Kind::User, &["ok".into(), "not ok".into()]).unwrap_err();
        assert_eq!(err.path.to_string(), "user_id");
    }

    #[test]
    fn depth_limit_is_inclusive() {
        let limits = Limits::default();
        assert!(validate_command(&command(Mode::Merge, nested(32)), &limits).is_ok());
        let err = validate_command(&command(Mode::Merge, nested(33)), &limits).unwrap_err();
        assert_eq!(
            err.problem,
            Problem::TooDeep {
                depth: 33,
                limit: 32
            }
        );
        assert!(err.path.to_string().starts_with("public_metadata.k.k."));
    }

    #[test]
    fn arrays_count_as_nesting() {
        let limits = Limits {
            max_depth: 3,
            ..Limits::default()
        };
        assert!(validate_command(&command(Mode::Merge, json!({"a":[[1]]})), &limits).is_ok());
        let err =
            validate_command(&command(Mode::Merge, json!({"a":[[[1]]]})), &limits).unwrap_err();
        assert_eq!(err.path.to_string(), "public_metadata.a[0][0]");
    }

    #[test]
    fn nul_in_keys_and_strings() {
        let limits = Limits::default();
        let err = validate_command(&command(Mode::Merge, json!({"a":{"b\u{0}":1}})), &limits)
            .unwrap_err();
        assert_eq!(err.problem, Problem::NulInKey);
        assert_eq!(err.path.to_string(), r#"public_metadata.a["b\u0000"]"#);
        let err = validate_command(
            &command(Mode::Replace, json!({"a":["x","y\u{0}"]})),
            &limits,
        )
        .unwrap_err();
        assert_eq!(err.problem, Problem::NulInString);
        assert_eq!(err.path.to_string(), "public_metadata.a[1]");
    }

    #[test]
    fn replace_accepts_only_struct_or_null() {
        let limits = Limits::default();
        assert!(validate_command(&command(Mode::Replace, json!(null)), &limits).is_ok());
        assert!(validate_command(&command(Mode::Replace, json!({})), &limits).is_ok());
        for bad in [json!(1), json!("s"), json!(true), json!([1])] {
            let err = validate_command(&command(Mode::Replace, bad.clone()), &limits).unwrap_err();
            assert!(matches!(err.problem, Problem::NotAnObject { .. }), "{bad}");
            assert_eq!(err.path.to_string(), "public_metadata");
        }
        let err = validate_command(&command(Mode::Merge, json!(null)), &limits).unwrap_err();
        assert_eq!(err.problem, Problem::NotAnObject { found: "null" });
    }

    /// 9 KiB of JSON: `{"k0":"xx...","k1":...}`, each member `null` when
    /// `nulls` is set.
    fn nine_kib(nulls: bool) -> Value {
        let members = (0..100).map(|i| {
            let value = if nulls {
                json!(null)
            } else {
                json!("x".repeat(85))
            };
            (format!("k{i}"), value)
        });
        Value::Object(members.collect())
    }

    #[test]
    fn oversized_replace_is_refused_before_any_io() {
        let limits = Limits::default();
        let value = nine_kib(false);
        let bytes = measure(&value).0;
        assert!(bytes > 9 * 1024, "{bytes}");
        let err = validate_command(&command(Mode::Replace, value), &limits).unwrap_err();
        assert_eq!(err.problem, Problem::TooLarge { bytes, limit: 8192 });
        assert_eq!(
            err.to_string(),
            format!("public_metadata: is {bytes} bytes as compact JSON, the limit is 8192")
        );
    }

    #[test]
    fn merge_patch_larger_than_the_limit_without_its_nulls_is_refused() {
        let limits = Limits::default();
        let patch = nine_kib(false);
        let bytes = measure(&patch).0;
        let err = validate_command(&command(Mode::Merge, patch), &limits).unwrap_err();
        assert_eq!(err.problem, Problem::MergeTooLarge { bytes, limit: 8192 });
        assert_eq!(err.path.to_string(), "public_metadata");
        assert!(err.to_string().contains("the limit is 8192"), "{err}");
        // Nested: the inner object merges into whatever is stored there, and
        // keeps its own non-null members.
        let nested = json!({"outer": {"inner": nine_kib(false), "gone": null}});
        let err = validate_command(&command(Mode::Merge, nested), &limits).unwrap_err();
        assert!(matches!(err.problem, Problem::MergeTooLarge { .. }));
    }

    #[test]
    fn merge_patch_of_mostly_nulls_is_left_to_the_result_check() {
        let limits = Limits::default();
        // Deleting many long keys takes a long patch, yet its result may be
        // small: only the stored value can tell.
        let mut members: Map<String, Value> = (0..400)
            .map(|i| (format!("key_to_delete_{i:0>6}"), json!(null)))
            .collect();
        members.insert("kept".into(), json!({"a": 1, "b": null}));
        let patch = Value::Object(members);
        assert!(measure(&patch).0 > 9 * 1024, "{}", measure(&patch).0);
        assert!(validate_command(&command(Mode::Merge, patch.clone()), &limits).is_ok());
        // Replace stores nulls as values, so the same value is too large there.
        let err = validate_command(&command(Mode::Replace, patch), &limits).unwrap_err();
        assert!(matches!(err.problem, Problem::TooLarge { .. }), "{err}");
    }

    #[test]
    fn size_without_nulls_is_the_compact_size_of_the_patch_without_null_members() {
        for (patch, without) in [
            (json!({}), json!({})),
            (json!({"a": null}), json!({})),
            (json!({"a": null, "b": 1}), json!({"b": 1})),
            (
                json!({"a": {"b": null, "c": "é"}}),
                json!({"a": {"c": "é"}}),
            ),
            (json!({"a": {"b": null}}), json!({"a": {}})),
            // Nulls in a list are values: the list replaces the stored one.
            (
                json!({"l": [null, {"x": null}]}),
                json!({"l": [null, {"x": null}]}),
            ),
            (json!({"q\"\n": "\u{1}"}), json!({"q\"\n": "\u{1}"})),
        ] {
            assert_eq!(size_without_nulls(&patch), measure(&without).0, "{patch}");
            let mut merged = json!({"a": {"b": [1, 2, 3]}, "z": true});
            crate::json::merge_patch(&mut merged, &patch);
            assert!(size_without_nulls(&patch) <= measure(&merged).0, "{patch}");
        }
    }

    #[test]
    fn measure_counts_compact_bytes_and_depth() {
        assert_eq!(measure(&json!({})), (2, 1));
        assert_eq!(
            measure(&json!({"a":[1,{"b":"é"}]})),
            (r#"{"a":[1,{"b":"é"}]}"#.len(), 3)
        );
        assert_eq!(measure(&json!(null)), (4, 0));
    }
}
