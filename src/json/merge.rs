use serde_json::{Map, Value};

/// RFC 7396 JSON Merge Patch: objects merge recursively, a null in the patch
/// removes the key, anything else (arrays, scalars) replaces the target.
/// A target that is not an object (e.g. a stored null) is treated as `{}`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        unreachable!("target was just made an object");
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.as_str()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn merged(target: Value, patch: Value) -> Value {
        let mut target = target;
        merge_patch(&mut target, &patch);
        target
    }

    /// RFC 7396 Appendix A, every vector (the service only sends object
    /// patches, but the function is the general algorithm).
    #[test]
    fn rfc7396_appendix_a() {
        let vectors = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, expected) in vectors {
            assert_eq!(
                merged(target.clone(), patch.clone()),
                expected,
                "{target} + {patch}"
            );
        }
    }

    #[test]
    fn issue_example() {
        assert_eq!(
            merged(
                json!({"a":{"b":1,"c":2},"d":[1,2]}),
                json!({"a":{"c":null,"e":3},"d":[3]})
            ),
            json!({"a":{"b":1,"e":3},"d":[3]})
        );
    }

    #[test]
    fn null_removes_at_any_depth() {
        assert_eq!(
            merged(
                json!({"a":{"b":{"c":{"d":1,"e":2}}}}),
                json!({"a":{"b":{"c":{"d":null}}}})
            ),
            json!({"a":{"b":{"c":{"e":2}}}})
        );
    }

    #[test]
    fn stored_null_is_treated_as_empty_object() {
        assert_eq!(merged(json!(null), json!({"a":1})), json!({"a":1}));
    }

    #[test]
    fn scalar_replaced_by_object_merges_into_empty() {
        assert_eq!(
            merged(json!({"a":5}), json!({"a":{"b":null,"c":1}})),
            json!({"a":{"c":1}})
        );
    }

    #[test]
    fn removing_missing_key_is_a_no_op() {
        assert_eq!(merged(json!({"a":1}), json!({"zzz":null})), json!({"a":1}));
    }
}
