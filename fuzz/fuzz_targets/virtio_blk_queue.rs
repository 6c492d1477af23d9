//! kite's virtio-blk request processing on a fuzzed split virtqueue.
//!
//! Input layout: a `CTRL_LEN`-byte control block, then the guest memory
//! contents (copied to guest address 0 of a 64 KiB guest; the rest is zero):
//!
//! ```text
//! ctrl[0]        queue size: 1 << (ctrl[0] % 9), so 1 to 256
//! ctrl[1]        driver features: bit 0 FLUSH, 1 DISCARD, 2 WRITE_ZEROES, 3 EVENT_IDX
//!                device: bit 4 read-only, bit 5 disk supports discard
//! ctrl[2]        disk faults: bit 0 reads fail, 1 writes fail, 2 flushes fail,
//!                3 discards and write-zeroes fail, 4 write-zeroes unsupported
//! ctrl[3..5]     disk size in bytes / 2 (u16 BE; odd sector counts and a
//!                partial last sector are both possible)
//! ctrl[5..7]     descriptor table address (u16 BE)
//! ctrl[7..9]     available ring address
//! ctrl[9..11]    used ring address
//! ctrl[11..13]   initial next_avail / next_used (a queue that has wrapped)
//! ```
//!
//! The queue is set up the way the PCI transport does it (refused, like
//! there, when misaligned or outside guest memory), then
//! `virtio_devices::block::process_queue_for_fuzzing` serves it against an
//! in-memory disk that checks every access lies within the disk. It is
//! served twice, as a worker woken twice would.
//!
//! Must never panic.
//!
//! `KITE_FUZZ_VERBOSE=1` prints the device's log and the used ring.
#![no_main]

use std::sync::OnceLock;

use block::{BlockError, DiskImage};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_devices::block::process_queue_for_fuzzing;
use virtio_devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

mod common;
use common::verbose;

const CTRL_LEN: usize = 13;
const MEM_SIZE: usize = 0x10000;
const MAX_QUEUE_SIZE: u16 = 256;

/// A disk held in memory. Every access is checked against its size: the
/// device promises never to ask for anything outside it.
struct MemDisk {
    data: Vec<u8>,
    faults: u8,
    discard: bool,
}

impl MemDisk {
    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.checked_add(len).expect("offset + len overflows");
        assert!(
            end <= self.data.len() as u64,
            "device accessed {len} bytes at {offset}, outside the {}-byte disk",
            self.data.len()
        );
        offset as usize..end as usize
    }

    fn fault(&self, bit: u8, what: &str) -> Result<(), BlockError> {
        if self.faults & bit != 0 {
            Err(BlockError::Io {
                path: "mem".into(),
                context: what.to_string(),
                source: std::io::Error::from_raw_os_error(5),
            })
        } else {
            Ok(())
        }
    }
}

impl DiskImage for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let r = self.range(offset, buf.len() as u64);
        self.fault(1, "read")?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let r = self.range(offset, buf.len() as u64);
        self.fault(2, "write")?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        self.fault(4, "flush")
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        let r = self.range(offset, len);
        if !self.discard {
            return Err(BlockError::Unsupported {
                path: "mem".into(),
                reason: "no discard".into(),
            });
        }
        self.fault(8, "discard")?;
        self.data[r].fill(0);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        let r = self.range(offset, len);
        if self.faults & 16 != 0 {
            return Err(BlockError::Unsupported {
                path: "mem".into(),
                reason: "no write-zeroes".into(),
            });
        }
        self.fault(8, "write-zeroes")?;
        self.data[r].fill(0);
        Ok(())
    }

    fn supports_discard(&self) -> bool {
        self.discard
    }
}

/// One guest memory for all iterations (rewritten each time).
fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("cannot create guest memory")
    })
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn setup_queue(ctrl: &[u8], mem: &GuestMemoryMmap) -> Option<Queue> {
    let size = 1u16 << (ctrl[0] % 9);
    let mut q = Queue::new(MAX_QUEUE_SIZE).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(be16(&ctrl[5..]).into()))
        .ok()?;
    q.try_set_avail_ring_address(GuestAddress(be16(&ctrl[7..]).into()))
        .ok()?;
    q.try_set_used_ring_address(GuestAddress(be16(&ctrl[9..]).into()))
        .ok()?;
    q.set_event_idx(ctrl[1] & 8 != 0);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return None;
    }
    let start = be16(&ctrl[11..]);
    q.set_next_avail(start);
    q.set_next_used(start);
    Some(q)
}

/// The used ring entries added since `start`.
fn print_used(queue: &Queue, mem: &GuestMemoryMmap, start: u16) {
    let used = GuestAddress(queue.used_ring());
    let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap_or(0);
    eprintln!("used ring idx {idx} (next_used {})", queue.next_used());
    let n = idx.wrapping_sub(start).min(queue.size());
    for i in 0..n {
        let slot = u64::from(start.wrapping_add(i) % queue.size());
        let at = used.unchecked_add(4 + 8 * slot);
        let id: u32 = mem.read_obj(at).unwrap_or(u32::MAX);
        let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap_or(u32::MAX);
        eprintln!("  used[{slot}]: id {id} len {len}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((ctrl, contents)) = data.split_first_chunk::<CTRL_LEN>() else {
        return;
    };
    verbose(); // installs the logger on first use
    let mem = memory();
    let n = contents.len().min(MEM_SIZE);
    mem.write_slice(&contents[..n], GuestAddress(0)).unwrap();
    mem.write_slice(&[0u8; MEM_SIZE][n..], GuestAddress(n as u64))
        .unwrap();

    let Some(mut queue) = setup_queue(ctrl, mem) else {
        return;
    };
    let mut features = 0u64;
    for (bit, feature) in [
        (1, VIRTIO_BLK_F_FLUSH),
        (2, VIRTIO_BLK_F_DISCARD),
        (4, VIRTIO_BLK_F_WRITE_ZEROES),
        (8, VIRTIO_RING_F_EVENT_IDX),
    ] {
        if ctrl[1] & bit != 0 {
            features |= 1 << feature;
        }
    }
    let readonly = ctrl[1] & 16 != 0;
    let disk_len = usize::from(be16(&ctrl[3..])) * 2;
    for _ in 0..2 {
        let disk = MemDisk {
            data: vec![0x5a; disk_len],
            faults: ctrl[2],
            discard: ctrl[1] & 32 != 0,
        };
        let used = process_queue_for_fuzzing(Box::new(disk), readonly, features, &mut queue, mem);
        if verbose() {
            eprintln!("served: used {used}, next_avail {}", queue.next_avail());
        }
    }
    if verbose() {
        print_used(&queue, mem, be16(&ctrl[11..]));
    }
});
