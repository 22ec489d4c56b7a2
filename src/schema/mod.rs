//! JSON Schemas for metadata fields (issue 18): compiling a schema as an
//! operator gives it, and checking a field's value against it, with
//! messages that name the field, the instance location and the keyword.
//! Pure logic over the `jsonschema` crate; no storage and no network (the
//! crate is built without its HTTP and file retrievers, so a `$ref` that
//! leaves the document fails to compile instead of being fetched).

use std::sync::Arc;

use jsonschema::{Draft, Validator};
use serde_json::Value;

use crate::model::Field;

/// Largest schema accepted, as compact JSON.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// Most violations listed in one refusal.
pub const MAX_VIOLATIONS: usize = 5;

/// Why a schema cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

/// A compiled schema, shared by every write that checks against it.
#[derive(Clone)]
pub struct Schema {
    validator: Arc<Validator>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Schema")
    }
}

/// The drafts a `$schema` may name, by the URIs their meta-schemas have.
fn draft(schema: &Value) -> Result<Draft, SchemaError> {
    let Some(uri) = schema.get("$schema") else {
        return Ok(Draft::Draft202012);
    };
    let uri = uri
        .as_str()
        .ok_or_else(|| SchemaError("$schema must be a string".into()))?;
    let trimmed = uri.trim_end_matches('#');
    Ok(match trimmed {
        "http://json-schema.org/draft-04/schema" => Draft::Draft4,
        "http://json-schema.org/draft-06/schema" => Draft::Draft6,
        "http://json-schema.org/draft-07/schema" => Draft::Draft7,
        "https://json-schema.org/draft/2019-09/schema" => Draft::Draft201909,
        "https://json-schema.org/draft/2020-12/schema" => Draft::Draft202012,
        _ => {
            return Err(SchemaError(format!(
                "$schema {} is not a draft this service knows (draft-04, -06, -07, 2019-09, 2020-12)",
                Value::String(uri.to_owned())
            )));
        }
    })
}

impl Schema {
    /// Compiles `schema`: JSON Schema 2020-12 unless its `$schema` names
    /// another draft. The schema itself is checked against its draft's
    /// meta-schema.
    pub fn compile(schema: &Value) -> Result<Schema, SchemaError> {
        let (bytes, _) = crate::json::measure(schema);
        if bytes > MAX_SCHEMA_BYTES {
            return Err(SchemaError(format!(
                "is {bytes} bytes as compact JSON, the limit is {MAX_SCHEMA_BYTES}"
            )));
        }
        let draft = draft(schema)?;
        let validator = jsonschema::options()
            .with_draft(draft)
            .build(schema)
            .map_err(|err| SchemaError(format!("is not a valid schema: {err}")))?;
        Ok(Schema {
            validator: Arc::new(validator),
        })
    }

    pub fn is_valid(&self, value: &Value) -> bool {
        self.validator.is_valid(value)
    }

    /// The first [`MAX_VIOLATIONS`] ways `value`, stored as `field`, breaks
    /// the schema; empty when it conforms.
    pub fn violations(&self, field: Field, value: &Value) -> Vec<Violation> {
        self.validator
            .iter_errors(value)
            .take(MAX_VIOLATIONS)
            .map(|error| {
                let keyword = error.kind().keyword().to_owned();
                let mut message = error.to_string();
                if !message.contains(&keyword) {
                    message.push_str(&format!(" ({keyword})"));
                }
                Violation {
                    location: format!("{}{}", field.name(), error.instance_path()),
                    message,
                }
            })
            .collect()
    }
}

/// One way a value breaks its field's schema; shown as
/// `field/pointer: message (keyword)`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct Violation {
    /// The field and the JSON pointer in it: `unsafe_metadata/age`.
    pub location: String,
    /// What is wrong, naming the schema keyword.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profile() -> Schema {
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 0},
                "theme": {"enum": ["light", "dark"]},
                "prefs": {"type": "object", "additionalProperties": false,
                          "properties": {"lang": {"type": "string"}}}
            },
            "required": ["age"]
        }))
        .unwrap()
    }

    #[test]
    fn violations_name_the_field_the_pointer_and_the_keyword() {
        let schema = profile();
        assert!(
            schema
                .violations(Field::Unsafe, &json!({"age": 3}))
                .is_empty()
        );
        let found = schema.violations(Field::Unsafe, &json!({"age": -3}));
        assert_eq!(found[0].location, "unsafe_metadata/age");
        let found: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            found,
            ["unsafe_metadata/age: -3 is less than the minimum of 0"]
        );
        let text = |found: Vec<Violation>| -> Vec<String> {
            found.iter().map(ToString::to_string).collect()
        };
        let found = text(schema.violations(Field::Public, &json!({"age": 1, "theme": "pink"})));
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("public_metadata/theme: "), "{found:?}");
        assert!(found[0].ends_with("(enum)"), "{found:?}");
        let found = text(schema.violations(Field::Public, &json!({"age": 1, "prefs": {"x": 1}})));
        assert!(found[0].starts_with("public_metadata/prefs: "), "{found:?}");
        assert!(found[0].contains("additionalProperties"), "{found:?}");
        let found = text(schema.violations(Field::Public, &json!({})));
        assert!(found[0].starts_with("public_metadata: "), "{found:?}");
        assert!(found[0].contains("required"), "{found:?}");
        assert!(!schema.is_valid(&Value::Null));
    }

    #[test]
    fn at_most_five_violations() {
        let schema = Schema::compile(&json!({
            "additionalProperties": {"type": "string"}
        }))
        .unwrap();
        let many: serde_json::Map<String, Value> =
            (0..9).map(|i| (format!("k{i}"), json!(i))).collect();
        assert_eq!(
            schema
                .violations(Field::Private, &Value::Object(many))
                .len(),
            5
        );
    }

    #[test]
    fn drafts() {
        let old = json!({"$schema": "http://json-schema.org/draft-04/schema#",
                         "properties": {"n": {"minimum": 0, "exclusiveMinimum": true}}});
        let draft4 = Schema::compile(&old).unwrap();
        assert!(
            !draft4.is_valid(&json!({"n": 0})),
            "draft 4's boolean exclusiveMinimum"
        );
        for uri in [
            "http://json-schema.org/draft-06/schema#",
            "http://json-schema.org/draft-07/schema#",
            "https://json-schema.org/draft/2019-09/schema",
            "https://json-schema.org/draft/2020-12/schema",
        ] {
            Schema::compile(&json!({"$schema": uri})).unwrap();
        }
        let err = Schema::compile(&json!({"$schema": "https://example.com/mine"})).unwrap_err();
        assert!(err.0.contains("not a draft"), "{err}");
    }

    #[test]
    fn invalid_remote_and_large_schemas_are_refused() {
        let err = Schema::compile(&json!({"type": "nope"})).unwrap_err();
        assert!(err.0.starts_with("is not a valid schema"), "{err}");
        let err = Schema::compile(&json!({"$ref": "https://example.com/x.json"})).unwrap_err();
        assert!(err.0.starts_with("is not a valid schema"), "{err}");
        let err = Schema::compile(&json!({"$ref": "other.json#/a"})).unwrap_err();
        assert!(err.0.starts_with("is not a valid schema"), "{err}");
        // A reference inside the document is fine.
        let local = json!({"$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}});
        assert!(
            !Schema::compile(&local)
                .unwrap()
                .is_valid(&json!({"a": "x"}))
        );
        let big = json!({"description": "x".repeat(MAX_SCHEMA_BYTES)});
        assert!(Schema::compile(&big).unwrap_err().0.contains("limit"));
    }
}
