//! A [`Filter`] as a SQL condition on the `metadata` table, for each
//! backend, with exactly the semantics of [`Filter::matches`] (the property
//! test in `tests/in_process/list.rs` holds the two against each other).
//!
//! - Postgres: `=` and `:` with a value are jsonb containment (`@>`), which
//!   the GIN `jsonb_path_ops` index on each column answers; a path is
//!   walked with `->` and text keys, which never index into an array, as
//!   the Rust lookup does not. Strings order `COLLATE "C"` (code points).
//! - SQLite: `json_type` and `json_extract` with a JSON path whose keys are
//!   quoted JSON strings (SQLite 3.45+ decodes their escapes); a scan.
//!
//! SQL's NULL would make `NOT` disagree with the Rust evaluator (NOT of
//! unknown is unknown), so every leaf that can be NULL is wrapped in
//! `COALESCE(.., FALSE)`: a missing key is false, and its negation true.
//! Containment is never NULL (the columns are NOT NULL) and stays bare so
//! that the planner sees it.

use sea_orm::{DatabaseBackend, Statement, Value as SqlValue};
use serde_json::{Number, Value};

use crate::query::filter::{Filter, Op, Path};

/// Builds SQL text and its bound values together, so that placeholders and
/// values stay in step (SQLite's `?` are positional).
pub struct Sql {
    backend: DatabaseBackend,
    pub text: String,
    pub values: Vec<SqlValue>,
}

impl Sql {
    pub fn new(backend: DatabaseBackend) -> Self {
        Sql {
            backend,
            text: String::new(),
            values: Vec::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder for `value`.
    pub fn bind(&mut self, value: impl Into<SqlValue>) -> &mut Self {
        self.values.push(value.into());
        match self.backend {
            DatabaseBackend::Postgres => {
                let n = self.values.len();
                self.text.push_str(&format!("${n}"));
            }
            _ => self.text.push('?'),
        }
        self
    }

    /// A subquery whose rows are the elements of a JSON array of strings,
    /// in a column `id`, bound as one value (one prepared statement
    /// whatever its length).
    pub fn json_array_elements(&mut self, array: Value) -> &mut Self {
        match self.backend {
            DatabaseBackend::Postgres => self.push("SELECT jsonb_array_elements_text("),
            _ => self.push("SELECT value AS id FROM json_each("),
        };
        self.bind(array).push(")");
        if self.backend == DatabaseBackend::Postgres {
            self.push(" AS id");
        }
        self
    }

    pub fn statement(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }

    /// Appends the condition of `filter`.
    pub fn filter(&mut self, filter: &Filter) -> &mut Self {
        match filter {
            Filter::And(all) => self.join(all, " AND "),
            Filter::Or(any) => self.join(any, " OR "),
            Filter::Not(inner) => {
                self.push("(NOT ");
                self.filter(inner);
                self.push(")")
            }
            Filter::Compare { path, op, value } => match (self.backend, op) {
                (DatabaseBackend::Postgres, Op::Eq) => self.contains(path, value.clone()),
                _ => self.leaf(|sql| sql.compare(path, *op, value)),
            },
            Filter::Has { path, value: None } => self.leaf(|sql| {
                sql.exists(path);
            }),
            Filter::Has {
                path,
                value: Some(value),
            } => self.has(path, value),
        }
    }

    fn join(&mut self, filters: &[Filter], joiner: &str) -> &mut Self {
        self.push("(");
        for (i, filter) in filters.iter().enumerate() {
            if i > 0 {
                self.push(joiner);
            }
            self.filter(filter);
        }
        self.push(")")
    }

    /// A condition that may be NULL, made false instead.
    fn leaf(&mut self, condition: impl FnOnce(&mut Self)) -> &mut Self {
        self.push("COALESCE((");
        condition(self);
        self.push("), FALSE)")
    }

    /// Postgres: the column contains `{k1: {k2: .. value}}`.
    fn contains(&mut self, path: &Path, value: Value) -> &mut Self {
        let nested = path.keys.iter().rev().fold(value, |inner, key| {
            Value::Object([(key.clone(), inner)].into_iter().collect())
        });
        self.push("(").push(path.field.name()).push(" @> ");
        self.bind(nested);
        self.push(")")
    }

    /// `path:value`: equal to it, an array holding it, or (for a string)
    /// an object with it as a key.
    fn has(&mut self, path: &Path, value: &Value) -> &mut Self {
        self.push("(");
        match self.backend {
            DatabaseBackend::Postgres => {
                self.contains(path, value.clone());
                self.push(" OR ");
                self.contains(path, Value::Array(vec![value.clone()]));
            }
            _ => {
                self.leaf(|sql| sql.compare(path, Op::Eq, value));
                self.push(" OR ");
                self.leaf(|sql| {
                    sql.json_type(path)
                        .push(" = 'array' AND EXISTS (SELECT 1 FROM json_each(");
                    sql.push(path.field.name()).push(", ");
                    sql.bind(sqlite_path(path, None));
                    sql.push(") WHERE ");
                    sql.sqlite_element(value);
                    sql.push(")");
                });
            }
        }
        if let Value::String(key) = value {
            self.push(" OR ");
            self.leaf(|sql| match sql.backend {
                DatabaseBackend::Postgres => {
                    sql.push("jsonb_typeof(");
                    sql.json(path).push(") = 'object' AND jsonb_exists(");
                    sql.json(path).push(", ");
                    sql.bind(key.clone()).push(")");
                }
                _ => {
                    sql.json_type(path).push(" = 'object' AND json_type(");
                    sql.push(path.field.name()).push(", ");
                    sql.bind(sqlite_path(path, Some(key))).push(") IS NOT NULL");
                }
            });
        }
        self.push(")")
    }

    fn exists(&mut self, path: &Path) -> &mut Self {
        match self.backend {
            DatabaseBackend::Postgres => self.json(path).push(" IS NOT NULL"),
            _ => self.json_type(path).push(" IS NOT NULL"),
        }
    }

    /// `path op value`, true only for a present value of the literal's
    /// type; booleans and null have equality only.
    fn compare(&mut self, path: &Path, op: Op, value: &Value) {
        let symbol = match op {
            Op::Eq => "=",
            Op::Ne => "<>",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        };
        let ordered = matches!(value, Value::Number(_) | Value::String(_));
        if !ordered && !matches!(op, Op::Eq | Op::Ne) {
            self.push("FALSE");
            return;
        }
        match self.backend {
            DatabaseBackend::Postgres => {
                self.push("jsonb_typeof(");
                self.json(path)
                    .push(") = '")
                    .push(postgres_type(value))
                    .push("' AND ");
                match value {
                    Value::String(text) => {
                        self.push("(");
                        self.json(path)
                            .push(" #>> '{}') COLLATE \"C\" ")
                            .push(symbol)
                            .push(" ");
                        self.bind(text.clone()).push(" COLLATE \"C\"");
                    }
                    // Numbers compare numerically as jsonb; booleans and
                    // null by equality.
                    _ => {
                        self.json(path).push(" ").push(symbol).push(" ");
                        self.bind(value.clone());
                    }
                }
            }
            _ => match value {
                Value::Number(number) => {
                    self.json_type(path).push(" IN ('integer', 'real') AND ");
                    self.json_extract(path).push(" ").push(symbol).push(" ");
                    self.bind_number(number);
                }
                Value::String(text) => {
                    self.json_type(path).push(" = 'text' AND ");
                    self.json_extract(path).push(" ").push(symbol).push(" ");
                    self.bind(text.clone());
                }
                Value::Bool(b) => {
                    // Of boolean type and (not) the literal.
                    let wanted = if (op == Op::Eq) == *b {
                        "true"
                    } else {
                        "false"
                    };
                    self.json_type(path).push(" = '").push(wanted).push("'");
                }
                _ if op == Op::Eq => {
                    self.json_type(path).push(" = 'null'");
                }
                // Null is never unequal to null.
                _ => {
                    self.push("FALSE");
                }
            },
        }
    }

    /// Postgres: the jsonb at `path`, NULL where it is missing.
    fn json(&mut self, path: &Path) -> &mut Self {
        self.push("(").push(path.field.name());
        for key in &path.keys {
            // A text key never indexes into an array.
            self.push(" -> ");
            self.bind(key.clone());
            self.push("::text");
        }
        self.push(")")
    }

    /// SQLite: the JSON type at `path`, NULL where it is missing.
    fn json_type(&mut self, path: &Path) -> &mut Self {
        self.push("json_type(").push(path.field.name()).push(", ");
        self.bind(sqlite_path(path, None));
        self.push(")")
    }

    /// SQLite: the SQL value at `path` (text, integer or real for scalars).
    fn json_extract(&mut self, path: &Path) -> &mut Self {
        self.push("json_extract(")
            .push(path.field.name())
            .push(", ");
        self.bind(sqlite_path(path, None));
        self.push(")")
    }

    /// SQLite: the condition on a `json_each` row that it equals `value`.
    fn sqlite_element(&mut self, value: &Value) {
        match value {
            Value::Number(number) => {
                self.push("type IN ('integer', 'real') AND atom = ");
                self.bind_number(number);
            }
            Value::String(text) => {
                self.push("type = 'text' AND atom = ");
                self.bind(text.clone());
            }
            Value::Bool(true) => {
                self.push("type = 'true'");
            }
            Value::Bool(false) => {
                self.push("type = 'false'");
            }
            _ => {
                self.push("type = 'null'");
            }
        }
    }

    /// SQLite compares integers and reals by value; a number beyond i64
    /// can only be a real there.
    fn bind_number(&mut self, number: &Number) {
        match number.as_i64() {
            Some(n) => self.bind(n),
            None => self.bind(number.as_f64().unwrap_or(f64::MAX)),
        };
    }
}

/// The JSON path of `path` (and `extra` below it) for SQLite, each key a
/// quoted JSON string: `$."a"."b.c"`.
fn sqlite_path(path: &Path, extra: Option<&str>) -> String {
    let mut text = String::from("$");
    for key in path.keys.iter().map(String::as_str).chain(extra) {
        text.push('.');
        text.push_str(&Value::String(key.to_owned()).to_string());
    }
    text
}

fn postgres_type(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        _ => "null",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Field;
    use crate::query::filter::parse;

    fn condition(backend: DatabaseBackend, text: &str) -> Sql {
        let filter = parse(text, &Field::ALL).unwrap().unwrap();
        let mut sql = Sql::new(backend);
        sql.filter(&filter);
        sql
    }

    #[test]
    fn equality_on_postgres_is_containment() {
        let sql = condition(DatabaseBackend::Postgres, r#"public_metadata.a.b = "gold""#);
        assert_eq!(sql.text, "(public_metadata @> $1)");
        assert_eq!(
            sql.values,
            vec![SqlValue::from(serde_json::json!({"a": {"b": "gold"}}))]
        );
    }

    #[test]
    fn placeholders_follow_their_values() {
        for backend in [DatabaseBackend::Postgres, DatabaseBackend::Sqlite] {
            let sql = condition(
                backend,
                r#"NOT public_metadata.a < 3 AND (private_metadata."x.y":"k" OR unsafe_metadata.z:*)"#,
            );
            let placeholders = match backend {
                DatabaseBackend::Postgres => sql.text.matches('$').count(),
                _ => sql.text.matches('?').count(),
            };
            assert_eq!(placeholders, sql.values.len(), "{}", sql.text);
        }
    }

    #[test]
    fn sqlite_paths_quote_every_key() {
        let path = Path {
            field: Field::Public,
            keys: vec!["a".into(), "b.\"c".into()],
        };
        assert_eq!(sqlite_path(&path, None), r#"$."a"."b.\"c""#);
        assert_eq!(sqlite_path(&path, Some("k")), r#"$."a"."b.\"c"."k""#);
    }
}
