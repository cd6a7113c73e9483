//! `data.parquet` (`docs/outputs.md`): the run's data rows as one Parquet
//! file, zstd-compressed, written with the Apache Arrow crates.
//!
//! A Parquet file's schema comes before its rows, and the rows of a run only
//! say what their columns are once all of them have been seen. So the file
//! takes two walks over the part files: [`Schema::learn`] on the first
//! (memory grows with the number of distinct keys, not with the rows), then
//! [`ParquetOut::row`] on the second, which turns rows into Arrow record
//! batches of at most [`BATCH_ROWS`] rows or [`BATCH_BYTES`] of JSON, and
//! closes a row group whenever [`ROW_GROUP_BYTES`] of encoded data are
//! waiting. Memory is thus bounded whatever the size of the run.
//!
//! The schema: the union of the rows' keys in first-seen order; nested
//! objects stay structs, arrays stay lists; a field whose types differ
//! across rows is widened (integer → float) or, failing that, holds each
//! value as JSON text. A field with only nulls or empty objects is text too,
//! as Parquet has no empty struct. A row that is not an object is the
//! `value` column, as in `data.csv`.

use std::io::{self, Write};
use std::sync::Arc;

use arrow_json::reader::Decoder;
use arrow_schema::{DataType, Field, Fields, Schema as ArrowSchema, SchemaRef};
use indexmap::IndexMap;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

/// Rows per Arrow record batch: what the writer holds before encoding.
const BATCH_ROWS: usize = 1024;
/// JSON bytes per record batch, so a run of large rows holds no more.
const BATCH_BYTES: usize = 2 << 20;
/// Encoded bytes a row group may hold before it is written out: the
/// writer's memory, and a size readers handle well. At 64 MiB a 1 GB run
/// peaked at 75 MB; at 16 MiB, within the 64 MB the whole daemon may use
/// (`cargo bench --bench big_dataset`, `docs/benchmarks.md`).
const ROW_GROUP_BYTES: usize = 16 << 20;
/// Fields one object may bring into the schema; past this the object is
/// kept as JSON text, so a dataset with a key per row cannot grow the
/// schema (and the memory it takes) without bound.
pub const MAX_FIELDS: usize = 4096;

/// What a field holds, learned from the rows: each value seen moves it up
/// this lattice, never down.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// Only nulls (or nothing) so far.
    Null,
    Bool,
    Int,
    Float,
    Str,
    List(Box<Kind>),
    Struct(IndexMap<String, Kind>),
    /// Types that cannot be reconciled: each value as JSON text.
    Json,
}

impl Kind {
    /// Moves the kind up to cover `value` as well.
    fn absorb(&mut self, value: &Value) {
        match (&mut *self, value) {
            (_, Value::Null) | (Kind::Json, _) => {}
            (Kind::Null, _) => {
                *self = match value {
                    Value::Bool(_) => Kind::Bool,
                    Value::Number(n) if n.is_i64() => Kind::Int,
                    Value::Number(_) => Kind::Float,
                    Value::String(_) => Kind::Str,
                    Value::Array(_) => Kind::List(Box::new(Kind::Null)),
                    Value::Object(_) => Kind::Struct(IndexMap::new()),
                    Value::Null => Kind::Null,
                };
                self.absorb(value);
            }
            (Kind::Bool, Value::Bool(_))
            | (Kind::Float, Value::Number(_))
            | (Kind::Str, Value::String(_)) => {}
            (Kind::Int, Value::Number(n)) => {
                if !n.is_i64() {
                    *self = Kind::Float;
                }
            }
            (Kind::List(item), Value::Array(values)) => {
                for v in values {
                    item.absorb(v);
                }
            }
            (Kind::Struct(fields), Value::Object(map)) => {
                for (key, v) in map {
                    if !fields.contains_key(key) {
                        if fields.len() == MAX_FIELDS {
                            *self = Kind::Json;
                            return;
                        }
                        fields.insert(key.clone(), Kind::Null);
                    }
                    if let Some(field) = fields.get_mut(key) {
                        field.absorb(v);
                    }
                }
            }
            _ => *self = Kind::Json,
        }
    }

    /// The kind as written: what Parquet cannot hold (a field never seen
    /// with a value, an object never seen with a key) becomes text.
    fn settle(self) -> Kind {
        match self {
            Kind::Null => Kind::Str,
            Kind::List(item) => Kind::List(Box::new(item.settle())),
            Kind::Struct(fields) if fields.is_empty() => Kind::Json,
            Kind::Struct(fields) => {
                Kind::Struct(fields.into_iter().map(|(k, v)| (k, v.settle())).collect())
            }
            other => other,
        }
    }

    fn data_type(&self) -> DataType {
        match self {
            Kind::Bool => DataType::Boolean,
            Kind::Int => DataType::Int64,
            Kind::Float => DataType::Float64,
            Kind::Null | Kind::Str | Kind::Json => DataType::Utf8,
            Kind::List(item) => DataType::new_list(item.data_type(), true),
            Kind::Struct(fields) => DataType::Struct(fields_of(fields)),
        }
    }

    /// Makes `value` fit the kind: values of a JSON-text field become their
    /// compact JSON; everything else already decodes as the kind says.
    fn conform(&self, value: &mut Value) {
        match (self, value) {
            (_, Value::Null) => {}
            (Kind::Json, value) => {
                let text = value.to_string();
                *value = Value::String(text);
            }
            (Kind::List(item), Value::Array(values)) => {
                values.iter_mut().for_each(|v| item.conform(v));
            }
            (Kind::Struct(fields), Value::Object(map)) => {
                for (key, v) in map.iter_mut() {
                    if let Some(kind) = fields.get(key) {
                        kind.conform(v);
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether [`conform`](Self::conform) can change anything: most
    /// schemas have no JSON-text field, and their rows go as they are.
    fn has_json(&self) -> bool {
        match self {
            Kind::Json => true,
            Kind::List(item) => item.has_json(),
            Kind::Struct(fields) => fields.values().any(Kind::has_json),
            _ => false,
        }
    }
}

fn fields_of(fields: &IndexMap<String, Kind>) -> Fields {
    fields
        .iter()
        .map(|(name, kind)| Field::new(name, kind.data_type(), true))
        .collect()
}

/// The top level of a row: an object as it is; anything else as the
/// `value` column, as `data.csv` has it.
fn as_object(row: Value) -> Map<String, Value> {
    match row {
        Value::Object(map) => map,
        other => Map::from_iter([("value".to_string(), other)]),
    }
}

/// The schema learned so far from a run's data rows.
#[derive(Debug, Default)]
pub struct Schema {
    fields: IndexMap<String, Kind>,
    /// A top level past [`MAX_FIELDS`]: each row is one JSON-text column.
    whole_rows: bool,
}

impl Schema {
    /// Takes in one data row (error rows never go into `data.*`).
    pub fn learn(&mut self, row: &Value) {
        if self.whole_rows {
            return;
        }
        let mut top = Kind::Struct(std::mem::take(&mut self.fields));
        match row {
            Value::Object(_) => top.absorb(row),
            other => top.absorb(&Value::Object(Map::from_iter([(
                "value".to_string(),
                other.clone(),
            )]))),
        }
        match top {
            Kind::Struct(fields) => self.fields = fields,
            _ => self.whole_rows = true,
        }
    }
}

/// `data.parquet` being written.
pub struct ParquetOut<W: Write + Send> {
    kind: Kind,
    conform: bool,
    whole_rows: bool,
    decoder: Decoder,
    writer: ArrowWriter<W>,
    batch: Vec<Value>,
    batch_bytes: usize,
    pub rows: u64,
}

impl<W: Write + Send> ParquetOut<W> {
    pub fn create(out: W, schema: Schema) -> io::Result<Self> {
        let whole_rows = schema.whole_rows;
        let kind = if whole_rows {
            Kind::Struct(IndexMap::from_iter([("row".to_string(), Kind::Json)]))
        } else if schema.fields.is_empty() {
            // No row with a field (none at all, or only `{}`): one empty
            // column still holds the rows' number, which Parquet keeps per
            // column.
            Kind::Struct(IndexMap::from_iter([("value".to_string(), Kind::Str)]))
        } else {
            Kind::Struct(schema.fields).settle()
        };
        let fields = match &kind {
            Kind::Struct(fields) => fields_of(fields),
            _ => Fields::empty(),
        };
        let schema: SchemaRef = Arc::new(ArrowSchema::new(fields));
        let decoder = arrow_json::ReaderBuilder::new(schema.clone())
            .with_batch_size(BATCH_ROWS)
            .build_decoder()
            .map_err(arrow_error)?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let writer =
            ArrowWriter::try_new(out, schema.clone(), Some(properties)).map_err(parquet_error)?;
        Ok(ParquetOut {
            conform: kind.has_json(),
            kind,
            whole_rows,
            decoder,
            writer,
            batch: Vec::with_capacity(BATCH_ROWS),
            batch_bytes: 0,
            rows: 0,
        })
    }

    /// Adds one data row; `raw_len` is its size as JSON, which bounds the
    /// batch.
    pub fn row(&mut self, row: Value, raw_len: usize) -> io::Result<()> {
        let mut row = if self.whole_rows {
            Value::Object(Map::from_iter([(
                "row".to_string(),
                Value::String(row.to_string()),
            )]))
        } else {
            Value::Object(as_object(row))
        };
        if self.conform {
            self.kind.conform(&mut row);
        }
        self.batch.push(row);
        self.batch_bytes += raw_len;
        self.rows += 1;
        if self.batch.len() >= BATCH_ROWS || self.batch_bytes >= BATCH_BYTES {
            self.write_batch()?;
        }
        Ok(())
    }

    fn write_batch(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.decoder.serialize(&self.batch).map_err(arrow_error)?;
        self.batch.clear();
        self.batch_bytes = 0;
        while let Some(batch) = self.decoder.flush().map_err(arrow_error)? {
            self.writer.write(&batch).map_err(parquet_error)?;
        }
        if self.writer.in_progress_size() >= ROW_GROUP_BYTES {
            self.writer.flush().map_err(parquet_error)?;
        }
        Ok(())
    }

    /// Writes what is left and the file's footer; returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_batch()?;
        self.writer.into_inner().map_err(parquet_error)
    }
}

/// A `data.parquet` read back as JSON rows, null fields left out: how the
/// tests compare it with `data.json`, and a way to look into one.
pub fn read_rows(file: bytes::Bytes) -> io::Result<Vec<Value>> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(parquet_error)?
        .build()
        .map_err(parquet_error)?;
    let mut out = arrow_json::LineDelimitedWriter::new(Vec::new());
    for batch in reader {
        out.write(&batch.map_err(arrow_error)?)
            .map_err(arrow_error)?;
    }
    out.finish().map_err(arrow_error)?;
    out.into_inner()
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).map_err(io::Error::other))
        .collect()
}

fn arrow_error(e: arrow_schema::ArrowError) -> io::Error {
    io::Error::other(format!("data.parquet: {e}"))
}

fn parquet_error(e: parquet::errors::ParquetError) -> io::Error {
    match e {
        parquet::errors::ParquetError::External(inner) => match inner.downcast::<io::Error>() {
            Ok(io) => *io,
            Err(other) => io::Error::other(format!("data.parquet: {other}")),
        },
        other => io::Error::other(format!("data.parquet: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn learned(rows: &[Value]) -> Kind {
        let mut schema = Schema::default();
        rows.iter().for_each(|r| schema.learn(r));
        Kind::Struct(schema.fields).settle()
    }

    #[test]
    fn types_widen_across_rows_and_what_cannot_be_reconciled_is_json_text() {
        let kind = learned(&[
            json!({"n": 1, "x": 1, "tags": ["a"], "about": {"k": 1}, "gone": null, "empty": {}}),
            json!({"n": 2.5, "x": "one", "tags": [], "about": {"k": 2, "extra": true}}),
            json!({"new": [1, 2.5], "about": 7}),
            json!(5),
        ]);
        let Kind::Struct(fields) = &kind else {
            panic!("{kind:?}")
        };
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["n", "x", "tags", "about", "gone", "empty", "new", "value"]
        );
        assert_eq!(fields["n"], Kind::Float, "integer → float");
        assert_eq!(fields["x"], Kind::Json, "integer and text: JSON text");
        assert_eq!(fields["tags"], Kind::List(Box::new(Kind::Str)));
        assert_eq!(fields["about"], Kind::Json, "object and number: JSON text");
        assert_eq!(fields["gone"], Kind::Str, "only nulls: text");
        assert_eq!(fields["empty"], Kind::Json, "no empty struct in Parquet");
        assert_eq!(fields["new"], Kind::List(Box::new(Kind::Float)));
        assert_eq!(fields["value"], Kind::Int, "a row that is not an object");
    }

    #[test]
    fn an_object_with_a_key_per_row_stops_growing_the_schema() {
        let mut schema = Schema::default();
        for i in 0..MAX_FIELDS + 10 {
            schema.learn(&json!({"about": {format!("k{i}"): i}}));
        }
        assert_eq!(schema.fields["about"], Kind::Json);
        let mut top = Schema::default();
        for i in 0..MAX_FIELDS + 10 {
            top.learn(&json!({format!("k{i}"): i}));
        }
        assert!(top.whole_rows);
        assert!(top.fields.is_empty());
    }
}
