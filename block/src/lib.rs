//! kite's disk images.
//!
//! A virtio-blk device sees every image through [`DiskImage`]: a flat array
//! of bytes with read, write, flush, discard and write-zeroes. Two formats are
//! behind it:
//!
//! * [`raw::RawImage`]: the file (or block device) is the disk, byte for byte.
//! * [`qcow2::Qcow2Image`]: qcow2 versions 2 and 3, read and write, with
//!   backing files (raw or qcow2, opened read-only).
//!
//! [`open_image`] opens a path, takes an OFD lock on it (exclusive for
//! read-write, shared for read-only) so that two VMs can never write one
//! image, and picks the format — from [`OpenOptions::format`] when the caller
//! knows it, else by probing for the qcow2 magic.
//!
//! Probing has a known hazard: a guest that owns a raw image can write a
//! qcow2 header into its first sector, and the next open would then treat the
//! image as qcow2 and follow whatever backing file that header names. Callers
//! that know an image is raw should say so with `format: Some(ImageFormat::Raw)`.

mod file;
pub mod lock;
pub mod qcow2;
pub mod raw;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use lock::LockKind;
pub use qcow2::Qcow2Image;
pub use raw::RawImage;

/// How deep a chain of backing files may go before it is refused. It bounds
/// the work a hostile image can cause and stops loops that the device/inode
/// check cannot see (none should exist, but the limit costs nothing).
pub const MAX_BACKING_DEPTH: usize = 8;

/// An open disk image. Offsets and lengths are in bytes; the device checks
/// requests against [`size`](DiskImage::size) before calling, and the image
/// checks again (returning [`BlockError::OutOfRange`]) rather than trusting it.
pub trait DiskImage: Send {
    /// The virtual disk size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from the disk at `offset`. Areas never written read as
    /// zeros, or from the backing file when there is one.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError>;

    /// Writes `buf` to the disk at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError>;

    /// Returns once everything written so far, data and metadata, is on
    /// stable storage. Until then a write may be lost in a crash (the image
    /// stays consistent: at worst it leaks clusters), like a disk with a
    /// volatile write cache; a device whose guest does not negotiate
    /// VIRTIO_BLK_F_FLUSH must call this after every write.
    fn flush(&mut self) -> Result<(), BlockError>;

    /// Tells the image the range is no longer needed. Raw images punch a hole
    /// (the range then reads as zeros); formats that cannot discard return
    /// [`BlockError::Unsupported`] — see [`supports_discard`](DiskImage::supports_discard).
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError>;

    /// Makes the range read as zeros. `may_unmap` allows freeing the space
    /// (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError>;

    /// Whether [`discard`](DiskImage::discard) does anything, so the device
    /// knows whether to offer VIRTIO_BLK_F_DISCARD.
    fn supports_discard(&self) -> bool;

    /// The file behind an image whose disk offsets are file offsets (raw),
    /// so that a device can move data between guest memory and the file
    /// itself, many requests at a time. `None` for formats that map offsets
    /// (qcow2): their reads and writes must go through this trait.
    fn flat_file(&self) -> Option<FlatFile> {
        None
    }

    /// The logical block size to advertise to the guest: requests aligned to
    /// it are served without read-modify-write, which would be unsafe while
    /// other requests are in flight on a [`flat_file`](DiskImage::flat_file).
    fn block_size(&self) -> u64 {
        512
    }
}

/// See [`DiskImage::flat_file`]. The fd stays open as long as the image.
#[derive(Clone, Copy, Debug)]
pub struct FlatFile {
    pub fd: RawFd,
    /// Opened with `O_DIRECT`: buffers, offsets and lengths must be aligned
    /// to the device's logical block size, or the kernel says `EINVAL`.
    pub direct: bool,
    /// That block size (512 when not direct).
    pub block_size: u64,
}

/// The formats kite can open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// Parses a format name as qemu spells it (the qcow2 backing-format
    /// header extension uses these names).
    pub fn from_name(name: &str) -> Option<ImageFormat> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// How to open an image. Build it with `..Default::default()` so that new
/// fields do not break callers.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Open `O_RDONLY` with a shared lock; every write then fails with
    /// [`BlockError::ReadOnly`].
    pub readonly: bool,
    /// Open with `O_DIRECT`, bypassing the host page cache. All I/O then goes
    /// through a 4096-byte-aligned bounce buffer, so any offset and length
    /// work: partial blocks are read, modified and written back.
    pub direct: bool,
    /// The image's format if the caller knows it; `None` probes for the
    /// qcow2 magic (see the crate docs for why naming it is safer).
    pub format: Option<ImageFormat>,
}

/// Everything that can go wrong with a disk image. Each message names the
/// file and the problem, as it will be shown to the user.
#[derive(Debug, Error)]
pub enum BlockError {
    /// An I/O error from the host, with what kite was doing at the time.
    #[error("disk image {}: {context}: {source}", path.display())]
    Io {
        path: PathBuf,
        context: String,
        #[source]
        source: io::Error,
    },
    /// Another open file description (normally another kite process) holds a
    /// conflicting lock.
    #[error("disk image {} is locked by another process (is another VM using it?)", path.display())]
    Locked { path: PathBuf },
    /// The image is damaged or not what its format says; it is refused.
    #[error("disk image {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// The image uses a feature kite does not implement, or the operation is
    /// not possible on this kind of image.
    #[error("disk image {}: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    /// A write, discard or write-zeroes on an image opened read-only.
    #[error("disk image {} is open read-only", path.display())]
    ReadOnly { path: PathBuf },
    /// A request outside the disk.
    #[error(
        "disk image {}: request of {len} bytes at offset {offset} is outside the {size}-byte disk",
        path.display()
    )]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// The backing file named by an image could not be opened.
    #[error("disk image {}: cannot open backing file: {source}", path.display())]
    Backing {
        path: PathBuf,
        #[source]
        source: Box<BlockError>,
    },
}

impl BlockError {
    pub(crate) fn io(path: &Path, context: impl Into<String>, source: io::Error) -> Self {
        BlockError::Io {
            path: path.to_path_buf(),
            context: context.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        BlockError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, reason: impl Into<String>) -> Self {
        BlockError::Unsupported {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes.
pub(crate) fn check_range(path: &Path, offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}

/// Opens `path`, detects its format (unless `opts.format` names it), locks
/// it, and for qcow2 opens its backing chain read-only.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Box<dyn DiskImage>, BlockError> {
    open_chained(path, opts, &mut Vec::new())
}

/// Reports the format of the image at `path` by its magic, without locking it.
pub fn image_format(path: &Path) -> Result<ImageFormat, BlockError> {
    let opts = OpenOptions {
        readonly: true,
        ..Default::default()
    };
    probe_format(&open_file(path, &opts)?, path)
}

/// Identity of an open file, to recognize a backing chain that loops back on
/// itself whatever paths (symlinks, hard links, `..`) it goes through.
pub(crate) type FileId = (u64, u64);

/// Opens one image of a backing chain. `chain` holds the identities of the
/// images above it.
pub(crate) fn open_chained(
    path: &Path,
    opts: &OpenOptions,
    chain: &mut Vec<FileId>,
) -> Result<Box<dyn DiskImage>, BlockError> {
    if chain.len() > MAX_BACKING_DEPTH {
        return Err(BlockError::unsupported(
            path,
            format!("backing file chain is deeper than {MAX_BACKING_DEPTH} images"),
        ));
    }
    let file = open_file(path, opts)?;
    let meta = file
        .metadata()
        .map_err(|e| BlockError::io(path, "cannot stat", e))?;
    let id = (meta.dev(), meta.ino());
    if chain.contains(&id) {
        return Err(BlockError::corrupt(
            path,
            "backing file chain loops back to an image already in the chain",
        ));
    }
    let kind = if opts.readonly {
        LockKind::Shared
    } else {
        LockKind::Exclusive
    };
    lock::lock_file(&file, kind).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => BlockError::Locked {
            path: path.to_path_buf(),
        },
        _ => BlockError::io(path, "cannot lock", e),
    })?;
    let format = match opts.format {
        Some(format) => format,
        None => probe_format(&file, path)?,
    };
    chain.push(id);
    match format {
        ImageFormat::Raw => Ok(Box::new(RawImage::from_file(file, path, opts)?)),
        ImageFormat::Qcow2 => Ok(Box::new(Qcow2Image::open_chained(file, path, opts, chain)?)),
    }
}

/// Opens the file itself: `O_RDONLY` or `O_RDWR`, `O_DIRECT` if asked, and
/// refuses anything but a regular file or block device. `O_NONBLOCK` keeps the
/// open from hanging on a FIFO that a hostile backing-file name points at; it
/// is cleared again once the type is known.
fn open_file(path: &Path, opts: &OpenOptions) -> Result<File, BlockError> {
    let mut flags = libc::O_NONBLOCK;
    if opts.direct {
        flags |= libc::O_DIRECT;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!opts.readonly)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| BlockError::io(path, "cannot open", e))?;
    let file_type = file
        .metadata()
        .map_err(|e| BlockError::io(path, "cannot stat", e))?
        .file_type();
    if !file_type.is_file() && !file_type.is_block_device() {
        return Err(BlockError::unsupported(
            path,
            "not a regular file or block device",
        ));
    }
    file::clear_nonblock(&file).map_err(|e| BlockError::io(path, "cannot clear O_NONBLOCK", e))?;
    Ok(file)
}

/// Looks for the qcow2 magic at the start of the file; anything else is raw.
fn probe_format(file: &File, path: &Path) -> Result<ImageFormat, BlockError> {
    let mut magic = [0u8; 4];
    let n = file::read_prefix(file, &mut magic)
        .map_err(|e| BlockError::io(path, "reading the format magic", e))?;
    if n == magic.len() && magic == qcow2::MAGIC {
        Ok(ImageFormat::Qcow2)
    } else {
        Ok(ImageFormat::Raw)
    }
}

#[cfg(test)]
mod testutil;
