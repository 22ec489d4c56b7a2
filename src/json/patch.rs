//! RFC 6902 JSON Patch on one metadata field, through the `json-patch`
//! crate: a field's patch is decoded operation by operation, so that an
//! error names the operation's index (`public_metadata[2]`), and applied to
//! the stored value. A `test` that fails is the caller's precondition, not
//! bad input: it becomes ABORTED (`PATCH_TEST_FAILED`), as a version
//! mismatch does, with the JSON Pointer it tested.

use json_patch::{PatchErrorKind, PatchOperation};
use serde_json::Value;

use crate::model::Field;
use crate::validation::{JsonPath, Problem, ValidationError};

/// The operations of `field`'s patch (a JSON array of RFC 6902 objects).
pub fn decode(field: Field, ops: &Value) -> Result<Vec<PatchOperation>, ValidationError> {
    let Value::Array(ops) = ops else {
        return Err(ValidationError::new(
            JsonPath::root(field.name()),
            Problem::InvalidPatch("must be a list of JSON Patch operations".into()),
        ));
    };
    ops.iter()
        .enumerate()
        .map(|(index, op)| {
            serde_json::from_value::<PatchOperation>(op.clone()).map_err(|err| {
                ValidationError::new(
                    JsonPath::root(field.name()).index(index),
                    Problem::InvalidPatch(format!(
                        "not a JSON Patch operation (RFC 6902: op add, remove, replace, move, \
                         copy or test, with path, and value or from as the op needs): {err}"
                    )),
                )
            })
        })
        .collect()
}

/// Applies `ops` to `value`, the field's stored value. On an error `value`
/// is left in an unspecified state: the caller works on a copy.
pub fn apply(
    field: Field,
    value: &mut Value,
    ops: &[PatchOperation],
) -> Result<(), ValidationError> {
    json_patch::patch_unsafe(value, ops).map_err(|err| {
        let at = JsonPath::root(field.name()).index(err.operation);
        let pointer = err.path.to_string();
        let problem = match err.kind {
            PatchErrorKind::TestFailed => Problem::PatchTestFailed {
                operation: err.operation,
                pointer,
            },
            PatchErrorKind::InvalidFromPointer => Problem::InvalidPatch(format!(
                "`from` names no value of the stored {} (path {pointer})",
                field.name()
            )),
            PatchErrorKind::CannotMoveInsideItself => {
                Problem::InvalidPatch(format!("cannot move a value inside itself ({pointer})"))
            }
            // InvalidPointer, and any kind a later version adds.
            _ => Problem::InvalidPatch(format!(
                "path {pointer} names no location in the stored {} (a missing parent, an \
                 array index out of range, or a key inside a value that is not an object \
                 or array)",
                field.name()
            )),
        };
        ValidationError::new(at, problem)
    })
}

#[cfg(test)]
mod tests {
    //! RFC 6902, appendix A: each example's document, patch and result (or
    //! error), as the RFC gives them.

    use super::*;
    use serde_json::json;

    fn run(doc: Value, patch: Value) -> Result<Value, ValidationError> {
        let ops = decode(Field::Public, &patch)?;
        let mut value = doc;
        apply(Field::Public, &mut value, &ops)?;
        Ok(value)
    }

    #[test]
    fn rfc6902_appendix_a() {
        let ok = [
            // A.1 Adding an Object Member
            (
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz", "value": "qux"}]),
                json!({"baz": "qux", "foo": "bar"}),
            ),
            // A.2 Adding an Array Element
            (
                json!({"foo": ["bar", "baz"]}),
                json!([{"op": "add", "path": "/foo/1", "value": "qux"}]),
                json!({"foo": ["bar", "qux", "baz"]}),
            ),
            // A.3 Removing an Object Member
            (
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "remove", "path": "/baz"}]),
                json!({"foo": "bar"}),
            ),
            // A.4 Removing an Array Element
            (
                json!({"foo": ["bar", "qux", "baz"]}),
                json!([{"op": "remove", "path": "/foo/1"}]),
                json!({"foo": ["bar", "baz"]}),
            ),
            // A.5 Replacing a Value
            (
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "replace", "path": "/baz", "value": "boo"}]),
                json!({"baz": "boo", "foo": "bar"}),
            ),
            // A.6 Moving a Value
            (
                json!({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}}),
                json!([{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}]),
                json!({"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}),
            ),
            // A.7 Moving an Array Element
            (
                json!({"foo": ["all", "grass", "cows", "eat"]}),
                json!([{"op": "move", "from": "/foo/1", "path": "/foo/3"}]),
                json!({"foo": ["all", "cows", "eat", "grass"]}),
            ),
            // A.8 Testing a Value: Success
            (
                json!({"baz": "qux", "foo": ["a", 2, "c"]}),
                json!([
                    {"op": "test", "path": "/baz", "value": "qux"},
                    {"op": "test", "path": "/foo/1", "value": 2}
                ]),
                json!({"baz": "qux", "foo": ["a", 2, "c"]}),
            ),
            // A.10 Adding a Nested Member Object
            (
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/child", "value": {"grandchild": {}}}]),
                json!({"foo": "bar", "child": {"grandchild": {}}}),
            ),
            // A.11 Ignoring Unrecognized Elements
            (
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}]),
                json!({"foo": "bar", "baz": "qux"}),
            ),
            // A.14 ~ Escape Ordering
            (
                json!({"/": 9, "~1": 10}),
                json!([{"op": "test", "path": "/~01", "value": 10}]),
                json!({"/": 9, "~1": 10}),
            ),
            // A.16 Adding an Array Value
            (
                json!({"foo": ["bar"]}),
                json!([{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}]),
                json!({"foo": ["bar", ["abc", "def"]]}),
            ),
        ];
        for (doc, patch, expected) in ok {
            assert_eq!(run(doc, patch.clone()).unwrap(), expected, "{patch}");
        }

        // A.9 Testing a Value: Error
        let err = run(
            json!({"baz": "qux"}),
            json!([{"op": "test", "path": "/baz", "value": "bar"}]),
        )
        .unwrap_err();
        assert_eq!(
            err.problem,
            Problem::PatchTestFailed {
                operation: 0,
                pointer: "/baz".into()
            }
        );
        assert_eq!(err.path.to_string(), "public_metadata[0]");
        // A.12 Adding to a Nonexistent Target
        let err = run(
            json!({"foo": "bar"}),
            json!([{"op": "add", "path": "/baz/bat", "value": "qux"}]),
        )
        .unwrap_err();
        assert!(matches!(err.problem, Problem::InvalidPatch(_)), "{err}");
        // A.13 Invalid JSON Patch Document: an op without its value.
        let err = run(
            json!({"foo": "bar"}),
            json!([{"op": "add", "path": "/baz"}]),
        )
        .unwrap_err();
        assert!(matches!(err.problem, Problem::InvalidPatch(_)), "{err}");
        // A.15 Comparing Strings and Numbers
        let err = run(
            json!({"/": 9, "~1": 10}),
            json!([{"op": "test", "path": "/~01", "value": "10"}]),
        )
        .unwrap_err();
        assert!(
            matches!(err.problem, Problem::PatchTestFailed { .. }),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_operation_and_its_pointer() {
        let err = run(
            json!({"a": 1}),
            json!([
                {"op": "test", "path": "/a", "value": 1},
                {"op": "frobnicate", "path": "/a"}
            ]),
        )
        .unwrap_err();
        assert_eq!(err.path.to_string(), "public_metadata[1]");
        assert!(
            err.to_string().contains("not a JSON Patch operation"),
            "{err}"
        );

        let err = run(
            json!({"a": 1}),
            json!([{"op": "add", "path": "/a/b", "value": 2}]),
        )
        .unwrap_err();
        assert_eq!(err.path.to_string(), "public_metadata[0]");
        assert!(
            err.to_string().contains("path /a/b names no location"),
            "{err}"
        );

        let err = decode(Field::Private, &json!({"op": "add"})).unwrap_err();
        assert_eq!(err.path.to_string(), "private_metadata");
    }
}
