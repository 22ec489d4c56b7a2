//! The filter language of List and Watch (issue 17): a subset of AIP-160,
//! parsed once into a [`Filter`] and evaluated here in plain Rust (Watch,
//! and the reference the SQL translations are tested against).
//!
//! ```text
//! filter      := [ and ]
//! and         := or { "AND" or }        // OR binds tighter than AND (AIP-160)
//! or          := unary { "OR" unary }
//! unary       := "NOT" unary | "(" and ")" | restriction
//! restriction := path ( ("=" | "!=" | "<" | "<=" | ">" | ">=") literal
//!                     | ":" ( literal | "*" ) )
//! path        := field { "." ( name | "\"quoted\"" ) }
//! literal     := JSON string | JSON number | true | false | null
//! ```
//!
//! Semantics: a comparison on a missing key is false (`!=` included), and so
//! is one across JSON types; `NOT` negates whatever its operand gave, so
//! `NOT a = 1` holds where `a` is missing. Numbers compare as numbers (a
//! literal is read as the f64 nearest it, the form every stored number has
//! after protobuf's Value), strings by Unicode code point. A path segment
//! after `.` is a key even when it looks like a number (`a.0.b`). `:` is "has": an array containing the
//! literal, an object with the literal as a key, or a value equal to it;
//! `:*` is "exists".

use std::cmp::Ordering;
use std::iter::Peekable;
use std::str::CharIndices;

use serde_json::Value;

use crate::json::json_number;
use crate::model::{Field, Fields, Record};
pub use crate::validation::FilterError;

/// Longest filter accepted, in bytes.
pub const MAX_FILTER_BYTES: usize = 2048;

/// Deepest nesting of `NOT` and parentheses accepted: the translation to
/// SQL nests as deep, and SQLite refuses expressions deeper than 1,000.
pub const MAX_NESTING: usize = 64;

/// A parsed filter.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Compare {
        path: Path,
        op: Op,
        value: Value,
    },
    /// `path:value`, or `path:*` (value None).
    Has {
        path: Path,
        value: Option<Value>,
    },
}

/// A field and the keys below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Path {
    pub field: Field,
    pub keys: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Parses `text`; `fields` are the top-level fields of the kind (an
/// organization has no `unsafe_metadata`). None for an empty filter.
pub fn parse(text: &str, fields: &[Field]) -> Result<Option<Filter>, FilterError> {
    if text.len() > MAX_FILTER_BYTES {
        return Err(FilterError {
            column: 1,
            message: format!("a filter is at most {MAX_FILTER_BYTES} bytes"),
        });
    }
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        next: 0,
        fields,
        end: text.chars().count() + 1,
        depth: 0,
    };
    if parser.peek().is_none() {
        return Ok(None);
    }
    let filter = parser.and()?;
    match parser.peek() {
        None => Ok(Some(filter)),
        Some(token) => Err(token.error(format!("unexpected {}", token.kind.describe()))),
    }
}

impl Filter {
    /// Every field the filter reads, each once, in the order first met: a
    /// caller may filter only on what it may see.
    pub fn fields(&self) -> Vec<Field> {
        let mut found = Vec::new();
        self.collect_fields(&mut found);
        found
    }

    fn collect_fields(&self, found: &mut Vec<Field>) {
        match self {
            Filter::And(all) | Filter::Or(all) => {
                all.iter().for_each(|f| f.collect_fields(found));
            }
            Filter::Not(inner) => inner.collect_fields(found),
            Filter::Compare { path, .. } | Filter::Has { path, .. } => {
                if !found.contains(&path.field) {
                    found.push(path.field);
                }
            }
        }
    }

    /// Whether a change matches, as Watch and webhooks read a filter: its
    /// before or its after matches. The empty side of a first write or a
    /// delete is no record: it matches no filter, not even a negated one.
    pub fn matches_change(&self, before: &Record, after: &Record) -> bool {
        [before, after]
            .into_iter()
            .any(|side| side.version > 0 && self.matches(&side.fields))
    }

    /// Whether the record with these fields matches.
    pub fn matches(&self, fields: &Fields) -> bool {
        match self {
            Filter::And(all) => all.iter().all(|f| f.matches(fields)),
            Filter::Or(any) => any.iter().any(|f| f.matches(fields)),
            Filter::Not(inner) => !inner.matches(fields),
            Filter::Compare { path, op, value } => {
                lookup(fields, path).is_some_and(|found| compare(found, *op, value))
            }
            Filter::Has { path, value } => match (lookup(fields, path), value) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(Value::Array(items)), Some(wanted)) => {
                    items.iter().any(|item| same(item, wanted))
                }
                (Some(Value::Object(map)), Some(Value::String(key))) => map.contains_key(key),
                (Some(found), Some(wanted)) => same(found, wanted),
            },
        }
    }
}

fn lookup<'a>(fields: &'a Fields, path: &Path) -> Option<&'a Value> {
    path.keys
        .iter()
        .try_fold(fields.get(path.field), |value, key| {
            value.as_object()?.get(key)
        })
}

/// Equal and of the same JSON type (numbers as numbers).
fn same(a: &Value, b: &Value) -> bool {
    order(a, b) == Some(Ordering::Equal)
}

/// The order of two values of the same comparable type; None across types.
fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => Some(x.cmp(&y)),
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(x), Some(y)) => Some(x.cmp(&y)),
                _ => x.as_f64()?.partial_cmp(&y.as_f64()?),
            },
        },
        // UTF-8 byte order is code point order.
        (Value::String(x), Value::String(y)) => Some(x.as_str().cmp(y.as_str())),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        _ => None,
    }
}

fn compare(found: &Value, op: Op, literal: &Value) -> bool {
    let ordered = matches!(
        (found, literal),
        (Value::Number(_), Value::Number(_)) | (Value::String(_), Value::String(_))
    );
    let Some(ordering) = order(found, literal) else {
        return false;
    };
    match op {
        Op::Eq => ordering == Ordering::Equal,
        Op::Ne => ordering != Ordering::Equal,
        // Booleans and null have equality only.
        Op::Lt => ordered && ordering == Ordering::Less,
        Op::Le => ordered && ordering != Ordering::Greater,
        Op::Gt => ordered && ordering == Ordering::Greater,
        Op::Ge => ordered && ordering != Ordering::Less,
    }
}

#[derive(Clone, Debug, PartialEq)]
enum TokenKind {
    Name(String),
    /// A JSON string literal, decoded.
    Text(String),
    Number(serde_json::Number),
    Op(Op),
    Colon,
    Star,
    Dot,
    Open,
    Close,
    And,
    Or,
    Not,
}

impl TokenKind {
    fn describe(&self) -> String {
        match self {
            TokenKind::Name(name) => format!("`{name}`"),
            TokenKind::Text(_) => "a string".into(),
            TokenKind::Number(_) => "a number".into(),
            TokenKind::Op(_) => "a comparison".into(),
            TokenKind::Colon => "`:`".into(),
            TokenKind::Star => "`*`".into(),
            TokenKind::Dot => "`.`".into(),
            TokenKind::Open => "`(`".into(),
            TokenKind::Close => "`)`".into(),
            TokenKind::And => "AND".into(),
            TokenKind::Or => "OR".into(),
            TokenKind::Not => "NOT".into(),
        }
    }
}

#[derive(Clone, Debug)]
struct Token {
    kind: TokenKind,
    column: usize,
}

impl Token {
    fn error(&self, message: String) -> FilterError {
        FilterError {
            column: self.column,
            message,
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, FilterError> {
    let mut tokens = Vec::new();
    let mut chars: Peekable<CharIndices> = text.char_indices().peekable();
    // Column of a byte offset: characters before it, plus one.
    let column = |at: usize| text[..at].chars().count() + 1;
    while let Some(&(at, c)) = chars.peek() {
        let start = column(at);
        let error = |message: String| FilterError {
            column: start,
            message,
        };
        let kind = match c {
            c if c.is_whitespace() => {
                chars.next();
                continue;
            }
            '(' | ')' | ':' | '*' | '.' | '=' => {
                chars.next();
                match c {
                    '(' => TokenKind::Open,
                    ')' => TokenKind::Close,
                    ':' => TokenKind::Colon,
                    '*' => TokenKind::Star,
                    '.' => TokenKind::Dot,
                    _ => TokenKind::Op(Op::Eq),
                }
            }
            '!' | '<' | '>' => {
                chars.next();
                let equals = chars.next_if(|&(_, c)| c == '=').is_some();
                TokenKind::Op(match (c, equals) {
                    ('!', true) => Op::Ne,
                    ('<', false) => Op::Lt,
                    ('<', true) => Op::Le,
                    ('>', false) => Op::Gt,
                    ('>', true) => Op::Ge,
                    _ => return Err(error("`!` must be followed by `=`".into())),
                })
            }
            '"' => {
                chars.next();
                let mut escaped = false;
                let mut end = None;
                for (i, c) in chars.by_ref() {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.ok_or_else(|| error("unterminated string".into()))?;
                let decoded: String = serde_json::from_str(&text[at..=end])
                    .map_err(|_| error("invalid string (JSON escapes only)".into()))?;
                if decoded.contains('\0') {
                    // No stored key or string holds it (writes refuse it).
                    return Err(error("a string must not contain U+0000".into()));
                }
                TokenKind::Text(decoded)
            }
            // After `.`, a key: `a.0.b` is the keys "a", "0", "b", not the
            // number `0.b`.
            c if matches!(
                tokens.last(),
                Some(Token {
                    kind: TokenKind::Dot,
                    ..
                })
            ) && (c.is_alphanumeric() || c == '_' || c == '-') =>
            {
                let mut end = at;
                while let Some((i, c)) =
                    chars.next_if(|&(_, c)| c.is_alphanumeric() || c == '_' || c == '-')
                {
                    end = i + c.len_utf8();
                }
                TokenKind::Name(text[at..end].to_owned())
            }
            c if c == '-' || c.is_ascii_digit() => {
                let mut end = at;
                while let Some((i, c)) =
                    chars.next_if(|&(_, c)| c.is_ascii_alphanumeric() || "+-.".contains(c))
                {
                    end = i + c.len_utf8();
                }
                let literal = &text[at..end];
                // Stored numbers went through f64 (protobuf's Value): a
                // literal is brought to the same form, so that Rust,
                // Postgres and SQLite compare the same two numbers.
                match serde_json::from_str::<Value>(literal) {
                    Ok(Value::Number(n)) => match n.as_f64().and_then(json_number) {
                        Some(n) => TokenKind::Number(n),
                        None => return Err(error(format!("number `{literal}` is out of range"))),
                    },
                    _ => return Err(error(format!("invalid number `{literal}`"))),
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut end = at;
                while let Some((i, c)) =
                    chars.next_if(|&(_, c)| c.is_alphanumeric() || c == '_' || c == '-')
                {
                    end = i + c.len_utf8();
                }
                match &text[at..end] {
                    "AND" => TokenKind::And,
                    "OR" => TokenKind::Or,
                    "NOT" => TokenKind::Not,
                    name => TokenKind::Name(name.to_owned()),
                }
            }
            other => return Err(error(format!("unexpected character `{other}`"))),
        };
        tokens.push(Token {
            kind,
            column: start,
        });
    }
    Ok(tokens)
}

struct Parser<'a> {
    tokens: Vec<Token>,
    next: usize,
    fields: &'a [Field],
    /// The column just past the text, for "ended too soon".
    end: usize,
    /// `NOT`s and parentheses open around the next token.
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.next)
    }

    fn take(&mut self, what: &str) -> Result<Token, FilterError> {
        let token = self.tokens.get(self.next).cloned().ok_or(FilterError {
            column: self.end,
            message: format!("the filter ends where {what} was expected"),
        })?;
        self.next += 1;
        Ok(token)
    }

    fn eat(&mut self, kind: &TokenKind) -> bool {
        let found = self.peek().is_some_and(|t| &t.kind == kind);
        if found {
            self.next += 1;
        }
        found
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        self.chain(TokenKind::And, Self::or, Filter::And)
    }

    fn or(&mut self) -> Result<Filter, FilterError> {
        self.chain(TokenKind::Or, Self::unary, Filter::Or)
    }

    /// `operand { joiner operand }`, one operand standing for itself.
    fn chain(
        &mut self,
        joiner: TokenKind,
        operand: fn(&mut Self) -> Result<Filter, FilterError>,
        join: fn(Vec<Filter>) -> Filter,
    ) -> Result<Filter, FilterError> {
        let mut operands = vec![operand(self)?];
        while self.eat(&joiner) {
            operands.push(operand(self)?);
        }
        Ok(if operands.len() == 1 {
            operands.remove(0)
        } else {
            join(operands)
        })
    }

    fn unary(&mut self) -> Result<Filter, FilterError> {
        if let Some(token) = self.peek()
            && matches!(token.kind, TokenKind::Not | TokenKind::Open)
        {
            if self.depth == MAX_NESTING {
                return Err(token.error(format!(
                    "NOT and parentheses nest at most {MAX_NESTING} deep"
                )));
            }
            self.depth += 1;
            let inner = self.nested();
            self.depth -= 1;
            return inner;
        }
        self.restriction()
    }

    /// `NOT unary` or `( and )`, the next token being `NOT` or `(`.
    fn nested(&mut self) -> Result<Filter, FilterError> {
        if self.eat(&TokenKind::Not) {
            return Ok(Filter::Not(Box::new(self.unary()?)));
        }
        self.next += 1;
        let inner = self.and()?;
        let close = self.take("`)`")?;
        if close.kind != TokenKind::Close {
            return Err(close.error(format!("expected `)`, found {}", close.kind.describe())));
        }
        Ok(inner)
    }

    fn restriction(&mut self) -> Result<Filter, FilterError> {
        let path = self.path()?;
        let operator = self.take("a comparison or `:`")?;
        let column = operator.column;
        match operator.kind {
            TokenKind::Op(op) => Ok(Filter::Compare {
                path,
                op,
                value: self.literal()?,
            }),
            TokenKind::Colon => {
                if self.eat(&TokenKind::Star) {
                    return Ok(Filter::Has { path, value: None });
                }
                Ok(Filter::Has {
                    path,
                    value: Some(self.literal()?),
                })
            }
            other => Err(FilterError {
                column,
                message: format!(
                    "expected a comparison or `:` after the field path, found {}",
                    other.describe()
                ),
            }),
        }
    }

    fn path(&mut self) -> Result<Path, FilterError> {
        let first = self.take("a field")?;
        let TokenKind::Name(name) = &first.kind else {
            return Err(first.error(format!("expected a field, found {}", first.kind.describe())));
        };
        let field = self
            .fields
            .iter()
            .copied()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.fields.iter().map(|f| f.name()).collect();
                first.error(format!(
                    "unknown field `{name}` (known: {})",
                    known.join(", ")
                ))
            })?;
        let mut keys = Vec::new();
        while self.eat(&TokenKind::Dot) {
            let key = self.take("a key")?;
            let column = key.column;
            match key.kind {
                TokenKind::Name(name) => keys.push(name),
                TokenKind::Text(text) => keys.push(text),
                // `a.1` is the key "1", not a number.
                TokenKind::Number(n) => keys.push(n.to_string()),
                other => {
                    return Err(FilterError {
                        column,
                        message: format!("expected a key, found {}", other.describe()),
                    });
                }
            }
        }
        Ok(Path { field, keys })
    }

    fn literal(&mut self) -> Result<Value, FilterError> {
        let token = self.take("a value")?;
        let column = token.column;
        match token.kind {
            TokenKind::Text(text) => Ok(Value::String(text)),
            TokenKind::Number(n) => Ok(Value::Number(n)),
            TokenKind::Name(name) if name == "true" => Ok(Value::Bool(true)),
            TokenKind::Name(name) if name == "false" => Ok(Value::Bool(false)),
            TokenKind::Name(name) if name == "null" => Ok(Value::Null),
            other => Err(FilterError {
                column,
                message: format!(
                    "expected a value (a JSON string, number, true, false or null), found {}",
                    other.describe()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const USER: &[Field] = &Field::ALL;
    const ORG: &[Field] = &[Field::Public, Field::Private];

    fn filter(text: &str) -> Filter {
        parse(text, USER)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .expect("not empty")
    }

    fn public(value: serde_json::Value) -> Fields {
        Fields {
            public: value,
            ..Fields::default()
        }
    }

    fn holds(text: &str, value: serde_json::Value) -> bool {
        filter(text).matches(&public(value))
    }

    fn refused(text: &str, fields: &[Field]) -> FilterError {
        parse(text, fields).expect_err(text)
    }

    #[test]
    fn empty_is_none() {
        assert_eq!(parse("", USER), Ok(None));
        assert_eq!(parse("  \t", USER), Ok(None));
    }

    #[test]
    fn or_binds_tighter_than_and() {
        let a = || Filter::Compare {
            path: Path {
                field: Field::Public,
                keys: vec!["a".into()],
            },
            op: Op::Eq,
            value: json!(1),
        };
        let parsed =
            filter("public_metadata.a = 1 AND public_metadata.a = 1 OR public_metadata.a = 1");
        assert_eq!(parsed, Filter::And(vec![a(), Filter::Or(vec![a(), a()])]));
        let grouped =
            filter("(public_metadata.a = 1 AND public_metadata.a = 1) OR public_metadata.a = 1");
        assert_eq!(grouped, Filter::Or(vec![Filter::And(vec![a(), a()]), a()]));
    }

    #[test]
    fn paths_with_quoted_segments() {
        let parsed = filter(r#"private_metadata."a.b"."x y".c = "v""#);
        assert_eq!(
            parsed,
            Filter::Compare {
                path: Path {
                    field: Field::Private,
                    keys: vec!["a.b".into(), "x y".into(), "c".into()],
                },
                op: Op::Eq,
                value: json!("v"),
            }
        );
        assert!(holds(r#"public_metadata."a.b" = 1"#, json!({"a.b": 1})));
        assert!(!holds(r#"public_metadata.a.b = 1"#, json!({"a.b": 1})));
    }

    #[test]
    fn comparisons() {
        let doc = json!({"n": 5, "f": 2.5, "s": "b", "t": true, "z": null, "big": 18446744073709551615u64});
        for (text, expected) in [
            ("public_metadata.n = 5", true),
            ("public_metadata.n = 5.0", true),
            ("public_metadata.n > 4.5", true),
            ("public_metadata.n <= 5", true),
            ("public_metadata.n < 5", false),
            ("public_metadata.f >= 2.5", true),
            ("public_metadata.s > \"a\"", true),
            ("public_metadata.s < \"ba\"", true),
            ("public_metadata.t = true", true),
            ("public_metadata.t != false", true),
            ("public_metadata.t > false", false),
            ("public_metadata.z = null", true),
            ("public_metadata.z != null", false),
            ("public_metadata.big = 18446744073709551615", true),
            // Both are the f64 nearest them, as stored numbers are.
            ("public_metadata.big = 18446744073709551614", true),
            // Across types: false, never an error, `!=` included.
            ("public_metadata.n = \"5\"", false),
            ("public_metadata.n != \"5\"", false),
            ("public_metadata.s < 1", false),
            ("public_metadata.n != null", false),
        ] {
            assert_eq!(holds(text, doc.clone()), expected, "{text}");
        }
    }

    #[test]
    fn strings_order_by_code_point() {
        // "Z" (U+005A) < "a" (U+0061) < "é" (U+00E9) < "😀" (U+1F600).
        assert!(holds(r#"public_metadata.s < "a""#, json!({"s": "Z"})));
        assert!(holds(r#"public_metadata.s > "a""#, json!({"s": "é"})));
        assert!(holds(r#"public_metadata.s > "\uffff""#, json!({"s": "😀"})));
    }

    #[test]
    fn missing_keys_and_not() {
        let doc = json!({"b": 2});
        assert!(!holds("public_metadata.a = 1", doc.clone()));
        assert!(!holds("public_metadata.a != 1", doc.clone()));
        assert!(holds("NOT public_metadata.a = 1", doc.clone()));
        assert!(holds("NOT NOT public_metadata.b = 2", doc.clone()));
        // Below a value that is not an object: missing as well.
        assert!(!holds("public_metadata.b.c = 1", doc.clone()));
        assert!(holds("NOT public_metadata.b.c = 1", doc));
    }

    #[test]
    fn has() {
        let doc =
            json!({"tags": ["beta", 3], "plan": "gold", "prefs": {"theme": "dark"}, "z": null});
        for (text, expected) in [
            (r#"public_metadata.tags:"beta""#, true),
            (r#"public_metadata.tags:3"#, true),
            (r#"public_metadata.tags:"alpha""#, false),
            (r#"public_metadata.plan:"gold""#, true),
            (r#"public_metadata.plan:"go""#, false),
            (r#"public_metadata.plan:*"#, true),
            (r#"public_metadata.missing:*"#, false),
            (r#"public_metadata.z:*"#, true),
            (r#"public_metadata.prefs:"theme""#, true),
            (r#"public_metadata.prefs:"dark""#, false),
            (r#"public_metadata:"prefs""#, true),
            (r#"NOT public_metadata.missing:*"#, true),
        ] {
            assert_eq!(holds(text, doc.clone()), expected, "{text}");
        }
    }

    #[test]
    fn fields_are_checked_per_kind() {
        assert!(parse("unsafe_metadata.a = 1", USER).is_ok());
        let err = refused("unsafe_metadata.a = 1", ORG);
        assert_eq!(err.column, 1);
        assert!(
            err.message.contains("unknown field `unsafe_metadata`"),
            "{err}"
        );
        let err = refused("public_metadata.a = 1 AND metadata.a = 1", USER);
        assert_eq!(err.column, 27, "{err}");
    }

    #[test]
    fn errors_name_their_column() {
        for (text, column, words) in [
            ("public_metadata.a", 18, "ends where a comparison"),
            ("public_metadata.a = ", 21, "ends where a value"),
            ("public_metadata.a = foo", 21, "expected a value"),
            ("public_metadata.a ! 1", 19, "`!` must be followed"),
            (
                "public_metadata.a = 1 public_metadata.b = 2",
                23,
                "unexpected `public_metadata`",
            ),
            ("(public_metadata.a = 1", 23, "ends where `)`"),
            ("public_metadata.a = \"x", 21, "unterminated string"),
            ("public_metadata.a = 1.2.3", 21, "invalid number"),
            ("public_metadata.a = 1 AND", 26, "ends where a field"),
            ("public_metadata.a ~ 1", 19, "unexpected character `~`"),
            ("é.a = 1", 1, "unknown field `é`"),
            ("public_metadata.é = \"x\" OR ) ", 28, "expected a field"),
            (
                "public_metadata.a = 1 OR public_metadata.b",
                43,
                "ends where a comparison",
            ),
        ] {
            let err = refused(text, USER);
            assert_eq!(err.column, column, "{text}: {err}");
            assert!(err.message.contains(words), "{text}: {err}");
        }
    }

    #[test]
    fn numeric_keys_and_canonical_numbers() {
        assert!(holds(
            "public_metadata.a.0.b = 1",
            json!({"a": {"0": {"b": 1}}})
        ));
        assert!(holds("public_metadata.1.5 = 1", json!({"1": {"5": 1}})));
        // 2^60 is stored as the f64 nearest to it; the literal is read the
        // same way.
        let big = 1u64 << 60;
        let stored = json!({"n": crate::json::json_number(big as f64)});
        assert!(holds(&format!("public_metadata.n = {big}"), stored.clone()));
        assert!(!holds(&format!("public_metadata.n > {}", big + 4), stored));
        assert!(
            refused("public_metadata.n = 1e400", USER)
                .message
                .contains("number")
        );
    }

    #[test]
    fn nul_is_refused_in_strings_and_keys() {
        let err = refused(r#"public_metadata.s = "a\u0000""#, USER);
        assert!(err.message.contains("U+0000"), "{err}");
        assert_eq!(err.column, 21);
        assert!(
            refused(r#"public_metadata."\u0000" = 1"#, USER)
                .message
                .contains("U+0000")
        );
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = |n: usize| format!("{}public_metadata.a = 1{}", "(".repeat(n), ")".repeat(n));
        assert!(parse(&deep(MAX_NESTING), &Field::ALL).is_ok());
        let err = parse(&deep(MAX_NESTING + 1), &Field::ALL).unwrap_err();
        assert_eq!(err.column, MAX_NESTING + 1, "{err}");
        let nots = format!("{}public_metadata.a = 1", "NOT ".repeat(MAX_NESTING + 1));
        assert!(
            parse(&nots, &Field::ALL)
                .unwrap_err()
                .message
                .contains("nest")
        );
    }

    #[test]
    fn long_filters_are_refused() {
        let long = format!("public_metadata.a = \"{}\"", "x".repeat(MAX_FILTER_BYTES));
        assert!(refused(&long, USER).message.contains("at most 2048 bytes"));
    }

    #[test]
    fn non_ascii_names_and_keys() {
        assert!(holds(r#"public_metadata.größe = 3"#, json!({"größe": 3})));
        assert!(holds(
            r#"public_metadata."ключ" = "знач""#,
            json!({"ключ": "знач"})
        ));
    }

    proptest::proptest! {
        /// Whatever the text, parsing answers (a filter or an error with a
        /// column inside the text, or just past it), and what parses can be
        /// evaluated and translated for both backends.
        #[test]
        fn any_text_is_answered_without_panic(
            text in proptest::string::string_regex(
                r#"(public_metadata|private_metadata|[a-z.]{0,3}|"[^"]{0,3}"|[ ().:*=!<>-]|\d{1,3}|AND|OR|NOT|true|null|[\u{80}-\u{10FFFF}]){0,12}"#
            ).unwrap()
        ) {
            match parse(&text, &Field::ALL) {
                Ok(Some(filter)) => {
                    filter.matches(&public(json!({"a": [1, "x"], "b": {"c": null}})));
                    for backend in [sea_orm::DatabaseBackend::Postgres, sea_orm::DatabaseBackend::Sqlite] {
                        let mut sql = crate::store::sql::Sql::new(backend);
                        sql.filter(&filter);
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    proptest::prop_assert!(err.column >= 1);
                    proptest::prop_assert!(err.column <= text.chars().count() + 1, "{err}");
                }
            }
        }
    }
}
