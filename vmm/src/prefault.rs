//! Faults in guest memory that a boot is about to use, on a thread of its
//! own. Guest RAM is backed on first touch, and the host zeroes each huge
//! page then: the loader's copy of the kernel and the guest's first writes
//! (its bss, its early allocations) would otherwise wait for that zeroing one
//! page at a time, on the one thread that is also doing the work. With the
//! pages faulted in alongside, the zeroing runs on another core.
//!
//! Only ranges the payload is known to use are faulted in, so an idle guest
//! still costs the host little memory.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;

/// Host pages are faulted in this many bytes at a time: one huge page.
const CHUNK: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// Below this, a thread would cost more than it saves: the loader's and the
/// guest's own faults wait for at most one huge page.
const MIN_BYTES: u64 = 2 * CHUNK;

/// A prefault thread at work; dropping the handle stops it at its next chunk.
pub struct Prefault {
    stop: Arc<AtomicBool>,
}

impl Prefault {
    /// Faults in the guest-physical `ranges`, in order, each from its end
    /// down, so that a loader writing a range from its start meets the
    /// thread halfway instead of following it. Parts of a range outside
    /// guest memory are skipped. Ranges of less than [`MIN_BYTES`] in all
    /// are left to the loader.
    pub fn start(mem: &GuestMemoryMmap, ranges: Vec<Range<u64>>) -> Prefault {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes: u64 = ranges.iter().map(|r| r.end.saturating_sub(r.start)).sum();
        if bytes < MIN_BYTES {
            return Prefault { stop };
        }
        let (mem, flag) = (mem.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("kite-prefault".into())
            .spawn(move || populate(&mem, &ranges, &flag));
        if let Err(e) = spawned {
            // Only slower: the guest faults its pages in itself.
            log::debug!("no prefault thread: {e}");
        }
        Prefault { stop }
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn populate(mem: &GuestMemoryMmap, ranges: &[Range<u64>], stop: &AtomicBool) {
    let mem_end = mem.last_addr().raw_value().saturating_add(1);
    for range in ranges {
        let mut end = range.end.min(mem_end);
        while end > range.start {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            // Down to the chunk boundary below `end`, not past the range
            // but to its page (madvise takes whole pages).
            let start = ((end - 1) & !(CHUNK - 1)).max(range.start) & !(PAGE - 1);
            if let Err(e) = populate_chunk(mem, start..end) {
                log::debug!("prefault stopped at {start:#x}: {e}");
                return;
            }
            end = start;
        }
    }
}

/// Faults in `range`, which lies within one chunk; nothing outside guest
/// memory.
fn populate_chunk(mem: &GuestMemoryMmap, range: Range<u64>) -> std::io::Result<()> {
    let Ok(slice) = mem.get_slice(
        GuestAddress(range.start),
        (range.end - range.start) as usize,
    ) else {
        // Outside guest RAM (or across the end of a region): nothing to do.
        return Ok(());
    };
    let guard = slice.ptr_guard_mut();
    // SAFETY: the slice lies within guest memory, which `mem` keeps mapped
    // while this runs. MADV_POPULATE_WRITE only backs the pages, as a write
    // would, without changing what they hold.
    let ret = unsafe {
        libc::madvise(
            guard.as_ptr().cast(),
            slice.len(),
            libc::MADV_POPULATE_WRITE,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the host page at `addr` is backed, per mincore(2).
    fn resident(mem: &GuestMemoryMmap, addr: u64) -> bool {
        let slice = mem.get_slice(GuestAddress(addr), 4096).unwrap();
        let mut vec = 0u8;
        // SAFETY: a page-aligned page of a live mapping; one result byte.
        let ret = unsafe { libc::mincore(slice.ptr_guard_mut().as_ptr().cast(), 4096, &mut vec) };
        assert_eq!(ret, 0);
        vec & 1 == 1
    }

    #[test]
    fn faults_in_the_ranges_and_nothing_else() {
        let mem = crate::memory::create_guest_memory(32 << 20, false).unwrap();
        // A few bytes are not worth a thread (had one started, it would be
        // done by the time the one below is).
        let small = std::iter::once((16 << 20)..(16 << 20) + 0x30);
        let _small = Prefault::start(&mem, small.collect());
        // Payload ranges need not start on a page.
        let ranges = vec![(4 << 20)..(9 << 20), (30 << 20) + 0x123..(40 << 20)];
        let prefault = Prefault::start(&mem, ranges);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // The last page the thread faults in (the last range, its lowest
        // chunk, whose pages madvise takes in ascending order).
        while !resident(&mem, (32 << 20) - 4096) {
            assert!(std::time::Instant::now() < deadline, "not faulted in");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(prefault);
        for addr in [
            4 << 20,
            6 << 20,
            (9 << 20) - 4096,
            30 << 20,
            (32 << 20) - 4096,
        ] {
            assert!(resident(&mem, addr), "{addr:#x} not faulted in");
        }
        for addr in [0, (4 << 20) - 4096, 9 << 20, 16 << 20, 20 << 20] {
            assert!(!resident(&mem, addr), "{addr:#x} faulted in");
        }
    }
}
