use serde_json::Value;

use super::error::{JsonPath, Problem, Segment, TreeError, ValidationError, within};
use crate::model::{DeleteCommand, Kind, Mode, WriteCommand};

pub const MAX_ID_BYTES: usize = 256;

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
    let path = || JsonPath::root(kind.id_field());
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

/// Everything that can be checked on the request alone, before any I/O.
pub fn validate_command(command: &WriteCommand, limits: &Limits) -> Result<(), ValidationError> {
    validate_id(command.kind, &command.id)?;
    for (field, value) in &command.values {
        match (command.mode, value) {
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
    }
    Ok(())
}

pub fn validate_delete(command: &DeleteCommand) -> Result<(), ValidationError> {
    validate_id(command.kind, &command.id)
}

/// Compact JSON size in bytes and nesting depth of a value, without
/// allocating the serialized form.
pub fn measure(value: &Value) -> (usize, usize) {
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
    (counter.0, depth(value))
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
    use serde_json::json;

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
