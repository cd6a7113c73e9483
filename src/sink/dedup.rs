//! Incremental output keys (`dedup_key`): each data row's key — the value
//! at a dotted path — as a 128-bit hash, so history costs 16 bytes a row on
//! disk and nothing in memory.

use std::io;
use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::part::for_each_row;

/// The hash of the value at `path` (`a.b.c`) in `row`; `None` when the row
/// has no such value (null counts as none). Such rows are always new.
pub fn key_hash(row: &Value, path: &str) -> Option<u128> {
    let mut v = row;
    for part in path.split('.') {
        v = v.as_object()?.get(part)?;
    }
    if v.is_null() {
        return None;
    }
    let digest = Sha256::digest(v.to_string().as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    Some(u128::from_be_bytes(first))
}

/// Sorted, distinct key hashes of the data rows of the given parts.
pub fn run_hashes(run_dir: &Path, parts: &[u32], path: &str) -> io::Result<Vec<u128>> {
    let mut hashes = Vec::new();
    for_each_row(run_dir, parts, |raw| {
        if !super::is_error_row(raw)? {
            let row: Value = serde_json::from_slice(raw)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            hashes.extend(key_hash(&row, path));
        }
        Ok(())
    })?;
    hashes.sort_unstable();
    hashes.dedup();
    Ok(hashes)
}

/// What decides which rows go to `new.*`.
pub struct NewRows<'a> {
    pub key: &'a str,
    /// Sorted hashes not seen in earlier complete runs.
    pub unseen: &'a [u128],
}

impl NewRows<'_> {
    pub fn is_new(&self, row: &Value) -> bool {
        key_hash(row, self.key).is_none_or(|h| self.unseen.binary_search(&h).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_by_dotted_path() {
        let row = json!({"url": "https://a", "input": {"url": "https://b"}, "n": null});
        assert_eq!(
            key_hash(&row, "url"),
            key_hash(&json!({"url": "https://a"}), "url")
        );
        assert_ne!(key_hash(&row, "url"), key_hash(&row, "input.url"));
        assert_eq!(key_hash(&row, "missing"), None);
        assert_eq!(key_hash(&row, "n"), None);
        assert_eq!(key_hash(&row, "url.deeper"), None);
    }
}
