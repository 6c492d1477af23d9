//! Helpers for the device models' unit tests: building descriptor chains on
//! virtio-queue's mock queues and reading back the used ring.

use std::sync::Mutex;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

use crate::device::QueueInterrupt;
use crate::GuestMemoryMmap;

/// Flag of a device-writable descriptor.
pub const W: u16 = VRING_DESC_F_WRITE as u16;

/// Writes the chains (each a list of (addr, len, flags)) from descriptor
/// index `start` on and makes them available; returns the next free index.
pub fn add_chains(
    vq: &MockSplitQueue<GuestMemoryMmap>,
    start: u16,
    chains: &[&[(u64, u32, u16)]],
) -> u16 {
    let mut index = start;
    for chain in chains {
        let first = index;
        let descs: Vec<RawDescriptor> = chain
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let flags = if i + 1 == chain.len() {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(Descriptor::new(addr, len, flags, first + i as u16 + 1))
            })
            .collect();
        vq.add_desc_chains(&descs, first).unwrap();
        index += chain.len() as u16;
    }
    index
}

/// The used ring's (id, len) entries so far.
pub fn used(vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let n = vq.used().idx().load();
    (0..n)
        .map(|i| {
            let e = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

/// Records which queues were signalled.
#[derive(Default)]
pub struct CountingInterrupt(pub Mutex<Vec<u16>>);

impl QueueInterrupt for CountingInterrupt {
    fn signal_queue(&self, queue: u16) {
        self.0.lock().unwrap().push(queue);
    }
    fn signal_config(&self) {}
}

/// CPU milliseconds used so far by this process's threads named `name`.
pub fn thread_cpu_time(name: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" closing comm start at "state"; utime and
        // stime are the 12th and 13th of them.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let ticks = field(11) + field(12);
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        total += ticks * 1000 / hz;
    }
    total
}
