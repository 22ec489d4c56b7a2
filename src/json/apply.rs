use serde_json::Value;

use super::merge::merge_patch;
use super::validate::{Limits, measure};
use crate::model::{Field, Fields, Mode};
use crate::validation::{JsonPath, Problem, ValidationError};

/// Computes the fields that result from a write, and checks the limits that
/// depend on the stored value (a merge can grow a field past the limit even
/// when its request is small).
pub fn apply(
    mode: Mode,
    values: &[(Field, Value)],
    current: &Fields,
    limits: &Limits,
) -> Result<Fields, ValidationError> {
    let mut next = current.clone();
    for (field, value) in values {
        let slot = next.get_mut(*field);
        match mode {
            Mode::Merge => merge_patch(slot, value),
            Mode::Replace => *slot = value.clone(),
            Mode::Patch => {
                super::patch::apply(*field, slot, &super::patch::decode(*field, value)?)?
            }
        }
        let (bytes, depth) = measure(slot);
        let path = || JsonPath::root(field.name());
        if bytes > limits.max_field_bytes {
            let limit = limits.max_field_bytes;
            return Err(ValidationError::new(
                path(),
                Problem::TooLarge { bytes, limit },
            ));
        }
        if depth > limits.max_depth {
            let limit = limits.max_depth;
            return Err(ValidationError::new(
                path(),
                Problem::TooDeep { depth, limit },
            ));
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored() -> Fields {
        Fields {
            public: json!({"a":{"b":1,"c":2},"d":[1,2]}),
            private: json!({"secret":"x"}),
            unsafe_: json!({}),
        }
    }

    #[test]
    fn merge_touches_only_provided_fields() {
        let next = apply(
            Mode::Merge,
            &[(Field::Public, json!({"a":{"c":null,"e":3},"d":[3]}))],
            &stored(),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(next.public, json!({"a":{"b":1,"e":3},"d":[3]}));
        assert_eq!(next.private, stored().private);
        assert_eq!(next.unsafe_, stored().unsafe_);
    }

    #[test]
    fn replace_overwrites_without_merging() {
        let limits = Limits::default();
        let next = apply(
            Mode::Replace,
            &[(Field::Public, json!({"a":{"z":1}}))],
            &stored(),
            &limits,
        )
        .unwrap();
        assert_eq!(next.public, json!({"a":{"z":1}}));
        assert_eq!(next.private, stored().private);

        let cleared = apply(
            Mode::Replace,
            &[(Field::Private, json!({}))],
            &stored(),
            &limits,
        )
        .unwrap();
        assert_eq!(cleared.private, json!({}));

        let nulled = apply(
            Mode::Replace,
            &[(Field::Public, json!(null))],
            &stored(),
            &limits,
        )
        .unwrap();
        assert_eq!(nulled.public, Value::Null);

        // Merging into a stored null starts from {}.
        let merged = apply(
            Mode::Merge,
            &[(Field::Public, json!({"k":1}))],
            &nulled,
            &limits,
        )
        .unwrap();
        assert_eq!(merged.public, json!({"k":1}));
    }

    #[test]
    fn merge_result_over_the_limit_is_refused() {
        let limits = Limits {
            max_field_bytes: 20,
            ..Limits::default()
        };
        let current = Fields {
            public: json!({"aaaa":"bbbbbbbb"}),
            ..Fields::default()
        };
        // The patch alone is small; the result is 34 bytes.
        let err = apply(
            Mode::Merge,
            &[(Field::Public, json!({"c":"dddddddd"}))],
            &current,
            &limits,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "public_metadata: is 34 bytes as compact JSON, the limit is 20"
        );
        // Exactly at the limit is allowed.
        let exact = json!({"aaaa":"bbbbbbbbb"});
        assert_eq!(measure(&exact).0, 20);
        assert!(apply(Mode::Replace, &[(Field::Public, exact)], &current, &limits).is_ok());
    }

    #[test]
    fn identical_result_is_detectable_as_no_op() {
        let next = apply(
            Mode::Merge,
            &[(Field::Public, json!({"a":{"b":1}}))],
            &stored(),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(next, stored());
    }
}
