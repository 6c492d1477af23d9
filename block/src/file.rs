//! Positioned I/O on an image file, with or without `O_DIRECT`.
//!
//! `O_DIRECT` requires the buffer address, the file offset and the length to
//! be aligned to the device's logical block size. Rather than push that onto
//! every caller (qcow2 metadata updates are 2 or 8 bytes), [`ImageFile`] does
//! all direct I/O through a bounce buffer aligned to [`DIRECT_ALIGN`], reading
//! the partial blocks at either end first (read-modify-write). The block size
//! is the file's own (statx `STATX_DIOALIGN`), so that requests aligned to it,
//! as a guest's are when the device advertises it, never need that: a
//! read-modify-write racing another write in flight to the same block could
//! put back stale data. Where the kernel does not say, 4096 covers every
//! logical block size Linux supports for regular filesystems.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{BlockError, FlatFile};

/// Alignment of bounce buffers for `O_DIRECT` I/O, and of offsets and
/// lengths where the file's own block size is unknown.
pub(crate) const DIRECT_ALIGN: u64 = 4096;

/// The smallest block size: a disk sector.
const SECTOR: u64 = 512;

/// Largest bounce buffer used for one direct I/O; bigger requests are split.
const DIRECT_CHUNK: u64 = 1 << 20;

/// A heap buffer whose usable part starts on a [`DIRECT_ALIGN`] boundary.
/// Over-allocating a `Vec` and skipping to the boundary needs no `unsafe`.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let align = DIRECT_ALIGN as usize;
        let storage = vec![0u8; len + align];
        let start = (storage.as_ptr() as usize).wrapping_neg() % align;
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Rounds down to `align`, a power of two.
fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}

/// Rounds up to `align`, a power of two; callers only pass offsets of real
/// files, far below `u64::MAX`, but saturate rather than overflow all the same.
fn align_up(x: u64, align: u64) -> u64 {
    x.saturating_add(align - 1) & !(align - 1)
}

/// The offset and length alignment `O_DIRECT` needs on `file`, as the kernel
/// reports it, or [`DIRECT_ALIGN`] when it does not (or reports something
/// outside 512..=4096, which the bounce buffers are not made for).
fn direct_block_size(file: &File) -> u64 {
    // SAFETY: statx is all-integer plain data; all zeros is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated string, empty as
    // AT_EMPTY_PATH asks for to query the fd itself, and `stx` is a valid
    // statx buffer that outlives the call.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let align = u64::from(stx.stx_dio_offset_align);
    if ret == 0
        && stx.stx_mask & libc::STATX_DIOALIGN != 0
        && align.is_power_of_two()
        && (SECTOR..=DIRECT_ALIGN).contains(&align)
    {
        align
    } else {
        DIRECT_ALIGN
    }
}

/// The end of a direct I/O request, refused (like pread/pwrite would) if it
/// goes past the largest file offset, which also keeps the alignment
/// arithmetic below from overflowing.
fn direct_end(offset: u64, len: usize) -> io::Result<u64> {
    offset
        .checked_add(len as u64)
        .filter(|&end| end <= i64::MAX as u64 - DIRECT_CHUNK)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns
/// the number of bytes read.
fn read_until_eof(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads the start of a file whether or not it was opened `O_DIRECT`, for
/// format probing. Returns how many bytes were read (less at end of file).
pub(crate) fn read_prefix(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut bounce = AlignedBuf::new(align_up(buf.len() as u64, DIRECT_ALIGN) as usize);
    let n = read_until_eof(file, bounce.as_mut_slice(), 0)?.min(buf.len());
    buf[..n].copy_from_slice(&bounce.as_slice()[..n]);
    Ok(n)
}

/// Clears `O_NONBLOCK`, which [`crate::open_file`] only sets to open safely.
pub(crate) fn clear_nonblock(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a file descriptor we own takes no pointer argument
    // and only returns the status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        // SAFETY: F_SETFL with an integer flag argument on a descriptor we
        // own; it only changes that descriptor's status flags.
        let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An image file and how to do I/O on it. Errors come back as [`BlockError`]
/// naming the file and what was being accessed.
pub(crate) struct ImageFile {
    file: File,
    path: PathBuf,
    direct: bool,
    /// What offsets and lengths of direct I/O must be aligned to (a sector
    /// when not direct).
    block_size: u64,
    /// The file's length as far as this process knows: needed so that a
    /// direct write whose last aligned block reaches past the end of the file
    /// can cut the file back to where the write really ended.
    len: u64,
}

impl ImageFile {
    /// Wraps `file`, finding its length by seeking to the end (which, unlike
    /// `metadata().len()`, also works for block devices).
    pub(crate) fn new(file: File, path: &Path, direct: bool) -> Result<Self, BlockError> {
        use std::io::{Seek, SeekFrom};
        let len = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| BlockError::io(path, "cannot find the file size", e))?;
        let block_size = if direct {
            direct_block_size(&file)
        } else {
            SECTOR
        };
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            direct,
            block_size,
            len,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn flat(&self) -> FlatFile {
        FlatFile {
            fd: self.file.as_raw_fd(),
            direct: self.direct,
            block_size: self.block_size,
        }
    }

    /// The smallest I/O that needs no read-modify-write.
    pub(crate) fn block_size(&self) -> u64 {
        self.block_size
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Reads exactly `buf.len()` bytes at `offset`. `what` names the data for
    /// error messages; reading past the end of the file is reported as
    /// corruption, since every caller expects the bytes to exist.
    pub(crate) fn read_exact_at(
        &self,
        buf: &mut [u8],
        offset: u64,
        what: &str,
    ) -> Result<(), BlockError> {
        let result = if self.direct {
            self.read_direct(buf, offset)
        } else {
            self.file.read_exact_at(buf, offset)
        };
        result.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                BlockError::corrupt(
                    &self.path,
                    format!(
                        "{what} at offset {offset:#x} ({} bytes) lies past the end of the file",
                        buf.len()
                    ),
                )
            } else {
                BlockError::io(
                    &self.path,
                    format!("reading {what} at offset {offset:#x}"),
                    e,
                )
            }
        })
    }

    /// Writes all of `buf` at `offset`, extending the file if needed.
    pub(crate) fn write_all_at(
        &mut self,
        buf: &[u8],
        offset: u64,
        what: &str,
    ) -> Result<(), BlockError> {
        let result = if self.direct {
            self.write_direct(buf, offset)
        } else {
            self.file.write_all_at(buf, offset)
        };
        result.map_err(|e| {
            BlockError::io(
                &self.path,
                format!("writing {what} at offset {offset:#x}"),
                e,
            )
        })?;
        self.len = self.len.max(offset.saturating_add(buf.len() as u64));
        Ok(())
    }

    /// fdatasync: the data and the metadata needed to read it back (such as
    /// the file size) reach stable storage.
    pub(crate) fn sync_data(&self) -> Result<(), BlockError> {
        self.file
            .sync_data()
            .map_err(|e| BlockError::io(&self.path, "fdatasync", e))
    }

    /// Calls fallocate(2) with `mode` on the range, returning the raw error so
    /// that callers can fall back when the filesystem lacks the mode.
    pub(crate) fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: fallocate only reads its integer arguments and acts on
            // the file descriptor we own; no memory is shared with the kernel.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = direct_end(offset, buf.len())?;
        let bs = self.block_size;
        let mut pos = offset;
        while pos < end {
            let a_start = align_down(pos, bs);
            let chunk_end = end.min(a_start + DIRECT_CHUNK);
            let a_end = align_up(chunk_end, bs);
            let mut bounce = AlignedBuf::new((a_end - a_start) as usize);
            let n = read_until_eof(&self.file, bounce.as_mut_slice(), a_start)? as u64;
            if a_start + n < chunk_end {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let src = &bounce.as_slice()[(pos - a_start) as usize..(chunk_end - a_start) as usize];
            buf[(pos - offset) as usize..(chunk_end - offset) as usize].copy_from_slice(src);
            pos = chunk_end;
        }
        Ok(())
    }

    fn write_direct(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = direct_end(offset, buf.len())?;
        let bs = self.block_size;
        let mut pos = offset;
        while pos < end {
            let a_start = align_down(pos, bs);
            let chunk_end = end.min(a_start + DIRECT_CHUNK);
            let a_end = align_up(chunk_end, bs);
            let mut bounce = AlignedBuf::new((a_end - a_start) as usize);
            let block = bs as usize;
            let bounce_len = bounce.len;
            // Read-modify-write of the partial blocks at either end; beyond
            // the end of the file they stay zero.
            if pos != a_start {
                read_until_eof(&self.file, &mut bounce.as_mut_slice()[..block], a_start)?;
            }
            if chunk_end != a_end && (a_end - a_start > bs || pos == a_start) {
                let tail = &mut bounce.as_mut_slice()[bounce_len - block..];
                read_until_eof(&self.file, tail, a_end - bs)?;
            }
            bounce.as_mut_slice()[(pos - a_start) as usize..(chunk_end - a_start) as usize]
                .copy_from_slice(&buf[(pos - offset) as usize..(chunk_end - offset) as usize]);
            self.file.write_all_at(bounce.as_slice(), a_start)?;
            // The aligned write may have grown the file past both its old end
            // and the end of this write; cut it back so the size stays right.
            let new_len = self.len.max(chunk_end);
            if a_end > new_len {
                self.file.set_len(new_len)?;
            }
            self.len = new_len;
            pos = chunk_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn direct_block_size_is_one_the_kernel_accepts() {
        let dir = TempDir::new();
        let path = dir.path().join("disk.raw");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let plain = ImageFile::new(File::open(&path).unwrap(), &path, false).unwrap();
        assert_eq!(plain.block_size(), SECTOR);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        let direct = ImageFile::new(file, &path, true).unwrap();
        let bs = direct.block_size();
        assert!(bs.is_power_of_two() && (SECTOR..=DIRECT_ALIGN).contains(&bs));
        assert_eq!(direct.flat().block_size, bs);
        // One block at a block-aligned offset goes straight to the kernel.
        let mut buf = AlignedBuf::new(bs as usize);
        let n = direct.file.read_at(buf.as_mut_slice(), bs).unwrap();
        assert_eq!(n as u64, bs);
    }
}
