//! Image locking with open file description (OFD) locks.
//!
//! Two VMs writing one image corrupt it, so an image opened read-write is
//! locked exclusively and one opened read-only (including every backing file)
//! is locked shared. OFD locks (`F_OFD_SETLK`) rather than classic POSIX
//! `F_SETLK` locks because:
//!
//! * they belong to the open file description, not the process, so closing
//!   some other descriptor of the same file does not silently drop them, and
//! * they conflict between two opens of the same file even inside one
//!   process — a VM that names one image twice is refused too.
//!
//! The lock is released when the file is closed. The whole file is locked,
//! which also conflicts with the byte-range locks qemu takes, so qemu-img
//! will not modify an image a running kite VM holds either.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Which lock to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Many readers, no writer: for read-only images and backing files.
    Shared,
    /// One writer, no one else.
    Exclusive,
}

/// Locks the whole of `file` without waiting. A conflicting lock held through
/// another open file description fails with [`io::ErrorKind::WouldBlock`].
pub fn lock_file(file: &File, kind: LockKind) -> io::Result<()> {
    set_lock(file, kind_to_type(kind))
}

/// Releases the lock early; closing the file does the same.
pub fn unlock_file(file: &File) -> io::Result<()> {
    set_lock(file, libc::F_UNLCK as libc::c_short)
}

fn kind_to_type(kind: LockKind) -> libc::c_short {
    match kind {
        LockKind::Shared => libc::F_RDLCK as libc::c_short,
        LockKind::Exclusive => libc::F_WRLCK as libc::c_short,
    }
}

fn set_lock(file: &File, l_type: libc::c_short) -> io::Result<()> {
    // SAFETY: `flock` is a plain C struct of integers for which all-zero is a
    // valid value; the fields that matter are set below. l_start = 0 with
    // l_len = 0 means the whole file, however it grows; l_pid must be 0 for
    // OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    fl.l_pid = 0;
    loop {
        // SAFETY: F_OFD_SETLK reads the flock struct we pass by pointer, which
        // lives for the duration of the call, and acts on a descriptor we own.
        let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // POSIX lets a conflict be reported as either.
            Some(libc::EAGAIN) | Some(libc::EACCES) => {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, err))
            }
            _ => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn open_rw(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    #[test]
    fn ofd_locks_conflict_within_one_process() {
        let dir = TempDir::new();
        let path = dir.path().join("img");
        let a = open_rw(&path);
        let b = open_rw(&path);
        lock_file(&a, LockKind::Exclusive).unwrap();
        let err = lock_file(&b, LockKind::Exclusive).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let err = lock_file(&b, LockKind::Shared).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // Closing the holder releases it.
        drop(a);
        lock_file(&b, LockKind::Exclusive).unwrap();
    }

    #[test]
    fn shared_locks_coexist_and_block_exclusive() {
        let dir = TempDir::new();
        let path = dir.path().join("img");
        let a = open_rw(&path);
        let b = open_rw(&path);
        let c = open_rw(&path);
        lock_file(&a, LockKind::Shared).unwrap();
        lock_file(&b, LockKind::Shared).unwrap();
        assert!(lock_file(&c, LockKind::Exclusive).is_err());
        unlock_file(&a).unwrap();
        unlock_file(&b).unwrap();
        lock_file(&c, LockKind::Exclusive).unwrap();
    }
}
