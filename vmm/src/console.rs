//! The host side of the guest's consoles (COM1 and virtio-console): where
//! their output goes (stdout, a file, nowhere) and, in tty mode, stdin in raw
//! mode as their input.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use api::config::{ConsoleConfig, ConsoleMode};
use devices::serial::SerialOutput;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot open serial output file {path}: {source}")]
    OpenFile { path: PathBuf, source: io::Error },
    #[error("console mode File needs a file path")]
    NoFile,
    #[error("console mode {0:?} is not supported")]
    Unsupported(ConsoleMode),
}

/// Where a console writes. The file is opened once per created VM so that a
/// guest reboot appends to the same output.
pub enum ConsoleSink {
    /// No device at all.
    Off,
    /// A device whose output is discarded.
    Null,
    Stdout,
    File(File),
}

impl ConsoleSink {
    /// What [`ConsoleSink::open`] would refuse, found without creating the
    /// file: an unsupported mode, a File without a path or in a directory
    /// that does not exist.
    pub fn check(config: &ConsoleConfig) -> Result<(), ConsoleError> {
        match config.mode {
            ConsoleMode::Off | ConsoleMode::Null | ConsoleMode::Tty => Ok(()),
            ConsoleMode::File => {
                let path = config.file.as_deref().ok_or(ConsoleError::NoFile)?;
                let dir = match path.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() => dir,
                    _ => Path::new("."),
                };
                match std::fs::metadata(dir) {
                    Ok(meta) if meta.is_dir() => Ok(()),
                    Ok(_) => Err(io::Error::from(io::ErrorKind::NotADirectory)),
                    Err(e) => Err(e),
                }
                .map_err(|source| ConsoleError::OpenFile {
                    path: path.to_path_buf(),
                    source,
                })
            }
            other => Err(ConsoleError::Unsupported(other)),
        }
    }

    pub fn open(config: &ConsoleConfig) -> Result<ConsoleSink, ConsoleError> {
        Ok(match config.mode {
            ConsoleMode::Off => ConsoleSink::Off,
            ConsoleMode::Null => ConsoleSink::Null,
            ConsoleMode::Tty => ConsoleSink::Stdout,
            ConsoleMode::File => {
                let path = config.file.as_deref().ok_or(ConsoleError::NoFile)?;
                ConsoleSink::File(create(path)?)
            }
            other => return Err(ConsoleError::Unsupported(other)),
        })
    }

    /// A writer for a new VM's device, or None when the device is off.
    pub fn writer(&self) -> io::Result<Option<SerialOutput>> {
        Ok(match self {
            ConsoleSink::Off => None,
            ConsoleSink::Null => Some(Box::new(io::sink())),
            ConsoleSink::Stdout => Some(Box::new(Stdout)),
            ConsoleSink::File(f) => Some(Box::new(f.try_clone()?)),
        })
    }

    pub fn reads_stdin(&self) -> bool {
        matches!(self, ConsoleSink::Stdout)
    }

    /// The device's input: a duplicate of stdin in tty mode.
    pub fn input(&self) -> io::Result<Option<File>> {
        if !self.reads_stdin() {
            return Ok(None);
        }
        let fd = io::stdin().as_fd().try_clone_to_owned()?;
        Ok(Some(File::from(fd)))
    }
}

/// The host ends of both guest consoles.
pub struct Consoles {
    pub serial: ConsoleSink,
    pub virtio: ConsoleSink,
}

impl Consoles {
    /// Checks both consoles' configs; see [`ConsoleSink::check`].
    pub fn check(serial: &ConsoleConfig, virtio: &ConsoleConfig) -> Result<(), ConsoleError> {
        ConsoleSink::check(serial)?;
        ConsoleSink::check(virtio)
    }

    /// Opens both consoles, emptying their output files: done once per
    /// created VM, by its first build.
    pub fn open(serial: &ConsoleConfig, virtio: &ConsoleConfig) -> Result<Consoles, ConsoleError> {
        Ok(Consoles {
            serial: ConsoleSink::open(serial)?,
            virtio: ConsoleSink::open(virtio)?,
        })
    }
}

fn create(path: &Path) -> Result<File, ConsoleError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| ConsoleError::OpenFile {
            path: path.to_path_buf(),
            source,
        })
}

/// Unbuffered stdout: a prompt without a newline must show at once.
struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// Puts stdin in raw mode while alive (only if it is a terminal), so keys
/// reach the guest one by one, and restores it when dropped.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    pub fn enable() -> Option<RawTerminal> {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so the host's newlines stay sane.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: valid fd and termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enable` on the same fd.
        unsafe { libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> ConsoleConfig {
        ConsoleConfig {
            mode: ConsoleMode::File,
            file: Some(path.into()),
        }
    }

    #[test]
    fn check_creates_nothing_and_refuses_what_open_would() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let log = dir.as_path().join("serial.log");
        assert!(ConsoleSink::check(&file(log.to_str().unwrap())).is_ok());
        assert!(!log.exists(), "check created the file");
        // A bare file name lives in the current directory.
        assert!(ConsoleSink::check(&file("serial.log")).is_ok());
        let nowhere = dir.as_path().join("no-such-dir/serial.log");
        let err = ConsoleSink::check(&file(nowhere.to_str().unwrap())).unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        let no_path = ConsoleConfig {
            mode: ConsoleMode::File,
            file: None,
        };
        assert!(matches!(
            ConsoleSink::check(&no_path),
            Err(ConsoleError::NoFile)
        ));
        for mode in [ConsoleMode::Off, ConsoleMode::Null, ConsoleMode::Tty] {
            assert!(ConsoleSink::check(&ConsoleConfig { mode, file: None }).is_ok());
        }
    }

    #[test]
    fn open_empties_an_existing_output_file() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let log = dir.as_path().join("serial.log");
        std::fs::write(&log, "the last VM's output\n").unwrap();
        let sink = ConsoleSink::open(&file(log.to_str().unwrap())).unwrap();
        assert!(matches!(sink, ConsoleSink::File(_)));
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
    }
}
