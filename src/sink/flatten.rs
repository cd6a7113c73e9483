//! CSV cells from JSON rows (`docs/outputs.md`): nested objects become dotted columns,
//! arrays and other non-scalar leaves compact JSON, null and missing empty,
//! and — because scraped text is untrusted and spreadsheets execute it —
//! strings that start like a formula get a leading `'`.

use serde_json::Value;

/// Calls `cell(column, text)` for each leaf of `row`, in the row's key order.
/// The reference for [`flatten_raw`], which the final files use and which
/// the tests hold to the same cells.
pub fn flatten(row: &Value, escape_formulas: bool, cell: &mut impl FnMut(&str, String)) {
    match row {
        Value::Object(map) if !map.is_empty() => {
            let mut path = String::new();
            walk(map, &mut path, escape_formulas, cell);
        }
        // A row that is not an object is one cell.
        other => cell("value", leaf(other, escape_formulas)),
    }
}

fn walk(
    map: &serde_json::Map<String, Value>,
    path: &mut String,
    escape: bool,
    cell: &mut impl FnMut(&str, String),
) {
    for (key, value) in map {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        match value {
            Value::Object(inner) if !inner.is_empty() => walk(inner, path, escape, cell),
            other => cell(path, leaf(other, escape)),
        }
        path.truncate(len);
    }
}

fn leaf(value: &Value, escape: bool) -> String {
    match value {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if escape && starts_like_formula(s) => format!("'{s}"),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A header cell: column names come from scraped keys, as untrusted as
/// the values, so they are escaped the same way.
pub fn header_cell(name: &str, escape: bool) -> std::borrow::Cow<'_, str> {
    if escape && starts_like_formula(name) {
        std::borrow::Cow::Owned(format!("'{name}"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

fn starts_like_formula(s: &str) -> bool {
    matches!(
        s.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    )
}

/// [`flatten`] straight from a row's JSON text, in one pass and without
/// building a `Value`: the final files' hot path. Also says whether the row
/// is an error row (a top-level `error` or `error_code` that is not null,
/// as [`super::is_error_row`] decides). Invalid JSON is an error.
pub fn flatten_raw(
    raw: &[u8],
    escape_formulas: bool,
    cell: &mut impl FnMut(&str, &str),
) -> serde_json::Result<bool> {
    walk_raw(raw, Some(escape_formulas), cell)
}

/// The columns [`flatten_raw`] would give `raw`'s cells, in the same order,
/// without making the cells' text (no numbers formatted, no arrays
/// re-encoded): what the CSV header needs. Says whether it is an error row;
/// invalid JSON is an error.
pub fn columns_raw(raw: &[u8], column: &mut impl FnMut(&str)) -> serde_json::Result<bool> {
    walk_raw(raw, None, &mut |name, _| column(name))
}

/// `escape`: `Some(escape_formulas)` to make the cells' text, `None` for
/// the columns alone (every cell's text is then empty).
fn walk_raw(
    raw: &[u8],
    escape: Option<bool>,
    cell: &mut impl FnMut(&str, &str),
) -> serde_json::Result<bool> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let mut path = String::new();
    let mut error = false;
    serde::de::DeserializeSeed::deserialize(
        Walk {
            path: &mut path,
            escape,
            cell,
            error: Some(&mut error),
        },
        &mut de,
    )?;
    de.end()?;
    Ok(error)
}

/// Walks one value at `path`; `error` is set only for the top level.
struct Walk<'a, F> {
    path: &'a mut String,
    /// See [`walk_raw`].
    escape: Option<bool>,
    cell: &'a mut F,
    error: Option<&'a mut bool>,
}

impl<F: FnMut(&str, &str)> Walk<'_, F> {
    /// A leaf at the current path (a top-level scalar is the `value` column).
    fn leaf(&mut self, text: &str) {
        let column = if self.path.is_empty() {
            "value"
        } else {
            self.path.as_str()
        };
        (self.cell)(column, text);
    }

    /// A number leaf; its text is made only when cells are wanted.
    fn number(&mut self, text: impl FnOnce() -> String) {
        if self.escape.is_some() {
            self.leaf(&text());
        } else {
            self.leaf("");
        }
    }
}

impl<'de, F: FnMut(&str, &str)> serde::de::DeserializeSeed<'de> for Walk<'_, F> {
    /// Whether the value was `null`.
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: FnMut(&str, &str)> serde::de::Visitor<'de> for Walk<'_, F> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(mut self, v: bool) -> Result<bool, E> {
        self.leaf(if v { "true" } else { "false" });
        Ok(false)
    }

    fn visit_i64<E>(mut self, v: i64) -> Result<bool, E> {
        self.number(|| v.to_string());
        Ok(false)
    }

    fn visit_u64<E>(mut self, v: u64) -> Result<bool, E> {
        self.number(|| v.to_string());
        Ok(false)
    }

    fn visit_f64<E>(mut self, v: f64) -> Result<bool, E> {
        self.number(|| Value::from(v).to_string());
        Ok(false)
    }

    fn visit_str<E>(mut self, v: &str) -> Result<bool, E> {
        if self.escape == Some(true) && starts_like_formula(v) {
            self.leaf(&format!("'{v}"));
        } else {
            self.leaf(v);
        }
        Ok(false)
    }

    fn visit_unit<E>(mut self) -> Result<bool, E> {
        self.leaf("");
        Ok(true)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<bool, A::Error> {
        if self.escape.is_none() {
            while seq.next_element::<Checked>()?.is_some() {}
            self.leaf("");
            return Ok(false);
        }
        // Arrays are one cell of compact JSON, as in `flatten`.
        let mut items = Vec::new();
        while let Some(v) = seq.next_element::<Value>()? {
            items.push(v);
        }
        self.leaf(&Value::Array(items).to_string());
        Ok(false)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let Walk {
            path,
            escape,
            cell,
            mut error,
        } = self;
        let len = path.len();
        let mut any = false;
        loop {
            if !path.is_empty() {
                path.push('.');
            }
            if map.next_key_seed(Key(path))?.is_none() {
                path.truncate(len);
                break;
            }
            any = true;
            let top_error = error.is_some() && matches!(&path[len..], "error" | "error_code");
            let null = map.next_value_seed(Walk {
                path,
                escape,
                cell,
                error: None,
            })?;
            if top_error && !null {
                if let Some(e) = error.as_deref_mut() {
                    *e = true;
                }
            }
            path.truncate(len);
        }
        if !any {
            // An empty object is a leaf, as in `flatten`.
            let column = if path.is_empty() {
                "value"
            } else {
                path.as_str()
            };
            cell(column, "{}");
        }
        Ok(false)
    }
}

/// Any JSON value, read as fully as [`Value`] reads it and then dropped.
/// `IgnoredAny` would skip numbers without converting them, so a row with
/// `[1e400]` would pass the download's check and then fail every later
/// full parse (the CSV cells, Parquet, dedup keys): a row the final files
/// could never be written past.
struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, Checked>()?
            .is_some()
        {}
        Ok(Checked)
    }
}

/// Appends a map key to the path, borrowed from the input when it can be.
struct Key<'a>(&'a mut String);

impl<'de> serde::de::DeserializeSeed<'de> for Key<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.0.push_str(v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(row: &str, escape: bool) -> Vec<(String, String)> {
        let v: Value = serde_json::from_str(row).unwrap();
        let mut out = Vec::new();
        flatten(&v, escape, &mut |k, c| out.push((k.to_string(), c)));
        out
    }

    #[test]
    fn nested_objects_become_dotted_columns_in_order() {
        let got = cells(
            r#"{"name":"A","about":{"updated_on":"2024","n":{"deep":1}},"tags":["x",1],"none":null,"empty":{},"ok":true}"#,
            true,
        );
        let want = [
            ("name", "A"),
            ("about.updated_on", "2024"),
            ("about.n.deep", "1"),
            ("tags", r#"["x",1]"#),
            ("none", ""),
            ("empty", "{}"),
            ("ok", "true"),
        ];
        assert_eq!(got, want.map(|(k, v)| (k.to_string(), v.to_string())));
    }

    #[test]
    fn formulas_are_escaped_only_in_strings() {
        let row = r#"{"a":"=HYPERLINK(\"x\")","b":"+1","c":"-2","d":"@x","e":"\tx","f":"\rx","g":"a=b","h":-3}"#;
        let got: Vec<String> = cells(row, true).into_iter().map(|(_, v)| v).collect();
        assert_eq!(
            got,
            [
                "'=HYPERLINK(\"x\")",
                "'+1",
                "'-2",
                "'@x",
                "'\tx",
                "'\rx",
                "a=b",
                "-3"
            ]
        );
        let raw: Vec<String> = cells(row, false).into_iter().map(|(_, v)| v).collect();
        assert_eq!(raw[0], "=HYPERLINK(\"x\")");
    }

    fn raw_cells(row: &str, escape: bool) -> (Vec<(String, String)>, bool) {
        let mut out = Vec::new();
        let error = flatten_raw(row.as_bytes(), escape, &mut |k, c| {
            out.push((k.to_string(), c.to_string()))
        })
        .unwrap();
        (out, error)
    }

    #[test]
    fn the_one_pass_walker_agrees_with_flatten_and_the_error_probe() {
        let rows = [
            r#"{"name":"A","about":{"updated_on":"2024","n":{"deep":1}},"tags":["x",1],"none":null,"empty":{},"ok":true}"#,
            r#"{"a":"=HYPERLINK(\"x\")","b":"+1","c":"-2","d":"@x","e":"\tx","f":"\rx","g":"a=b","h":-3}"#,
            r#"{"input":{"url":"x"},"error":"dead","error_code":"dead_page"}"#,
            r#"{"error_code":"blocked"}"#,
            r#"{"url":"x","errors_seen":0,"nested":{"error":"x"}}"#,
            r#"{"error":null,"url":"x"}"#,
            r#"{"f":1.5e300,"g":-0.25,"h":18446744073709551615,"i":-9223372036854775808}"#,
            r#"{"esc\"aped":"\u00e9\n","x":{"":{}}}"#,
            r#"{}"#,
            r#"[1,{"a":2}]"#,
            r#""=just a string""#,
            r#"42"#,
            r#"null"#,
        ];
        for row in rows {
            for escape in [true, false] {
                let (got, error) = raw_cells(row, escape);
                assert_eq!(got, cells(row, escape), "{row}");
                assert_eq!(
                    error,
                    super::super::is_error_row(row.as_bytes()).unwrap(),
                    "{row}"
                );
                // The header's walk finds the same columns, in order.
                let mut columns = Vec::new();
                let shape_error =
                    columns_raw(row.as_bytes(), &mut |c| columns.push(c.to_string())).unwrap();
                let names: Vec<String> = got.into_iter().map(|(k, _)| k).collect();
                assert_eq!((columns, shape_error), (names, error), "{row}");
            }
        }
        assert!(columns_raw(br#"{"a":[1,"#, &mut |_| {}).is_err());
        assert!(flatten_raw(br#"{"a":"#, true, &mut |_, _| {}).is_err());
        assert!(flatten_raw(br#"{"a":1} x"#, true, &mut |_, _| {}).is_err());
    }
}
