//! kite on a pseudo-terminal, for the interactive console tests: a test
//! types into the guest's shell and reads what comes back.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{wait_child, BOOT_TIMEOUT};

/// The test's end of the pty: what it types, what kite wrote so far.
pub struct Pty {
    writer: fs::File,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    pub fn write(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    /// Waits until the output after byte `from` contains `needle`; returns
    /// the length of the output then (the `from` of the next wait).
    pub fn wait(&self, from: usize, needle: &str) -> usize {
        let start = Instant::now();
        loop {
            let data = self.output.lock().unwrap().clone();
            let text = String::from_utf8_lossy(&data[from.min(data.len())..]).to_string();
            if text.contains(needle) {
                return data.len();
            }
            assert!(
                start.elapsed() < BOOT_TIMEOUT,
                "no {needle:?} on the console after {BOOT_TIMEOUT:?}; output:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs `kite` (`cmd`) with stdin, stdout and stderr on a new pty, lets
/// `session` type and read, then waits up to `timeout` for kite to exit.
/// Returns kite's status (None: it did not exit and was killed) and all it
/// wrote to the pty. A panic in `session` kills kite and is passed on.
pub fn pty_session(
    mut cmd: Command,
    timeout: Duration,
    session: impl FnOnce(&mut Pty),
) -> (Option<ExitStatus>, String) {
    let (master, slave) = open_pty();
    let mut child = cmd
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    // `cmd` keeps copies of the slave: without dropping it, the master
    // would never read EIO once kite exits.
    drop(cmd);
    let mut master = fs::File::from(master);
    let output = Arc::new(Mutex::new(Vec::new()));
    let mut pty = Pty {
        writer: master.try_clone().unwrap(),
        output: output.clone(),
    };
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = master.read(&mut chunk) {
            output.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        session(&mut pty);
        wait_child(&mut child, timeout)
    }));
    let status = match result {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            std::panic::resume_unwind(e);
        }
    };
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(pty.writer);
    reader.join().unwrap();
    let text = String::from_utf8_lossy(&pty.output.lock().unwrap()).to_string();
    (status, text)
}

/// A new pseudo-terminal: (master, slave).
fn open_pty() -> (OwnedFd, OwnedFd) {
    let (mut master_fd, mut slave_fd) = (-1, -1);
    // SAFETY: openpty writes two new file descriptors into the given ints.
    let rc = unsafe {
        libc::openpty(
            &mut master_fd,
            &mut slave_fd,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned only here.
    unsafe {
        (
            OwnedFd::from_raw_fd(master_fd),
            OwnedFd::from_raw_fd(slave_fd),
        )
    }
}
