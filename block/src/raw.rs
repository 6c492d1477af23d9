//! Raw images: the file (or block device) is the disk, byte for byte.

use std::fs::File;
use std::io;
use std::path::Path;

use crate::file::ImageFile;
use crate::{check_range, BlockError, DiskImage, FlatFile, OpenOptions};

/// Largest buffer of zeros written at once when write-zeroes has to fall back
/// to plain writes.
const ZERO_CHUNK: u64 = 1 << 20;

/// A raw disk image. Its size is the file's size when opened; the device
/// never writes past it, so it never changes.
pub struct RawImage {
    file: ImageFile,
    size: u64,
    readonly: bool,
}

impl RawImage {
    /// Wraps an already opened (and, if wanted, locked) file. `opts.direct`
    /// must say whether `file` was opened with `O_DIRECT`.
    pub fn from_file(file: File, path: &Path, opts: &OpenOptions) -> Result<Self, BlockError> {
        let file = ImageFile::new(file, path, opts.direct)?;
        Ok(RawImage {
            size: file.len(),
            file,
            readonly: opts.readonly,
        })
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.readonly {
            Err(BlockError::ReadOnly {
                path: self.file.path().to_path_buf(),
            })
        } else {
            Ok(())
        }
    }

    fn write_zeroes_by_writing(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            self.file
                .write_all_at(&zeros[..n as usize], offset + done, "zeros")?;
            done += n;
        }
        Ok(())
    }
}

/// Whether an fallocate error means "this file or filesystem cannot do that
/// mode" (so a fallback is in order) rather than a real I/O failure.
fn unsupported_mode(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(self.file.path(), offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset, "data")
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(self.file.path(), offset, buf.len() as u64, self.size)?;
        self.file.write_all_at(buf, offset, "data")
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Punches a hole, giving the space back to the host filesystem. Discard
    /// is only a hint, so a filesystem that cannot punch holes is not an
    /// error: the data simply stays.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(self.file.path(), offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.file.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if unsupported_mode(&e) => {
                log::debug!(
                    "disk image {}: cannot punch holes ({e}); ignoring discard",
                    self.file.path().display()
                );
                Ok(())
            }
            Err(e) => Err(BlockError::io(
                self.file.path(),
                format!("punching a hole at offset {offset:#x}, {len} bytes"),
                e,
            )),
        }
    }

    /// Tries, in order: punching a hole (only if `may_unmap`), zeroing the
    /// range in the filesystem (`FALLOC_FL_ZERO_RANGE`), and writing zeros.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(self.file.path(), offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let mut modes = Vec::with_capacity(2);
        if may_unmap {
            modes.push(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
        }
        modes.push(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE);
        for mode in modes {
            match self.file.fallocate(mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported_mode(&e) => continue,
                Err(e) => {
                    return Err(BlockError::io(
                        self.file.path(),
                        format!("zeroing offset {offset:#x}, {len} bytes"),
                        e,
                    ))
                }
            }
        }
        self.write_zeroes_by_writing(offset, len)
    }

    fn supports_discard(&self) -> bool {
        !self.readonly
    }

    fn flat_file(&self) -> Option<FlatFile> {
        Some(self.file.flat())
    }

    fn block_size(&self) -> u64 {
        self.file.block_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{pattern, TempDir};
    use crate::{open_image, ImageFormat};
    use std::os::unix::fs::MetadataExt;

    fn rw() -> OpenOptions {
        OpenOptions::default()
    }

    fn make_raw(dir: &TempDir, name: &str, size: u64) -> std::path::PathBuf {
        let path = dir.path().join(name);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    #[test]
    fn read_write_flush_round_trip() {
        let dir = TempDir::new();
        let path = make_raw(&dir, "disk.raw", 4 << 20);
        let mut img = open_image(&path, &rw()).unwrap();
        assert_eq!(img.size(), 4 << 20);
        let data = pattern(10_000, 7);
        img.write_at(&data, 12_345).unwrap();
        img.write_at(&data[..100], (4 << 20) - 100).unwrap();
        img.flush().unwrap();
        let mut back = vec![0u8; 10_000];
        img.read_at(&mut back, 12_345).unwrap();
        assert_eq!(back, data);
        let mut zeros = vec![1u8; 4096];
        img.read_at(&mut zeros, 1 << 20).unwrap();
        assert!(zeros.iter().all(|&b| b == 0));
        drop(img);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[12_345..22_345], &data[..]);
        assert_eq!(&on_disk[(4 << 20) - 100..], &data[..100]);
        assert_eq!(on_disk.len(), 4 << 20);
    }

    #[test]
    fn out_of_range_requests_are_refused() {
        let dir = TempDir::new();
        let path = make_raw(&dir, "disk.raw", 1 << 20);
        let mut img = open_image(&path, &rw()).unwrap();
        let mut buf = [0u8; 512];
        assert!(matches!(
            img.read_at(&mut buf, (1 << 20) - 256),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.write_at(&buf, u64::MAX - 10),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.discard(u64::MAX, 2),
            Err(BlockError::OutOfRange { .. })
        ));
    }

    #[test]
    fn discard_punches_a_hole() {
        let dir = TempDir::new();
        let path = make_raw(&dir, "disk.raw", 4 << 20);
        let mut img = open_image(&path, &rw()).unwrap();
        assert!(img.supports_discard());
        let data = pattern(4 << 20, 3);
        img.write_at(&data, 0).unwrap();
        img.flush().unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks();
        img.discard(1 << 20, 1 << 20).unwrap();
        img.flush().unwrap();
        let after = std::fs::metadata(&path).unwrap().blocks();
        // st_blocks counts 512-byte units: 1 MiB is 2048 of them.
        assert!(
            before >= after + 2048,
            "st_blocks went from {before} to {after}"
        );
        let mut back = vec![0xffu8; 4 << 20];
        img.read_at(&mut back, 0).unwrap();
        assert_eq!(&back[..1 << 20], &data[..1 << 20]);
        assert!(back[1 << 20..2 << 20].iter().all(|&b| b == 0));
        assert_eq!(&back[2 << 20..], &data[2 << 20..]);
    }

    #[test]
    fn write_zeroes_with_and_without_unmap() {
        let dir = TempDir::new();
        let path = make_raw(&dir, "disk.raw", 1 << 20);
        let mut img = open_image(&path, &rw()).unwrap();
        let data = pattern(1 << 20, 5);
        img.write_at(&data, 0).unwrap();
        img.write_zeroes(1000, 70_000, false).unwrap();
        img.write_zeroes(200_001, 131_072, true).unwrap();
        let mut expected = data.clone();
        expected[1000..71_000].fill(0);
        expected[200_001..331_073].fill(0);
        let mut back = vec![0u8; 1 << 20];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == expected);
        // The fallback path, used when fallocate cannot zero.
        let mut raw = RawImage::from_file(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap(),
            &path,
            &rw(),
        )
        .unwrap();
        drop(img);
        raw.write_zeroes_by_writing(500_000, 3 << 16)
            .unwrap_or_else(|e| panic!("{e}"));
        raw.read_at(&mut back, 0).unwrap();
        expected[500_000..500_000 + (3 << 16)].fill(0);
        assert!(back == expected);
    }

    #[test]
    fn readonly_refuses_writes() {
        let dir = TempDir::new();
        let path = make_raw(&dir, "disk.raw", 1 << 20);
        std::fs::write(&path, pattern(1 << 20, 9)).unwrap();
        let opts = OpenOptions {
            readonly: true,
            ..Default::default()
        };
        let mut img = open_image(&path, &opts).unwrap();
        assert!(!img.supports_discard());
        let err = img.write_at(&[1, 2, 3], 0).unwrap_err();
        assert!(matches!(err, BlockError::ReadOnly { .. }), "{err}");
        assert!(err.to_string().contains("read-only"), "{err}");
        assert!(matches!(
            img.discard(0, 4096),
            Err(BlockError::ReadOnly { .. })
        ));
        assert!(matches!(
            img.write_zeroes(0, 4096, true),
            Err(BlockError::ReadOnly { .. })
        ));
        img.flush().unwrap();
        let mut back = vec![0u8; 1 << 20];
        img.read_at(&mut back, 0).unwrap();
        assert_eq!(back, pattern(1 << 20, 9));
    }

    #[test]
    fn locking_conflicts() {
        let dir = TempDir::new();
        let path = make_raw(&dir, "disk.raw", 1 << 20);
        let ro = OpenOptions {
            readonly: true,
            ..Default::default()
        };
        let first = open_image(&path, &rw()).unwrap();
        let err = open_image(&path, &rw())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, BlockError::Locked { .. }), "{err}");
        assert!(
            err.to_string().contains("is locked by another process"),
            "{err}"
        );
        assert!(matches!(
            open_image(&path, &ro),
            Err(BlockError::Locked { .. })
        ));
        drop(first);
        let r1 = open_image(&path, &ro).unwrap();
        let r2 = open_image(&path, &ro).unwrap();
        assert!(matches!(
            open_image(&path, &rw()),
            Err(BlockError::Locked { .. })
        ));
        drop((r1, r2));
        open_image(&path, &rw()).unwrap();
    }

    #[test]
    fn direct_io_round_trip_with_unaligned_requests() {
        let dir = TempDir::new();
        // A size that is a multiple of 512 but not of the 4096 alignment, so
        // the last aligned block sticks out past the end of the file.
        let size = (1 << 20) + 512;
        let path = make_raw(&dir, "disk.raw", size);
        let opts = OpenOptions {
            direct: true,
            format: Some(ImageFormat::Raw),
            ..Default::default()
        };
        let mut img = open_image(&path, &opts).unwrap();
        let mut model = vec![0u8; size as usize];
        let writes: [(u64, usize); 6] = [
            (0, 4096),
            (1000, 5000),
            (8192, 3 << 20 >> 2),
            (77_777, 1),
            (size - 700, 700),
            (size - 5000, 1234),
        ];
        for (i, &(off, len)) in writes.iter().enumerate() {
            let data = pattern(len, i as u64 + 1);
            img.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        img.flush().unwrap();
        for &(off, len) in &[(0u64, size as usize), (999, 5002), (size - 1, 1), (4095, 2)] {
            let mut back = vec![0u8; len];
            img.read_at(&mut back, off).unwrap();
            assert!(back[..] == model[off as usize..off as usize + len]);
        }
        img.write_zeroes(3000, 10_000, false).unwrap();
        model[3000..13_000].fill(0);
        drop(img);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(
            on_disk.len() as u64,
            size,
            "direct writes changed the file size"
        );
        assert!(on_disk == model);
    }
}
