//! The host side of the guest's serial console: where COM1's output goes
//! (stdout, a file, nowhere) and, in tty mode, stdin in raw mode as its input.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use api::config::{ConsoleConfig, ConsoleMode};
use devices::serial::SerialOutput;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot open serial output file {path}: {source}")]
    OpenFile { path: PathBuf, source: io::Error },
    #[error("serial mode File needs a file path")]
    NoFile,
    #[error("serial mode {0:?} is not supported")]
    Unsupported(ConsoleMode),
}

/// Where COM1 writes. The file is opened once per created VM so that a guest
/// reboot appends to the same output.
pub enum SerialSink {
    /// No serial device at all.
    Off,
    /// A serial device whose output is discarded.
    Null,
    Stdout,
    File(File),
}

impl SerialSink {
    pub fn open(config: &ConsoleConfig) -> Result<SerialSink, ConsoleError> {
        Ok(match config.mode {
            ConsoleMode::Off => SerialSink::Off,
            ConsoleMode::Null => SerialSink::Null,
            ConsoleMode::Tty => SerialSink::Stdout,
            ConsoleMode::File => {
                let path = config.file.as_deref().ok_or(ConsoleError::NoFile)?;
                SerialSink::File(create(path)?)
            }
            other => return Err(ConsoleError::Unsupported(other)),
        })
    }

    /// A writer for a new VM's COM1, or None when the port is off.
    pub fn writer(&self) -> io::Result<Option<SerialOutput>> {
        Ok(match self {
            SerialSink::Off => None,
            SerialSink::Null => Some(Box::new(io::sink())),
            SerialSink::Stdout => Some(Box::new(Stdout)),
            SerialSink::File(f) => Some(Box::new(f.try_clone()?)),
        })
    }

    /// Empties the output file, for a newly created VM.
    pub fn truncate(&self) -> io::Result<()> {
        match self {
            SerialSink::File(f) => f.set_len(0),
            _ => Ok(()),
        }
    }

    pub fn reads_stdin(&self) -> bool {
        matches!(self, SerialSink::Stdout)
    }
}

/// Opens (creating) without truncating: a `vm.create` that fails later must
/// leave an existing file as it was. [`SerialSink::truncate`] empties it once
/// the VM exists.
fn create(path: &Path) -> Result<File, ConsoleError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
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
