//! Shared by the fuzz targets: `KITE_FUZZ_VERBOSE=1` makes a target print
//! what each input did, with the crates' own log messages (debug level), to
//! check seeds or to understand a crashing input
//! (`cargo fuzz run <target> <file>` runs just that input).

use std::sync::OnceLock;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        eprintln!("[{}] {}", record.level(), record.args());
    }

    fn flush(&self) {}
}

/// Whether KITE_FUZZ_VERBOSE is set (to anything but 0); the first call
/// installs the logger.
pub fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| {
        let on = std::env::var_os("KITE_FUZZ_VERBOSE").is_some_and(|v| v != "0");
        if on {
            static LOGGER: StderrLogger = StderrLogger;
            if log::set_logger(&LOGGER).is_ok() {
                log::set_max_level(log::LevelFilter::Debug);
            }
        }
        on
    })
}
