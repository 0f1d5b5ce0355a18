//! One bounded cache for metadata tables (L2 tables, refcount blocks), by
//! host offset, in the manner of QEMU's `qcow2-cache.c`: a fixed budget in
//! bytes, least recently used tables evicted first, dirty tables tracked
//! and never dropped unwritten, and a flush dependency: dirty tables go
//! out only after a barrier (the fsync making what they point at durable)
//! has run.
//!
//! Memory is bounded by the budget and the table size (at most one cluster,
//! 2 MiB), never by a number read from the file.

use lru::LruCache;

use crate::engine::error::Result;

/// QEMU's default L2 cache size cap (`DEFAULT_L2_CACHE_MAX_SIZE`).
pub const L2_CACHE_BYTES: u64 = 32 << 20;
/// Refcount blocks are written through (see the writer), so the cache only
/// saves reads: a quarter of the L2 budget, as QEMU's old default ratio.
pub const REFCOUNT_CACHE_BYTES: u64 = 8 << 20;
/// Never fewer tables than this, whatever the cluster size (QEMU keeps at
/// least two L2 tables and four refcount blocks).
const MIN_TABLES: u64 = 4;

struct Slot<T> {
    table: T,
    dirty: bool,
}

pub struct TableCache<T> {
    slots: LruCache<u64, Slot<T>>,
    capacity: usize,
    dirty: usize,
}

/// What [`TableCache::insert`] could not do: every cached table is dirty,
/// so the caller must flush before anything new fits.
#[derive(Debug, PartialEq, Eq)]
pub struct NeedsFlush;

impl<T> TableCache<T> {
    /// A cache of at most `budget` bytes of `table_bytes`-byte tables (and
    /// at least a few tables).
    pub fn new(budget: u64, table_bytes: u64) -> Self {
        let tables = (budget / table_bytes.max(1)).max(MIN_TABLES) as usize;
        TableCache {
            slots: LruCache::unbounded(),
            capacity: tables,
            dirty: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.slots.contains(&offset)
    }

    /// The table at `offset`, now the most recently used.
    pub fn get(&mut self, offset: u64) -> Option<&T> {
        self.slots.get(&offset).map(|s| &s.table)
    }

    /// The table at `offset` for changing: it is dirty from now on.
    pub fn get_dirty(&mut self, offset: u64) -> Option<&mut T> {
        let slot = self.slots.get_mut(&offset)?;
        if !slot.dirty {
            slot.dirty = true;
            self.dirty += 1;
        }
        Some(&mut slot.table)
    }

    /// The table at `offset` for a change the caller writes to the file
    /// itself at once (write-through): it stays clean.
    pub fn get_written(&mut self, offset: u64) -> Option<&mut T> {
        self.slots.get_mut(&offset).map(|s| &mut s.table)
    }

    /// Whether inserting a table now would need a flush first: the cache
    /// is full and every table in it is dirty.
    pub fn full_of_dirty(&self) -> bool {
        self.slots.len() >= self.capacity && self.dirty >= self.slots.len()
    }

    /// Cache a clean table read from (or just written to) `offset`,
    /// evicting the least recently used clean one when full.
    pub fn insert(&mut self, offset: u64, table: T) -> std::result::Result<(), NeedsFlush> {
        if let Some(slot) = self.slots.get_mut(&offset) {
            if slot.dirty {
                self.dirty -= 1;
            }
            *slot = Slot {
                table,
                dirty: false,
            };
            return Ok(());
        }
        while self.slots.len() >= self.capacity {
            // Least recently used first: the iterator runs from the most.
            let victim = self
                .slots
                .iter()
                .rev()
                .find(|(_, s)| !s.dirty)
                .map(|(&off, _)| off);
            match victim {
                Some(off) => {
                    self.slots.pop(&off);
                }
                None => return Err(NeedsFlush),
            }
        }
        self.slots.put(
            offset,
            Slot {
                table,
                dirty: false,
            },
        );
        Ok(())
    }

    /// Forget the table at `offset`, dirty or not (its cluster is gone).
    pub fn remove(&mut self, offset: u64) -> Option<T> {
        let slot = self.slots.pop(&offset)?;
        if slot.dirty {
            self.dirty -= 1;
        }
        Some(slot.table)
    }

    /// Forget every table, dirty ones included (the file they belong to
    /// was switched or replaced).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.dirty = 0;
    }

    /// Write every dirty table, in offset order, through `write`, after
    /// `barrier` ran once (the flush dependency: what the tables point at
    /// is durable before any of them reaches the disk). Each table is
    /// clean once written. False when nothing was dirty (the barrier did
    /// not run).
    pub fn flush(
        &mut self,
        barrier: impl FnOnce() -> Result<()>,
        mut write: impl FnMut(u64, &T) -> Result<()>,
    ) -> Result<bool> {
        if self.dirty == 0 {
            return Ok(false);
        }
        barrier()?;
        let mut offsets: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&off, _)| off)
            .collect();
        offsets.sort_unstable();
        for off in offsets {
            if let Some(slot) = self.slots.peek_mut(&off) {
                write(off, &slot.table)?;
                slot.dirty = false;
                self.dirty -= 1;
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_budget_and_least_recent_clean_goes_first() {
        let mut c: TableCache<u32> = TableCache::new(4 * 65536, 65536);
        assert_eq!(c.capacity(), 4);
        for off in 0..4 {
            c.insert(off, off as u32).unwrap();
        }
        c.get(0);
        *c.get_dirty(1).unwrap() = 10;
        c.insert(9, 9).unwrap();
        // 1 is dirty and 0 was used: 2 was the least recent clean one.
        assert!(!c.contains(2));
        assert!(c.contains(0) && c.contains(1));
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn dirty_tables_are_never_dropped_unwritten() {
        let mut c: TableCache<u32> = TableCache::new(0, 1 << 21);
        assert_eq!(c.capacity(), MIN_TABLES as usize);
        for off in 0..4 {
            c.insert(off, 0).unwrap();
            c.get_dirty(off);
        }
        assert!(c.full_of_dirty());
        assert_eq!(c.insert(7, 0), Err(NeedsFlush));
        let log = std::cell::RefCell::new(Vec::new());
        c.flush(
            || {
                log.borrow_mut().push(None);
                Ok(())
            },
            |off, _| {
                log.borrow_mut().push(Some(off));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(log.into_inner(), [None, Some(0), Some(1), Some(2), Some(3)]);
        assert_eq!(c.dirty_count(), 0);
        c.insert(7, 0).unwrap();
        // Nothing dirty: no barrier, no writes.
        assert!(!c.flush(|| panic!("no barrier"), |_, _| panic!()).unwrap());
    }
}
