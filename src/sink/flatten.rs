//! CSV cells from JSON rows (SPEC §6): nested objects become dotted columns,
//! arrays and other non-scalar leaves compact JSON, null and missing empty,
//! and — because scraped text is untrusted and spreadsheets execute it —
//! strings that start like a formula get a leading `'`.

use serde_json::Value;

/// Calls `cell(column, text)` for each leaf of `row`, in the row's key order.
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

fn starts_like_formula(s: &str) -> bool {
    matches!(
        s.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    )
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
}
