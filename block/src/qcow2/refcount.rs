//! Cluster allocation and refcounts.
//!
//! Refcounts are 16-bit big-endian entries in refcount blocks (one cluster
//! each); the refcount table (contiguous clusters, held in memory) points at
//! the blocks. Updates are written through to the file at once: a refcount
//! that is too high only leaks a cluster, so it may reach the disk before
//! the L2 entry that uses the cluster, never after.
//!
//! New clusters are always taken from the end of the file. Each one must
//! have refcount 0 — anything else means the refcounts are damaged, and kite
//! stops rather than hand out a cluster something else may use.

use super::{header, Qcow2Image, MAX_HOST_OFFSET};
use crate::BlockError;

/// Bits 9-63 of a refcount table entry: the refcount block's offset.
pub(super) const TABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

impl Qcow2Image {
    /// Refcount blocks hold cluster_size / 2 entries.
    fn refblock_bits(&self) -> u32 {
        self.cluster_bits - 1
    }

    /// (refcount table index, index within the block) of the cluster at `host`.
    fn refcount_position(&self, host: u64) -> (u64, u64) {
        let cluster = host >> self.cluster_bits;
        let bits = self.refblock_bits();
        (cluster >> bits, cluster & ((1 << bits) - 1))
    }

    /// The refcount of the cluster at `host`; clusters no block covers are free.
    pub(super) fn refcount(&mut self, host: u64) -> Result<u16, BlockError> {
        let (table_index, index) = self.refcount_position(host);
        let block = usize::try_from(table_index)
            .ok()
            .and_then(|i| self.refcount_table.get(i))
            .map_or(0, |entry| entry & TABLE_OFFSET_MASK);
        if block == 0 {
            return Ok(0);
        }
        let mut bytes = [0u8; 2];
        self.file
            .read_exact_at(&mut bytes, block + index * 2, "refcount block")?;
        Ok(u16::from_be_bytes(bytes))
    }

    /// Allocates a cluster at the end of the file with refcount 1 (written
    /// to the file) and returns its host offset. Its contents are the
    /// caller's to write.
    pub(super) fn alloc_cluster(&mut self) -> Result<u64, BlockError> {
        let host = self.take_cluster()?;
        let entry = self.refcount_entry_for_update(host)?;
        let mut bytes = [0u8; 2];
        self.file
            .read_exact_at(&mut bytes, entry, "refcount block")?;
        let old = u16::from_be_bytes(bytes);
        if old != 0 {
            return Err(self.corrupt(format!(
                "cluster at {host:#x}, past the end of the image, has refcount {old}; \
                 the refcounts are damaged (repair with `qemu-img check -r all`)"
            )));
        }
        self.file
            .write_all_at(&1u16.to_be_bytes(), entry, "refcount block")?;
        Ok(host)
    }

    /// Reserves the next cluster at the end of the file, without touching
    /// its refcount.
    fn take_cluster(&mut self) -> Result<u64, BlockError> {
        let host = self.next_free;
        match host.checked_add(self.cluster_size) {
            Some(end) if end <= MAX_HOST_OFFSET => {
                self.next_free = end;
                Ok(host)
            }
            _ => Err(BlockError::unsupported(
                self.path(),
                "image file has reached the largest size qcow2 can address",
            )),
        }
    }

    /// The file offset of the refcount entry for `host`, creating the
    /// refcount block (and growing the table) if needed.
    fn refcount_entry_for_update(&mut self, host: u64) -> Result<u64, BlockError> {
        let (table_index, index) = self.refcount_position(host);
        if table_index >= self.refcount_table.len() as u64 {
            self.grow_refcount_table(table_index)?;
        }
        let slot = table_index as usize;
        let Some(&entry) = self.refcount_table.get(slot) else {
            return Err(self.corrupt(format!("refcount table has no entry {slot} after growing")));
        };
        let mut block = entry & TABLE_OFFSET_MASK;
        if block == 0 {
            block = self.new_refcount_block(slot)?;
        }
        Ok(block + index * 2)
    }

    /// Allocates the refcount block for table entry `slot`. The block is
    /// placed at the end of the file; if it falls in its own range it
    /// records its own refcount, otherwise that refcount is set first
    /// (which may recurse once more). The block reaches the disk, and an
    /// fdatasync, before the table entry pointing at it.
    fn new_refcount_block(&mut self, slot: usize) -> Result<u64, BlockError> {
        let block = self.take_cluster()?;
        let mut bytes = vec![0u8; self.cluster_size as usize];
        let (own_slot, own_index) = self.refcount_position(block);
        if own_slot == slot as u64 {
            let i = own_index as usize * 2;
            bytes[i..i + 2].copy_from_slice(&1u16.to_be_bytes());
        } else {
            // Covered by another block: count it there, creating that block
            // if needed.
            let entry = self.refcount_entry_for_update(block)?;
            self.file
                .write_all_at(&1u16.to_be_bytes(), entry, "refcount block")?;
        }
        self.file
            .write_all_at(&bytes, block, "new refcount block")?;
        self.file.sync_data()?;
        let entry_offset = self.refcount_table_offset + slot as u64 * 8;
        self.file
            .write_all_at(&block.to_be_bytes(), entry_offset, "refcount table")?;
        self.refcount_table[slot] = block;
        Ok(block)
    }

    /// Replaces the refcount table with a larger one that has an entry for
    /// `needed_index`.
    ///
    /// The new table goes at the end of the file, followed by the refcount
    /// blocks that cover the new table and themselves (the area is beyond
    /// everything the old table covers, so those blocks are all new). The
    /// blocks and table are written and synced before the header switches to
    /// the new table in one 12-byte write (offset and cluster count are
    /// adjacent), and synced again before the old table's clusters are
    /// freed. A crash at any point leaves either the old or the new table in
    /// force, at worst leaking clusters.
    fn grow_refcount_table(&mut self, needed_index: u64) -> Result<(), BlockError> {
        let cs = self.cluster_size;
        let entries_per_cluster = cs / 8;
        let old_len = self.refcount_table.len() as u64;
        let start = self.next_free;
        let first_slot = self.refcount_position(start).0;
        if first_slot < old_len || needed_index < old_len {
            // Growth is only ever needed for clusters past the table's reach,
            // which lie at the end of the file; anything else is a bug.
            return Err(self.corrupt(format!(
                "refusing to grow the refcount table for index {needed_index} \
                 with free space starting at {start:#x}"
            )));
        }
        let too_large = || {
            BlockError::unsupported(
                self.path(),
                "image file has grown beyond what its refcount table can describe",
            )
        };

        // Find a table size and a block count that cover the new area:
        // [start, start + (table_clusters + blocks) * cs).
        let mut new_len = old_len
            .saturating_mul(2)
            .max(needed_index + 1)
            .next_multiple_of(entries_per_cluster);
        let (table_clusters, blocks) = loop {
            let table_clusters = new_len / entries_per_cluster;
            if table_clusters * cs > header::MAX_REFCOUNT_TABLE_BYTES {
                return Err(too_large());
            }
            let mut blocks = 0u64;
            loop {
                let end = (table_clusters + blocks)
                    .checked_mul(cs)
                    .and_then(|len| start.checked_add(len))
                    .filter(|&end| end <= MAX_HOST_OFFSET)
                    .ok_or_else(too_large)?;
                let needed = self.refcount_position(end - 1).0 - first_slot + 1;
                if needed == blocks {
                    break;
                }
                blocks = needed;
            }
            if first_slot + blocks <= new_len {
                break (table_clusters, blocks);
            }
            new_len += entries_per_cluster;
        };

        let table_offset = start;
        let blocks_offset = start + table_clusters * cs;
        let end = blocks_offset + blocks * cs;
        let mut table = self.refcount_table.clone();
        table.resize(new_len as usize, 0);
        for b in 0..blocks {
            let block_offset = blocks_offset + b * cs;
            let slot = first_slot + b;
            // Clusters of the new area that fall in this block's range.
            let per_block = 1u64 << self.refblock_bits();
            let range_start = (slot * per_block) << self.cluster_bits;
            let range_end = ((slot + 1) * per_block) << self.cluster_bits;
            let mut bytes = vec![0u8; cs as usize];
            let mut host = start.max(range_start);
            while host < end.min(range_end) {
                let i = self.refcount_position(host).1 as usize * 2;
                bytes[i..i + 2].copy_from_slice(&1u16.to_be_bytes());
                host += cs;
            }
            self.file
                .write_all_at(&bytes, block_offset, "new refcount block")?;
            table[slot as usize] = block_offset;
        }
        let table_bytes = super::encode_table(&table);
        self.file
            .write_all_at(&table_bytes, table_offset, "new refcount table")?;
        self.file.sync_data()?;

        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.file
            .write_all_at(&hdr, header::OFFSET_REFCOUNT_TABLE, "header refcount table")?;
        self.file.sync_data()?;

        let old_offset = self.refcount_table_offset;
        let old_clusters = (old_len * 8).div_ceil(cs);
        self.refcount_table = table;
        self.refcount_table_offset = table_offset;
        self.next_free = end;
        for i in 0..old_clusters {
            let entry = self.refcount_entry_for_update(old_offset + i * cs)?;
            self.file
                .write_all_at(&0u16.to_be_bytes(), entry, "refcount block")?;
        }
        log::debug!(
            "disk image {}: refcount table grown to {table_clusters} clusters",
            self.path().display()
        );
        Ok(())
    }
}
