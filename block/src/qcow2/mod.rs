//! qcow2 images (versions 2 and 3), read and write.
//!
//! A guest offset maps through two tables: the L1 table (held in memory,
//! bounded by the file size and qemu's 32 MiB limit) points at L2 tables
//! (one cluster each, cached in [`l2_cache`]), whose entries point at data
//! clusters. Every cluster in use has a 16-bit refcount in a refcount block,
//! found through the refcount table (see [`refcount`]).
//!
//! Writes allocate clusters at the end of the file. On-disk ordering keeps
//! the image consistent through a crash: a new cluster's refcount and data
//! are written first, and the L2/L1 entries that point at them only after an
//! fdatasync (at [`flush`](DiskImage::flush), or when a dirty L2 table leaves
//! the cache). A crash can therefore leak clusters but never leave an entry
//! pointing at unwritten data or at a cluster with refcount 0.
//!
//! Refused at open: encryption, external data files, extended L2 entries,
//! unknown incompatible features, refcount widths other than 16 bits, and
//! anything inconsistent in the header or the tables. Opened read-only only
//! (writing would need more than kite implements): images with internal
//! snapshots, and images marked dirty or corrupt. Compressed clusters read
//! as [`BlockError::Unsupported`]. Discard is not supported.

pub mod header;
mod l2_cache;
mod refcount;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::file::ImageFile;
use crate::{check_range, open_chained, BlockError, DiskImage, FileId, ImageFormat, OpenOptions};
use header::{Header, HeaderError};
use l2_cache::{DirtyRange, L2Cache, L2Table};

pub use header::MAGIC;

/// Bits 9-55 of an L1 or L2 entry: the host offset.
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Set on L1/L2 entries whose cluster has refcount exactly 1, so it may be
/// written in place.
const OFLAG_COPIED: u64 = 1 << 63;
/// Set on L2 entries of compressed clusters.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Set on (v3) L2 entries of clusters that read as zeros.
const OFLAG_ZERO: u64 = 1;
/// Host offsets must fit in the entry's offset bits.
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// What one guest cluster is, from its L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cluster {
    /// Never written: reads from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; may keep a preallocated host cluster.
    Zero(Option<u64>),
    /// Data at this host offset.
    Data(u64),
    Compressed,
}

/// Where a run of guest bytes comes from, for reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The image file at this host offset.
    Host(u64),
    Zeros,
    Backing,
}

/// An open qcow2 image.
pub struct Qcow2Image {
    file: ImageFile,
    readonly: bool,
    version: u32,
    cluster_bits: u32,
    cluster_size: u64,
    /// Virtual disk size.
    size: u64,
    l1_table_offset: u64,
    l1: Vec<u64>,
    /// L1 entries changed in memory and not yet written.
    l1_dirty: DirtyRange,
    refcount_table_offset: u64,
    refcount_table: Vec<u64>,
    l2_cache: L2Cache,
    /// Host offset where the next cluster will be allocated: the end of the
    /// file, rounded up to a cluster, when opened.
    next_free: u64,
    backing: Option<Box<dyn DiskImage>>,
}

impl Qcow2Image {
    /// Parses and validates the qcow2 image in `file` and opens its backing
    /// chain (read-only, shared-locked, relative names resolved against
    /// `path`'s directory). `path` is also the name used in error messages.
    /// `opts.direct` must say whether `file` was opened with `O_DIRECT`;
    /// locking `file` itself is the caller's business ([`crate::open_image`]
    /// does it).
    ///
    /// This is the entry point for fuzzing: any file contents must give
    /// either an image or an error, never a panic or an allocation larger
    /// than the file.
    pub fn from_file(file: File, path: &Path, opts: &OpenOptions) -> Result<Self, BlockError> {
        let meta = file
            .metadata()
            .map_err(|e| BlockError::io(path, "cannot stat", e))?;
        let mut chain = vec![(meta.dev(), meta.ino())];
        Self::open_chained(file, path, opts, &mut chain)
    }

    pub(crate) fn open_chained(
        file: File,
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Vec<FileId>,
    ) -> Result<Self, BlockError> {
        let mut file = ImageFile::new(file, path, opts.direct)?;
        let header = read_header(&file)?;
        check_features(&header, path, opts.readonly)?;

        let file_len = file.len();
        let cluster_size = header.cluster_size();
        let l1 = read_table(
            &file,
            header.l1_table_offset,
            header.l1_size as usize,
            "L1 table",
        )?;
        validate_table(
            &l1,
            ENTRY_OFFSET_MASK,
            cluster_size,
            file_len,
            "L2 table",
            path,
        )?;
        let refcount_entries =
            (u64::from(header.refcount_table_clusters) * cluster_size / 8) as usize;
        let refcount_table = read_table(
            &file,
            header.refcount_table_offset,
            refcount_entries,
            "refcount table",
        )?;
        validate_table(
            &refcount_table,
            refcount::TABLE_OFFSET_MASK,
            cluster_size,
            file_len,
            "refcount block",
            path,
        )?;

        let backing = match &header.backing_file {
            Some(name) => Some(open_backing(path, name, &header, opts, chain)?),
            None => None,
        };

        if !opts.readonly && header.autoclear_features != 0 {
            // The spec lets a writer that does not know an autoclear feature
            // (such as persistent bitmaps, which writes would make stale)
            // proceed only after clearing the bits.
            file.write_all_at(
                &0u64.to_be_bytes(),
                header::OFFSET_AUTOCLEAR_FEATURES,
                "header autoclear features",
            )?;
            file.sync_data()?;
        }

        let next_free = file
            .len()
            .checked_next_multiple_of(cluster_size)
            .ok_or_else(|| BlockError::corrupt(path, "file is too large"))?;
        Ok(Qcow2Image {
            readonly: opts.readonly,
            version: header.version,
            cluster_bits: header.cluster_bits,
            cluster_size,
            size: header.size,
            l1_table_offset: header.l1_table_offset,
            l1,
            l1_dirty: DirtyRange::default(),
            refcount_table_offset: header.refcount_table_offset,
            refcount_table,
            l2_cache: L2Cache::new(cluster_size),
            next_free,
            backing,
            file,
        })
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Whether reads of unallocated clusters go to a backing file.
    pub fn has_backing_file(&self) -> bool {
        self.backing.is_some()
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn corrupt(&self, reason: impl Into<String>) -> BlockError {
        BlockError::corrupt(self.path(), reason)
    }

    fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size - 1)
    }

    fn l1_index(&self, guest: u64) -> usize {
        // L2 tables hold cluster_size / 8 entries: cluster_bits - 3 bits.
        (guest >> (2 * self.cluster_bits - 3)) as usize
    }

    fn l2_index(&self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & (self.cluster_size / 8 - 1)) as usize
    }

    /// The cache slot holding the L2 table at `host` for `l1_index`, reading
    /// it if needed.
    fn load_l2(&mut self, l1_index: usize, host: u64) -> Result<usize, BlockError> {
        if let Some(slot) = self.l2_cache.find(l1_index) {
            return Ok(slot);
        }
        let entries = read_table(
            &self.file,
            host,
            (self.cluster_size / 8) as usize,
            "L2 table",
        )?;
        self.cache_l2(L2Table::new(l1_index, host, entries))
    }

    /// Adds a table to the cache, writing back metadata first if the table
    /// it replaces is dirty.
    fn cache_l2(&mut self, table: L2Table) -> Result<usize, BlockError> {
        let victim = self.l2_cache.victim();
        if let Some(slot) = victim {
            if self.l2_cache.tables[slot].dirty.range().is_some() {
                self.write_back_metadata()?;
            }
        }
        Ok(self.l2_cache.insert(table, victim))
    }

    /// The L2 entry for `guest`, 0 if its L2 table does not exist.
    fn l2_entry(&mut self, guest: u64) -> Result<u64, BlockError> {
        let l1_index = self.l1_index(guest);
        let Some(&l1_entry) = self.l1.get(l1_index) else {
            return Ok(0);
        };
        let host = l1_entry & ENTRY_OFFSET_MASK;
        if host == 0 {
            return Ok(0);
        }
        let slot = self.load_l2(l1_index, host)?;
        Ok(self.l2_cache.tables[slot].entries[self.l2_index(guest)])
    }

    fn classify(&self, entry: u64) -> Result<Cluster, BlockError> {
        if entry & OFLAG_COMPRESSED != 0 {
            return Ok(Cluster::Compressed);
        }
        let host = entry & ENTRY_OFFSET_MASK;
        if host != 0 && self.offset_in_cluster(host) != 0 {
            return Err(self.corrupt(format!(
                "data cluster offset {host:#x} is not aligned to a cluster"
            )));
        }
        if entry & OFLAG_ZERO != 0 {
            if self.version < 3 {
                return Err(self.corrupt("zero cluster entry in a version 2 image"));
            }
            return Ok(Cluster::Zero((host != 0).then_some(host)));
        }
        Ok(if host == 0 {
            Cluster::Unallocated
        } else {
            Cluster::Data(host)
        })
    }

    /// Where the guest byte at `guest` is read from.
    fn source_of(&mut self, guest: u64) -> Result<Source, BlockError> {
        let entry = self.l2_entry(guest)?;
        Ok(match self.classify(entry)? {
            Cluster::Data(host) => Source::Host(host + self.offset_in_cluster(guest)),
            Cluster::Zero(_) => Source::Zeros,
            Cluster::Unallocated if self.backing.is_some() => Source::Backing,
            Cluster::Unallocated => Source::Zeros,
            Cluster::Compressed => {
                return Err(BlockError::unsupported(
                    self.path(),
                    format!(
                        "reading compressed clusters is not supported (guest offset {guest:#x})"
                    ),
                ))
            }
        })
    }

    /// The source of the bytes at `guest` and how many of the following
    /// `max_len` bytes come from the same place, so that contiguous clusters
    /// are read with one call.
    fn map_run(&mut self, guest: u64, max_len: u64) -> Result<(Source, u64), BlockError> {
        let first = self.source_of(guest)?;
        let mut len = (self.cluster_size - self.offset_in_cluster(guest)).min(max_len);
        while len < max_len {
            let next = self.source_of(guest + len)?;
            let contiguous = match (first, next) {
                (Source::Host(a), Source::Host(b)) => b == a + len,
                (a, b) => a == b,
            };
            if !contiguous {
                break;
            }
            len += self.cluster_size.min(max_len - len);
        }
        Ok((first, len))
    }

    /// Reads from the backing file at guest offset `guest`; bytes past its
    /// end (or all of them, without one) are zeros.
    fn read_backing(&mut self, buf: &mut [u8], guest: u64) -> Result<(), BlockError> {
        let mut avail = 0;
        if let Some(backing) = self.backing.as_mut() {
            avail = backing.size().saturating_sub(guest).min(buf.len() as u64) as usize;
            if avail > 0 {
                backing.read_at(&mut buf[..avail], guest)?;
            }
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// The cache slot of the L2 table for `guest`, allocating the table if
    /// its L1 entry is empty.
    fn l2_for_write(&mut self, guest: u64) -> Result<usize, BlockError> {
        let l1_index = self.l1_index(guest);
        let l1_entry = *self.l1.get(l1_index).ok_or_else(|| {
            self.corrupt(format!("guest offset {guest:#x} is beyond the L1 table"))
        })?;
        let host = l1_entry & ENTRY_OFFSET_MASK;
        if host == 0 {
            let host = self.alloc_cluster()?;
            // Zero the table on disk now, so that the fdatasync before the L1
            // entry is written makes it a valid (empty) table.
            let zeros = vec![0u8; self.cluster_size as usize];
            self.file.write_all_at(&zeros, host, "new L2 table")?;
            self.l1[l1_index] = host | OFLAG_COPIED;
            self.l1_dirty.mark(l1_index);
            let entries = vec![0u64; (self.cluster_size / 8) as usize];
            return self.cache_l2(L2Table::new(l1_index, host, entries));
        }
        if l1_entry & OFLAG_COPIED == 0 {
            self.check_exclusive(host, "L2 table")?;
            self.l1[l1_index] = host | OFLAG_COPIED;
            self.l1_dirty.mark(l1_index);
        }
        self.load_l2(l1_index, host)
    }

    fn set_l2_entry(&mut self, guest: u64, entry: u64) -> Result<(), BlockError> {
        let slot = self.l2_for_write(guest)?;
        let index = self.l2_index(guest);
        let table = &mut self.l2_cache.tables[slot];
        table.entries[index] = entry;
        table.dirty.mark(index);
        Ok(())
    }

    /// Refuses to write in place to a cluster that is not ours alone: only a
    /// refcount of exactly 1 allows it (clusters shared with snapshots would
    /// need copy-on-write, which kite does not do).
    fn check_exclusive(&mut self, host: u64, what: &str) -> Result<(), BlockError> {
        match self.refcount(host)? {
            1 => Ok(()),
            0 => Err(self.corrupt(format!("{what} at {host:#x} is in use but has refcount 0"))),
            n => Err(BlockError::unsupported(
                self.path(),
                format!(
                    "{what} at {host:#x} is shared (refcount {n}); copy-on-write is not supported"
                ),
            )),
        }
    }

    /// Refuses to write guest data over the header or the tables kite
    /// knows, which only a corrupt L2 entry could ask for.
    fn check_not_metadata(&self, host: u64) -> Result<(), BlockError> {
        let cs = self.cluster_size;
        let overlaps = |start: u64, len: u64| host < start.saturating_add(len) && start < host + cs;
        let l1_len = self.l1.len() as u64 * 8;
        let rt_len = self.refcount_table.len() as u64 * 8;
        if overlaps(0, cs)
            || overlaps(self.l1_table_offset, l1_len)
            || overlaps(self.refcount_table_offset, rt_len)
        {
            return Err(self.corrupt(format!(
                "data cluster at {host:#x} overlaps the image's metadata"
            )));
        }
        Ok(())
    }

    /// Writes `data`, which lies within one guest cluster, at `guest`.
    fn write_in_cluster(&mut self, guest: u64, data: &[u8]) -> Result<(), BlockError> {
        let entry = self.l2_entry(guest)?;
        let in_cluster = self.offset_in_cluster(guest);
        let cluster_start = guest - in_cluster;
        let cs = self.cluster_size as usize;
        let new_entry = match self.classify(entry)? {
            Cluster::Data(host) => {
                let copied = entry & OFLAG_COPIED != 0;
                if !copied {
                    self.check_exclusive(host, "data cluster")?;
                }
                self.check_not_metadata(host)?;
                // Make sure the L2 table is writable before touching data.
                self.l2_for_write(guest)?;
                self.file
                    .write_all_at(data, host + in_cluster, "data cluster")?;
                if copied {
                    return Ok(());
                }
                host | OFLAG_COPIED
            }
            Cluster::Zero(Some(host)) => {
                // A preallocated zero cluster: write the whole cluster (zeros
                // around the data) in place, then drop the zero flag.
                self.check_exclusive(host, "data cluster")?;
                self.check_not_metadata(host)?;
                self.l2_for_write(guest)?;
                let mut buf = vec![0u8; cs];
                buf[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
                self.file.write_all_at(&buf, host, "data cluster")?;
                host | OFLAG_COPIED
            }
            kind @ (Cluster::Unallocated | Cluster::Zero(None)) => {
                self.l2_for_write(guest)?;
                let host = self.alloc_cluster()?;
                if data.len() == cs {
                    self.file.write_all_at(data, host, "data cluster")?;
                } else {
                    // The rest of the new cluster keeps what the guest saw
                    // there before: backing file data, or zeros.
                    let mut buf = vec![0u8; cs];
                    if kind == Cluster::Unallocated {
                        self.read_backing(&mut buf, cluster_start)?;
                    }
                    buf[in_cluster as usize..in_cluster as usize + data.len()]
                        .copy_from_slice(data);
                    self.file.write_all_at(&buf, host, "data cluster")?;
                }
                host | OFLAG_COPIED
            }
            Cluster::Compressed => {
                return Err(BlockError::unsupported(
                    self.path(),
                    format!(
                        "writing to compressed clusters is not supported (guest offset {guest:#x})"
                    ),
                ))
            }
        };
        self.set_l2_entry(guest, new_entry)
    }

    /// After an fdatasync (so that data and refcounts are stable first),
    /// writes every dirty L2 range and the dirty part of the L1 table.
    fn write_back_metadata(&mut self) -> Result<(), BlockError> {
        if self.l1_dirty.range().is_none() && !self.l2_cache.any_dirty() {
            return Ok(());
        }
        self.file.sync_data()?;
        for table in self.l2_cache.tables.iter_mut() {
            if let Some(range) = table.dirty.range() {
                let bytes = encode_table(&table.entries[range.clone()]);
                let offset = table.host + range.start as u64 * 8;
                self.file.write_all_at(&bytes, offset, "L2 table")?;
                table.dirty.clear();
            }
        }
        if let Some(range) = self.l1_dirty.range() {
            let bytes = encode_table(&self.l1[range.clone()]);
            let offset = self.l1_table_offset + range.start as u64 * 8;
            self.file.write_all_at(&bytes, offset, "L1 table")?;
            self.l1_dirty.clear();
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.readonly {
            Err(BlockError::ReadOnly {
                path: self.path().to_path_buf(),
            })
        } else {
            Ok(())
        }
    }
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(self.path(), offset, buf.len() as u64, self.size)?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let (source, len) = self.map_run(guest, (buf.len() - pos) as u64)?;
            let chunk = &mut buf[pos..pos + len as usize];
            match source {
                Source::Host(host) => self.file.read_exact_at(chunk, host, "data cluster")?,
                Source::Zeros => chunk.fill(0),
                Source::Backing => self.read_backing(chunk, guest)?,
            }
            pos += len as usize;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(self.path(), offset, buf.len() as u64, self.size)?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let len = (self.cluster_size - self.offset_in_cluster(guest))
                .min((buf.len() - pos) as u64) as usize;
            self.write_in_cluster(guest, &buf[pos..pos + len])?;
            pos += len;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.readonly {
            return Ok(());
        }
        self.write_back_metadata()?;
        self.file.sync_data()
    }

    fn discard(&mut self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        Err(BlockError::unsupported(
            self.path(),
            "discard is not supported on qcow2 images",
        ))
    }

    /// Writes zeros, skipping clusters that already read as zeros
    /// (`may_unmap` is not used: qcow2 clusters are never freed).
    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(self.path(), offset, len, self.size)?;
        let mut zeros = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            let guest = offset + pos;
            let n = (self.cluster_size - self.offset_in_cluster(guest)).min(len - pos);
            let entry = self.l2_entry(guest)?;
            let already_zero = match self.classify(entry)? {
                Cluster::Zero(_) => true,
                Cluster::Unallocated => self.backing.is_none(),
                _ => false,
            };
            if !already_zero {
                zeros.resize(self.cluster_size as usize, 0);
                self.write_in_cluster(guest, &zeros[..n as usize])?;
            }
            pos += n;
        }
        Ok(())
    }

    fn supports_discard(&self) -> bool {
        false
    }
}

impl Drop for Qcow2Image {
    /// Writes back dirty metadata: an image closed without an explicit flush
    /// must still describe everything written to it.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            log::error!("{e}");
        }
    }
}

/// Reads the first cluster (or the whole file, if shorter) and parses it.
fn read_header(file: &ImageFile) -> Result<Header, BlockError> {
    let path = file.path();
    let file_len = file.len();
    // Enough for any header field; then the rest of the first cluster, whose
    // size the header gives, for the extensions and backing file name.
    let mut buf = vec![0u8; file_len.min(4096) as usize];
    file.read_exact_at(&mut buf, 0, "header")?;
    if buf.len() >= 24 {
        let cluster_bits = u32::from_be_bytes([buf[20], buf[21], buf[22], buf[23]]);
        if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            let want = file_len.min(1 << cluster_bits) as usize;
            if want > buf.len() {
                buf = vec![0u8; want];
                file.read_exact_at(&mut buf, 0, "header")?;
            }
        }
    }
    Header::parse(&buf, file_len).map_err(|e| match e {
        HeaderError::Corrupt(reason) => BlockError::corrupt(path, reason),
        HeaderError::Unsupported(reason) => BlockError::unsupported(path, reason),
    })
}

/// Decides whether the header's feature flags allow this open.
fn check_features(header: &Header, path: &Path, readonly: bool) -> Result<(), BlockError> {
    let incompat = header.incompatible_features;
    if incompat & header::INCOMPAT_DIRTY != 0 {
        // Lazy refcounts were not written back: refcounts may be stale and
        // only qemu's repair rebuilds them. Reading needs no refcounts.
        if !readonly {
            return Err(BlockError::unsupported(
                path,
                "image was not closed cleanly (dirty bit set; its refcounts may be stale): \
                 repair it with `qemu-img check -r all` or open it read-only",
            ));
        }
        log::warn!(
            "disk image {}: dirty bit set; reading it anyway (read-only)",
            path.display()
        );
    }
    if incompat & header::INCOMPAT_CORRUPT != 0 {
        if !readonly {
            return Err(BlockError::corrupt(
                path,
                "image is marked corrupt: repair it with `qemu-img check -r all` or open it read-only",
            ));
        }
        log::warn!(
            "disk image {}: image is marked corrupt; reading it anyway (read-only)",
            path.display()
        );
    }
    if header.nb_snapshots != 0 && !readonly {
        return Err(BlockError::unsupported(
            path,
            format!(
                "writing images with internal snapshots ({} found) is not supported; open it read-only",
                header.nb_snapshots
            ),
        ));
    }
    Ok(())
}

/// Reads a table of `entries` big-endian u64s at `offset`. The header
/// checks have already bounded its size by the file's.
fn read_table(
    file: &ImageFile,
    offset: u64,
    entries: usize,
    what: &str,
) -> Result<Vec<u64>, BlockError> {
    let mut bytes = vec![0u8; entries * 8];
    file.read_exact_at(&mut bytes, offset, what)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// Checks that every table entry points at a whole cluster inside the file.
fn validate_table(
    table: &[u64],
    mask: u64,
    cluster_size: u64,
    file_len: u64,
    what: &str,
    path: &Path,
) -> Result<(), BlockError> {
    for (index, &entry) in table.iter().enumerate() {
        let offset = entry & mask;
        if offset == 0 {
            continue;
        }
        if !offset.is_multiple_of(cluster_size) {
            return Err(BlockError::corrupt(
                path,
                format!("{what} offset {offset:#x} (entry {index}) is not aligned to a cluster"),
            ));
        }
        if offset < cluster_size {
            return Err(BlockError::corrupt(
                path,
                format!("{what} (entry {index}) overlaps the header"),
            ));
        }
        if offset
            .checked_add(cluster_size)
            .is_none_or(|end| end > file_len)
        {
            return Err(BlockError::corrupt(
                path,
                format!("{what} at {offset:#x} (entry {index}) lies past the end of the file"),
            ));
        }
    }
    Ok(())
}

fn encode_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Opens the backing file `name` of the image at `path`, read-only.
fn open_backing(
    path: &Path,
    name: &Path,
    header: &Header,
    opts: &OpenOptions,
    chain: &mut Vec<FileId>,
) -> Result<Box<dyn DiskImage>, BlockError> {
    let backing_path: PathBuf = if name.is_absolute() {
        name.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new("")).join(name)
    };
    let format = match header.backing_format.as_deref() {
        None => None,
        Some(f) => Some(ImageFormat::from_name(f).ok_or_else(|| {
            BlockError::unsupported(path, format!("backing file format {f:?} is not supported"))
        })?),
    };
    let backing_opts = OpenOptions {
        readonly: true,
        direct: opts.direct,
        format,
    };
    open_chained(&backing_path, &backing_opts, chain).map_err(|e| BlockError::Backing {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests;
