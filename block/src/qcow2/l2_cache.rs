//! A small least-recently-used cache of L2 tables.
//!
//! Loading every L2 table of a large image would cost memory in proportion
//! to the disk; a handful of tables covers the working set of most guests
//! (one 64 KiB-cluster table maps 512 MiB). Entries changed by writes are
//! kept dirty here and written back by [`super::Qcow2Image`] after an
//! fdatasync, so that on disk an L2 entry never points at a cluster whose
//! data or refcount is not yet stable.

use std::ops::Range;

/// Memory budget for cached tables; the table count is clamped so that tiny
/// clusters still get a useful cache and 2 MiB clusters a bounded one.
const CACHE_BYTES: u64 = 1 << 20;
const MIN_TABLES: u64 = 4;
const MAX_TABLES: u64 = 32;

/// The span of entries changed since the table (or L1 table) was last
/// written back: writing the span is cheaper than the whole table.
#[derive(Clone, Debug, Default)]
pub(super) struct DirtyRange(Option<(usize, usize)>);

impl DirtyRange {
    pub(super) fn mark(&mut self, index: usize) {
        self.0 = Some(match self.0 {
            None => (index, index + 1),
            Some((start, end)) => (start.min(index), end.max(index + 1)),
        });
    }

    pub(super) fn range(&self) -> Option<Range<usize>> {
        self.0.map(|(start, end)| start..end)
    }

    pub(super) fn clear(&mut self) {
        self.0 = None;
    }
}

/// One cached L2 table.
pub(super) struct L2Table {
    /// Which L1 entry points at it.
    pub(super) l1_index: usize,
    /// Where it lives in the image file.
    pub(super) host: u64,
    pub(super) entries: Vec<u64>,
    pub(super) dirty: DirtyRange,
    last_used: u64,
}

impl L2Table {
    pub(super) fn new(l1_index: usize, host: u64, entries: Vec<u64>) -> Self {
        L2Table {
            l1_index,
            host,
            entries,
            dirty: DirtyRange::default(),
            last_used: 0,
        }
    }
}

pub(super) struct L2Cache {
    pub(super) tables: Vec<L2Table>,
    capacity: usize,
    clock: u64,
}

impl L2Cache {
    pub(super) fn new(cluster_size: u64) -> Self {
        let capacity = (CACHE_BYTES / cluster_size).clamp(MIN_TABLES, MAX_TABLES) as usize;
        L2Cache {
            tables: Vec::with_capacity(capacity),
            capacity,
            clock: 0,
        }
    }

    fn touch(&mut self, slot: usize) {
        self.clock += 1;
        self.tables[slot].last_used = self.clock;
    }

    /// The slot holding the table for `l1_index`, marked as just used.
    pub(super) fn find(&mut self, l1_index: usize) -> Option<usize> {
        let slot = self.tables.iter().position(|t| t.l1_index == l1_index)?;
        self.touch(slot);
        Some(slot)
    }

    /// The slot a new table would replace, if the cache is full.
    pub(super) fn victim(&self) -> Option<usize> {
        if self.tables.len() < self.capacity {
            return None;
        }
        self.tables
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| t.last_used)
            .map(|(slot, _)| slot)
    }

    /// Stores `table` in `slot` (from [`victim`](Self::victim)) or a new
    /// slot, and returns the slot. The caller has written back a dirty victim.
    pub(super) fn insert(&mut self, table: L2Table, slot: Option<usize>) -> usize {
        let slot = match slot {
            Some(slot) => {
                self.tables[slot] = table;
                slot
            }
            None => {
                self.tables.push(table);
                self.tables.len() - 1
            }
        };
        self.touch(slot);
        slot
    }

    pub(super) fn any_dirty(&self) -> bool {
        self.tables.iter().any(|t| t.dirty.range().is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut cache = L2Cache::new(1 << 20); // 4 tables
        for i in 0..4 {
            assert_eq!(cache.victim(), None);
            cache.insert(L2Table::new(i, 0, Vec::new()), None);
        }
        cache.find(0);
        let victim = cache.victim().unwrap();
        assert_eq!(cache.tables[victim].l1_index, 1);
        cache.insert(L2Table::new(9, 0, Vec::new()), Some(victim));
        assert!(cache.find(1).is_none());
        assert!(cache.find(9).is_some());
    }

    #[test]
    fn dirty_range_grows() {
        let mut d = DirtyRange::default();
        assert!(d.range().is_none());
        d.mark(5);
        d.mark(2);
        d.mark(7);
        assert_eq!(d.range(), Some(2..8));
        d.clear();
        assert!(d.range().is_none());
    }
}
