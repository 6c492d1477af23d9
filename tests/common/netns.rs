//! Network namespaces for the network tests: each test runs kite (and the
//! TAP it creates) in a namespace of its own.

use std::fs;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

/// A network namespace of this test process, deleted when dropped.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "kite-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run `ip netns add` (is iproute2 installed?)");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec <ns> <program>`: a command that runs in the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `ip ARGS` in the namespace; it must succeed. Returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = self.command("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A statistic of an interface of the namespace
    /// (`/sys/class/net/<iface>/statistics/<name>`).
    pub fn stat(&self, iface: &str, name: &str) -> u64 {
        let out = self
            .command("cat")
            .arg(format!("/sys/class/net/{iface}/statistics/{name}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().parse().unwrap_or_else(|_| {
            panic!(
                "{iface} {name} in {}: {text:?} {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Runs `f` on a new thread that joined the namespace (network
    /// namespaces are per thread); sockets it opens belong to the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns only changes this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// [`NetNs::spawn`], waiting for `f`'s result.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// The names of the namespace's interfaces.
    pub fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}
