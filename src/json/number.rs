use serde_json::{Number, Value};

/// Largest magnitude below which every integer is exactly representable as a
/// double, so integral doubles in range become JSON integers.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_992.0;

/// A double as a JSON number: integral values within +/-2^53 become integers
/// (`1`, not `1.0`), so that stored JSON reads the way people wrote it.
pub fn json_number(number: f64) -> Option<Number> {
    if !number.is_finite() {
        return None;
    }
    if number.fract() == 0.0 && number.abs() <= MAX_SAFE_INTEGER {
        // `as` is exact here: the value is integral and within i64 range.
        return Some(Number::from(number as i64));
    }
    Number::from_f64(number)
}

/// Brings a number read back from storage to the canonical form produced by
/// [`json_number`] (Postgres jsonb may print `1e20` as `100000000000000000000`).
pub fn canonical_numbers(value: &mut Value) {
    match value {
        Value::Number(n) => {
            if let Some(canonical) = n.as_f64().and_then(json_number) {
                *n = canonical;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(canonical_numbers),
        Value::Object(map) => map.values_mut().for_each(canonical_numbers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_numbers_matches_input_form() {
        let mut read_back: Value =
            serde_json::from_str(r#"{"a":100000000000000000000,"b":1.0}"#).unwrap();
        canonical_numbers(&mut read_back);
        assert_eq!(read_back, json!({"a":1e20,"b":1}));
    }
}
