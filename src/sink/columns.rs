//! The CSV header (`docs/outputs.md`): the union of the data rows' columns in
//! first-seen order. A part's columns are collected as it is downloaded
//! ([`super::part::PartWriter`]) and recorded with its chunk, so the final
//! files start writing at once instead of reading every part twice; parts
//! saved before columns were recorded are walked for them
//! ([`super::outputs::write`]).

use std::io;

use indexmap::IndexSet;

use super::flatten::columns_raw;

/// The data rows' columns, in first-seen order. Error rows' columns are
/// not among them: error rows never go into `data.*`.
#[derive(Default)]
pub struct Columns {
    names: IndexSet<String>,
    cache: ColumnCache,
    /// The current row's columns that `names` lacks.
    new: Vec<String>,
}

impl Columns {
    /// Adds the columns of one row's JSON text (checking that it is JSON);
    /// returns whether it is an error row, whose columns are left out.
    pub fn add_row(&mut self, raw: &[u8]) -> io::Result<bool> {
        let Columns { names, cache, new } = self;
        new.clear();
        cache.start_row();
        let is_error = columns_raw(raw, &mut |column| {
            if cache.index(names, column).is_none() {
                new.push(column.to_string());
            }
        })
        .map_err(super::invalid)?;
        if !is_error && !new.is_empty() {
            names.extend(new.drain(..));
            cache.forget();
        }
        Ok(is_error)
    }

    /// Adds columns found earlier (a later page's, a recorded part's).
    pub fn extend<S: AsRef<str>>(&mut self, columns: impl IntoIterator<Item = S>) {
        for column in columns {
            let column = column.as_ref();
            if !self.names.contains(column) {
                self.names.insert(column.to_string());
                self.cache.forget();
            }
        }
    }

    pub fn names(&self) -> &IndexSet<String> {
        &self.names
    }

    pub fn into_names(self) -> IndexSet<String> {
        self.names
    }
}

/// Finds columns in the header, remembering the previous row's columns in
/// order: a dataset's rows mostly share one shape, so most lookups become a
/// string comparison instead of a hash.
#[derive(Default)]
pub(crate) struct ColumnCache {
    last: Vec<(String, Option<usize>)>,
    k: usize,
}

impl ColumnCache {
    pub(crate) fn start_row(&mut self) {
        self.k = 0;
    }

    /// The header's index of the row's next cell, `column`.
    pub(crate) fn index(&mut self, header: &IndexSet<String>, column: &str) -> Option<usize> {
        let k = self.k;
        self.k += 1;
        if let Some((name, i)) = self.last.get(k) {
            if name == column {
                return *i;
            }
        }
        let i = header.get_index_of(column);
        self.last.truncate(k);
        self.last.push((column.to_string(), i));
        i
    }

    /// The header grew: what was missing may be there now.
    pub(crate) fn forget(&mut self) {
        self.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_the_data_rows_keys_in_first_seen_order() {
        let mut c = Columns::default();
        let rows: [&[u8]; 5] = [
            br#"{"url":"a","about":{"n":1}}"#,
            br#"{"input":{"url":"b"},"error":"dead","error_code":"dead_page"}"#,
            br#"{"url":"c","title":"t","about":{"n":2}}"#,
            br#"{"about":{"m":3},"url":"d"}"#,
            br#"7"#,
        ];
        let errors: Vec<bool> = rows.iter().map(|r| c.add_row(r).unwrap()).collect();
        assert_eq!(errors, [false, true, false, false, false]);
        assert_eq!(
            c.names().iter().collect::<Vec<_>>(),
            ["url", "about.n", "title", "about.m", "value"]
        );
        // Columns recorded elsewhere join in order, once each.
        c.extend(["title", "zeta", "url"]);
        let names: Vec<String> = c.into_names().into_iter().collect();
        assert_eq!(
            names,
            ["url", "about.n", "title", "about.m", "value", "zeta"]
        );
        assert!(Columns::default().add_row(br#"{"a":"#).is_err());
    }
}
