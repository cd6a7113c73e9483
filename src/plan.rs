//! Run and chunk naming, and splitting inputs into chunks. No IO: the caller
//! feeds rows in and stores what comes out.

use serde_json::{Map, Value};

use crate::chunk::UnixMs;

/// `YYYYMMDDTHHMMSSZ` of `now`, with `-2`, `-3`… when taken.
pub fn run_id(now: UnixMs, taken: impl Fn(&str) -> bool) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(now.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let base = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if !taken(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|id| !taken(id))
        .unwrap_or(base)
}

/// Orders run ids by time, then by their `-N` suffix as a number.
pub fn run_id_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(id: &str) -> (&str, u32) {
        match id.split_once('-') {
            Some((base, n)) => (base, n.parse().unwrap_or(0)),
            None => (id, 1),
        }
    }
    parts(a).cmp(&parts(b))
}

/// The tag a chunk's trigger carries, unique per chunk of every run.
pub fn chunk_name(job: &str, run_id: &str, index: u32) -> String {
    format!("harvestd:{job}:{run_id}:{index}")
}

/// Packs input rows into chunks of `size` rows, as NDJSON.
pub struct Chunker {
    size: u64,
    buf: Vec<u8>,
    count: u64,
}

/// One full chunk: its rows as NDJSON and how many.
pub struct Packed {
    pub ndjson: Vec<u8>,
    pub count: u64,
}

impl Chunker {
    pub fn new(size: u32) -> Chunker {
        Chunker {
            size: u64::from(size.max(1)),
            buf: Vec::new(),
            count: 0,
        }
    }

    /// Adds a row; returns a chunk when one is full.
    pub fn push(&mut self, row: &Map<String, Value>) -> Option<Packed> {
        // A map of JSON values always serialises.
        serde_json::to_writer(&mut self.buf, row).ok()?;
        self.buf.push(b'\n');
        self.count += 1;
        (self.count == self.size).then(|| self.take())
    }

    /// The last, partly filled chunk, if any.
    pub fn finish(mut self) -> Option<Packed> {
        (self.count > 0).then(|| self.take())
    }

    fn take(&mut self) -> Packed {
        Packed {
            count: std::mem::replace(&mut self.count, 0),
            ndjson: std::mem::take(&mut self.buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_utc_seconds_with_suffixes() {
        let at = 1_700_000_000_999;
        assert_eq!(run_id(at, |_| false), "20231114T221320Z");
        let taken = ["20231114T221320Z", "20231114T221320Z-2"];
        assert_eq!(run_id(at, |id| taken.contains(&id)), "20231114T221320Z-3");
    }

    #[test]
    fn run_ids_order_by_time_then_suffix() {
        use std::cmp::Ordering::*;
        assert_eq!(
            run_id_order("20231114T221320Z", "20231114T221319Z"),
            Greater
        );
        assert_eq!(
            run_id_order("20231114T221320Z-2", "20231114T221320Z"),
            Greater
        );
        assert_eq!(
            run_id_order("20231114T221320Z-10", "20231114T221320Z-9"),
            Greater
        );
        assert_eq!(run_id_order("20231114T221320Z", "20231114T221320Z"), Equal);
    }

    #[test]
    fn chunks_hold_size_rows_and_a_remainder() {
        let mut c = Chunker::new(2);
        let row = |i: i32| {
            serde_json::json!({ "url": format!("https://x/{i}") })
                .as_object()
                .unwrap()
                .clone()
        };
        let mut out = Vec::new();
        for i in 0..5 {
            out.extend(c.push(&row(i)));
        }
        out.extend(c.finish());
        let lines: Vec<usize> = out
            .iter()
            .map(|p| {
                p.ndjson
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .collect();
        assert_eq!(lines, [2, 2, 1]);
        assert_eq!(out.iter().map(|p| p.count).collect::<Vec<_>>(), [2, 2, 1]);
    }
}
