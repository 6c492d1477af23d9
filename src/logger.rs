//! A small `log` backend: one line per event, to stderr or a file, with the
//! time since start, the level and the thread name.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    start: Instant,
    level: LevelFilter,
    file: Option<Mutex<File>>,
}

/// virtio-queue logs at error level whenever a guest hands it a bad ring;
/// a hostile guest could flood the log that way, so its messages count as
/// debug output.
fn effective_level(metadata: &Metadata) -> Level {
    if metadata.target().starts_with("virtio_queue") {
        metadata.level().max(Level::Debug)
    } else {
        metadata.level()
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        effective_level(metadata) <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        let thread = std::thread::current();
        let line = format!(
            "kite: {}.{:06}s {:<5} <{}> {}\n",
            t.as_secs(),
            t.subsec_micros(),
            record.level(),
            thread.name().unwrap_or("?"),
            record.args()
        );
        // Losing a log line must never take the VMM down.
        let _ = match &self.file {
            Some(f) => f
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_all(line.as_bytes()),
            None => std::io::stderr().write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {}
}

/// `verbosity` counts `-v` flags: errors only, then warnings, info, debug, trace.
pub fn init(verbosity: u8, file: Option<File>) {
    let level = match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    let logger = Logger {
        start: Instant::now(),
        level,
        file: file.map(Mutex::new),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
