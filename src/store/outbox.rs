//! The notification outbox (`docs/notifications.md`): each event, once per
//! target, is stored before its first delivery attempt, and stays until a
//! target took it or 24 hours have passed. Delivered ids are remembered in
//! a second tree, so an event raised again (after a restart, say) is not
//! sent twice.
//!
//! | tree       | key                       | value            |
//! |------------|---------------------------|------------------|
//! | `outbox`   | event id `\0` target id   | [`OutboxRecord`] |
//! | `notified` | event id `\0` target id   | UnixMs delivered or dropped, u64 big-endian |

use serde::{Deserialize, Serialize};

use super::{decode, encode, Store, StoreError, VERSION};
use crate::chunk::UnixMs;

const OUTBOX: &str = "outbox";
const NOTIFIED: &str = "notified";

/// One event waiting for one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRecord {
    pub v: u32,
    /// The event's JSON body, as every attempt sends it.
    pub body: serde_json::Value,
    pub event: String,
    pub id: String,
    pub target: String,
    pub attempts: u32,
    pub first_at: UnixMs,
    pub next_at: UnixMs,
    pub last_error: Option<String>,
}

impl OutboxRecord {
    pub fn new(
        id: String,
        event: String,
        target: String,
        body: serde_json::Value,
        now: UnixMs,
    ) -> Self {
        OutboxRecord {
            v: VERSION,
            body,
            event,
            id,
            target,
            attempts: 0,
            first_at: now,
            next_at: now,
            last_error: None,
        }
    }

    fn key(&self) -> Vec<u8> {
        key(&self.id, &self.target)
    }
}

fn key(id: &str, target: &str) -> Vec<u8> {
    [id.as_bytes(), b"\0", target.as_bytes()].concat()
}

impl Store {
    /// Stores `record` unless its event already went to its target, or is
    /// already waiting for it. Not flushed: the caller's next flush, or the
    /// sender's before its first attempt, makes it durable.
    pub fn outbox_add(&self, record: &OutboxRecord) -> Result<bool, StoreError> {
        let key = record.key();
        if self.db.open_tree(NOTIFIED)?.contains_key(&key)? {
            return Ok(false);
        }
        let outbox = self.db.open_tree(OUTBOX)?;
        let added = outbox
            .compare_and_swap(&key, None::<&[u8]>, Some(encode(record)))?
            .is_ok();
        Ok(added)
    }

    /// Every waiting record, in key order. A record that cannot be read is
    /// skipped with its key in the error list: one bad record must not stop
    /// the others.
    pub fn outbox(&self) -> Result<(Vec<OutboxRecord>, Vec<StoreError>), StoreError> {
        let mut records = Vec::new();
        let mut bad = Vec::new();
        for item in self.db.open_tree(OUTBOX)?.iter() {
            let (k, v) = item?;
            match decode::<OutboxRecord>(&k, &v) {
                Ok(r) => records.push(r),
                Err(e) => bad.push(e),
            }
        }
        Ok((records, bad))
    }

    pub fn outbox_len(&self) -> Result<usize, StoreError> {
        Ok(self.db.open_tree(OUTBOX)?.len())
    }

    /// Records a failed attempt (or any change) of a waiting record.
    pub fn outbox_update(&self, record: &OutboxRecord) -> Result<(), StoreError> {
        self.db
            .open_tree(OUTBOX)?
            .insert(record.key(), encode(record))?;
        Ok(())
    }

    /// The record is done with: delivered, or given up. Its id is
    /// remembered so it is never sent again.
    pub fn outbox_done(&self, record: &OutboxRecord, now: UnixMs) -> Result<(), StoreError> {
        let key = record.key();
        self.db
            .open_tree(NOTIFIED)?
            .insert(&key, &now.max(0).to_be_bytes())?;
        self.db.open_tree(OUTBOX)?.remove(key)?;
        Ok(())
    }

    /// Forgets delivered ids older than `before`: the ids of events that
    /// can no longer be raised again.
    pub fn notified_prune(&self, before: UnixMs) -> Result<usize, StoreError> {
        let tree = self.db.open_tree(NOTIFIED)?;
        let mut gone = 0;
        for item in tree.iter() {
            let (k, v) = item?;
            let at = <[u8; 8]>::try_from(v.as_ref()).map_or(0, i64::from_be_bytes);
            if at < before {
                tree.remove(k)?;
                gone += 1;
            }
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_waits_until_done_and_is_never_added_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rec = OutboxRecord::new(
            "e1".into(),
            "run.failed".into(),
            "t1".into(),
            serde_json::json!({"id": "e1"}),
            5,
        );
        assert!(store.outbox_add(&rec).unwrap());
        assert!(!store.outbox_add(&rec).unwrap(), "already waiting");
        let mut failed = rec.clone();
        failed.attempts = 1;
        failed.last_error = Some("500".into());
        store.outbox_update(&failed).unwrap();
        let (waiting, bad) = store.outbox().unwrap();
        assert_eq!((waiting, bad.len()), (vec![failed.clone()], 0));
        store.outbox_done(&failed, 9).unwrap();
        assert_eq!(store.outbox_len().unwrap(), 0);
        assert!(!store.outbox_add(&rec).unwrap(), "delivered: never again");
        // Another target of the same event is its own record.
        let other = OutboxRecord {
            target: "t2".into(),
            ..rec.clone()
        };
        assert!(store.outbox_add(&other).unwrap());
        assert_eq!(store.notified_prune(10).unwrap(), 1);
        assert!(store.outbox_add(&rec).unwrap(), "forgotten after pruning");
    }
}
