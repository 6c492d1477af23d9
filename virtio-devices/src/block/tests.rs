use super::*;
use crate::test_util::{add_chains, used, CountingInterrupt, W};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vmm_sys_util::eventfd::EventFd;

const R: u16 = 0;
const DISK_SECTORS: u64 = 64;
const ALL: u64 = 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_DISCARD
    | 1 << VIRTIO_BLK_F_WRITE_ZEROES
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_BLK_SIZE;

// Guest addresses used by the tests.
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const MEM_SIZE: u64 = 0x80_0000;

/// An in-memory disk that panics on any access outside itself, so a test
/// fails if the device ever lets one through.
#[derive(Clone)]
struct FakeDisk {
    data: Arc<Mutex<Vec<u8>>>,
    flushes: Arc<AtomicU64>,
    changes: Arc<AtomicU64>,
    discard: bool,
    /// How long each read takes.
    read_delay: std::time::Duration,
}

impl FakeDisk {
    fn new(sectors: u64, discard: bool) -> Self {
        let data = (0..sectors * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>();
        FakeDisk {
            data: Arc::new(Mutex::new(data)),
            flushes: Arc::new(AtomicU64::new(0)),
            changes: Arc::new(AtomicU64::new(0)),
            discard,
            read_delay: std::time::Duration::ZERO,
        }
    }

    fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let size = self.data.lock().unwrap().len() as u64;
        let end = offset
            .checked_add(len)
            .expect("offset overflow reached the disk");
        assert!(
            end <= size,
            "access {offset}+{len} beyond the {size}-byte disk"
        );
        offset as usize..end as usize
    }
}

impl DiskImage for FakeDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        std::thread::sleep(self.read_delay);
        let r = self.range(offset, buf.len() as u64);
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let r = self.range(offset, buf.len() as u64);
        self.data.lock().unwrap()[r].copy_from_slice(buf);
        self.changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        if !self.discard {
            return Err(BlockError::Unsupported {
                path: PathBuf::from("fake"),
                reason: "no discard".to_string(),
            });
        }
        let r = self.range(offset, len);
        self.data.lock().unwrap()[r].fill(0);
        self.changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        let r = self.range(offset, len);
        self.data.lock().unwrap()[r].fill(0);
        self.changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn supports_discard(&self) -> bool {
        self.discard
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn device(disk: &FakeDisk, readonly: bool) -> Block {
    Block::new(
        "disk0".to_string(),
        Box::new(disk.clone()),
        readonly,
        1,
        128,
        String::new(),
    )
    .unwrap()
}

fn header(mem: &GuestMemoryMmap, addr: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn status(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

/// Makes the chains (lists of (addr, len, flags)) available on a fresh
/// 64-entry queue, lets the handler serve it and returns the used ring.
fn run(
    mem: &GuestMemoryMmap,
    h: &mut BlockHandler,
    chains: &[&[(u64, u32, u16)]],
) -> Vec<(u32, u32)> {
    let vq = MockSplitQueue::new(mem, 64);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chains(&vq, 0, chains);
    let served = h.process(0, &mut q, mem);
    let ring = used(&vq);
    assert_eq!(served, !ring.is_empty());
    ring
}

/// A three-descriptor request: header, data, status.
fn simple(data_len: u32, data_flags: u16) -> [(u64, u32, u16); 3] {
    [(HDR, 16, R), (DATA, data_len, data_flags), (STATUS, 1, W)]
}

fn fresh_status(mem: &GuestMemoryMmap) {
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
}

#[test]
fn read_request() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    fresh_status(&mem);
    assert_eq!(run(&mem, &mut h, &[&simple(1024, W)]), vec![(0, 1025)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk.contents()[3 * 512..3 * 512 + 1024]);
    let c = dev.counters();
    assert_eq!((c["read_ops"], c["read_bytes"]), (1, 1024));
    assert_eq!(c["queue0_requests"], 1);
}

#[test]
fn latency_counters() {
    let mem = memory();
    let mut disk = FakeDisk::new(DISK_SECTORS, false);
    disk.read_delay = std::time::Duration::from_millis(3);
    let dev = device(&disk, false);
    let latency = |kind: &str| {
        let c = dev.counters();
        let get = |what: &str| c[&format!("{kind}_latency_{what}")];
        (get("min"), get("avg"), get("max"))
    };
    assert_eq!(latency("read"), (0, 0, 0), "before any request");
    let mut h = dev.handler(ALL, 0);
    for _ in 0..2 {
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        run(&mem, &mut h, &[&simple(512, W)]);
        assert_eq!(status(&mem, STATUS), S_OK);
    }
    let (min, avg, max) = latency("read");
    assert!(3000 <= min && min <= avg && avg <= max, "{min} {avg} {max}");
    assert_eq!(latency("write"), (0, 0, 0), "no writes yet");
}

#[test]
fn write_request_and_write_cache() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let pattern: Vec<u8> = (0..1536u32).map(|i| (i * 7) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();

    // With FLUSH negotiated, writes are cached: no sync per write.
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 10);
    fresh_status(&mem);
    assert_eq!(run(&mem, &mut h, &[&simple(1536, R)]), vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    assert_eq!(disk.contents()[10 * 512..10 * 512 + 1536], pattern[..]);
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 0);

    // Without it, every write is synced before its status.
    let mut h = dev.handler(ALL & !(1 << VIRTIO_BLK_F_FLUSH), 0);
    fresh_status(&mem);
    assert_eq!(run(&mem, &mut h, &[&simple(512, R)]), vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    let c = dev.counters();
    assert_eq!((c["write_ops"], c["write_bytes"]), (2, 2048));
}

#[test]
fn flush_request() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    fresh_status(&mem);
    assert_eq!(
        run(&mem, &mut h, &[&[(HDR, 16, R), (STATUS, 1, W)]]),
        vec![(0, 1)]
    );
    assert_eq!(status(&mem, STATUS), S_OK);
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    assert_eq!(dev.counters()["flush_ops"], 1);
}

#[test]
fn get_id_request() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    // Default serial: the id, zero-padded.
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(run(&mem, &mut h, &[&simple(20, W)]), vec![(0, 21)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"disk0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");

    // A long serial is cut to 20 bytes, and to the buffer.
    let dev = Block::new(
        "d".to_string(),
        Box::new(disk.clone()),
        false,
        1,
        128,
        "0123456789abcdefghijKLMN".to_string(),
    )
    .unwrap();
    let mut h = dev.handler(ALL, 0);
    assert_eq!(run(&mem, &mut h, &[&simple(64, W)]), vec![(0, 21)]);
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"0123456789abcdefghij");
    mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(run(&mem, &mut h, &[&simple(8, W)]), vec![(0, 9)]);
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..9], b"01234567\xff");
}

fn segment(mem: &GuestMemoryMmap, addr: u64, sector: u64, num: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(addr)).unwrap();
}

#[test]
fn discard_request() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, true);
    let dev = device(&disk, false);
    assert_ne!(dev.features() & 1 << VIRTIO_BLK_F_DISCARD, 0);
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 2, 3, 0);
    segment(&mem, DATA + 16, 60, 4, 0);
    fresh_status(&mem);
    assert_eq!(run(&mem, &mut h, &[&simple(32, R)]), vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    let d = disk.contents();
    assert!(d[2 * 512..5 * 512].iter().all(|&b| b == 0));
    assert!(d[60 * 512..].iter().all(|&b| b == 0));
    assert_eq!(d[5 * 512], (5 * 512 % 251) as u8);
    assert_eq!(dev.counters()["discard_ops"], 1);

    // The unmap flag (or any flag) is not defined for discard.
    segment(&mem, DATA, 2, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    run(&mem, &mut h, &[&simple(16, R)]);
    assert_eq!(status(&mem, STATUS), S_UNSUPP);

    // A segment beyond the disk fails the whole request before any change.
    let before = disk.changes.load(Ordering::SeqCst);
    segment(&mem, DATA, 0, 1, 0);
    segment(&mem, DATA + 16, 63, 2, 0);
    run(&mem, &mut h, &[&simple(32, R)]);
    assert_eq!(status(&mem, STATUS), S_IOERR);
    segment(&mem, DATA, u64::MAX / 512, 1, 0);
    run(&mem, &mut h, &[&simple(16, R)]);
    assert_eq!(status(&mem, STATUS), S_IOERR);
    assert_eq!(disk.changes.load(Ordering::SeqCst), before);

    // Segment lists that are empty, ragged or too long.
    for len in [0, 15, 17, 16 * (MAX_DISCARD_SEGMENTS + 1)] {
        fresh_status(&mem);
        run(&mem, &mut h, &[&simple(len, R)]);
        assert_eq!(status(&mem, STATUS), S_IOERR, "{len} bytes of segments");
    }

    // Not negotiated: unsupported.
    let mut h = dev.handler(ALL & !(1 << VIRTIO_BLK_F_DISCARD), 0);
    segment(&mem, DATA, 0, 1, 0);
    run(&mem, &mut h, &[&simple(16, R)]);
    assert_eq!(status(&mem, STATUS), S_UNSUPP);
}

#[test]
fn discard_not_offered_without_image_support() {
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    assert_eq!(dev.features() & 1 << VIRTIO_BLK_F_DISCARD, 0);
    assert_ne!(dev.features() & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
    // Even a driver claiming it gets UNSUPP.
    let mem = memory();
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 0, 1, 0);
    run(&mem, &mut h, &[&simple(16, R)]);
    assert_eq!(status(&mem, STATUS), S_UNSUPP);
}

#[test]
fn reset_cuts_write_zeroes_short() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&mem, DATA, 0, DISK_SECTORS as u32, 0);
    // As during a reset: the worker is being stopped.
    dev.stopping.store(true, Ordering::Relaxed);
    run(&mem, &mut h, &[&simple(16, R)]);
    assert_eq!(status(&mem, STATUS), S_IOERR);
    assert_eq!(disk.changes.load(Ordering::SeqCst), 0);
}

#[test]
fn write_zeroes_request() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&mem, DATA, 1, 2, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    segment(&mem, DATA + 16, 8, 0, 0);
    fresh_status(&mem);
    assert_eq!(run(&mem, &mut h, &[&simple(32, R)]), vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    let d = disk.contents();
    assert!(d[512..3 * 512].iter().all(|&b| b == 0));
    assert_ne!(d[3 * 512 + 1], 0);
    assert_eq!(dev.counters()["write_zeroes_ops"], 1);

    // Unknown flags: unsupported.
    segment(&mem, DATA, 1, 2, 2);
    run(&mem, &mut h, &[&simple(16, R)]);
    assert_eq!(status(&mem, STATUS), S_UNSUPP);
}

#[test]
fn large_request_in_odd_pieces() {
    // Crosses IO_CHUNK boundaries with descriptors of odd sizes.
    let mem = memory();
    let sectors = 8192; // 4 MiB
    let disk = FakeDisk::new(sectors, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    let pieces: [(u64, u32); 4] = [
        (0x10_0000, 1000),
        (0x20_0000, 0x10_0000 + 24),
        (0x40_0000, 0x12_0000),
        (0x60_0000, 0),
    ];
    let total: u32 = pieces.iter().map(|p| p.1).sum::<u32>() + 512 * 3;
    let last = (0x70_0000, total - pieces.iter().map(|p| p.1).sum::<u32>());
    let mut chain = vec![(HDR, 16, R)];
    chain.extend(pieces.iter().chain([&last]).map(|&(a, l)| (a, l, W)));
    chain.push((STATUS, 1, W));
    assert_eq!(total % 512, 0);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 100);
    assert_eq!(run(&mem, &mut h, &[&chain]), vec![(0, total + 1)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    let mut got = Vec::new();
    for &(a, l) in pieces.iter().chain([&last]) {
        let mut b = vec![0u8; l as usize];
        mem.read_slice(&mut b, GuestAddress(a)).unwrap();
        got.extend(b);
    }
    let start = 100 * 512;
    assert_eq!(got, disk.contents()[start..start + total as usize]);

    // Write it back one sector further on, from the same pieces.
    for (i, (a, l)) in pieces.iter().chain([&last]).enumerate() {
        mem.write_slice(&vec![i as u8 + 1; *l as usize], GuestAddress(*a))
            .unwrap();
    }
    let chain: Vec<_> = chain
        .iter()
        .map(|&(a, l, f)| {
            if a == HDR || a == STATUS {
                (a, l, f)
            } else {
                (a, l, R)
            }
        })
        .collect();
    // The status must stay writable and last; the data now precedes it as
    // readable buffers.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 101);
    assert_eq!(run(&mem, &mut h, &[&chain]), vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    let d = disk.contents();
    let mut pos = 101 * 512;
    for (i, &(_, l)) in pieces.iter().chain([&last]).enumerate() {
        assert!(d[pos..pos + l as usize].iter().all(|&b| b == i as u8 + 1));
        pos += l as usize;
    }
}

#[test]
fn any_layout_header_split_and_status_inside_data() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    // Header in two pieces; data and status in a single 513-byte buffer.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 5);
    let chain = [(HDR, 8, R), (HDR + 8, 8, R), (DATA, 513, W)];
    mem.write_obj(0xeeu8, GuestAddress(DATA + 512)).unwrap();
    assert_eq!(run(&mem, &mut h, &[&chain]), vec![(0, 513)]);
    assert_eq!(status(&mem, DATA + 512), S_OK);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk.contents()[5 * 512..6 * 512]);

    // Header and OUT data in one readable buffer.
    let mut buf = vec![0u8; 16 + 512];
    buf[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    buf[8..16].copy_from_slice(&7u64.to_le_bytes());
    buf[16..].fill(0x5a);
    mem.write_slice(&buf, GuestAddress(HDR)).unwrap();
    fresh_status(&mem);
    assert_eq!(
        run(&mem, &mut h, &[&[(HDR, 528, R), (STATUS, 1, W)]]),
        vec![(0, 1)]
    );
    assert_eq!(status(&mem, STATUS), S_OK);
    assert!(disk.contents()[7 * 512..8 * 512].iter().all(|&b| b == 0x5a));
}

#[test]
fn requests_beyond_the_disk_fail_untouched() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    let before = disk.contents();
    for (t, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
        for (sector, len) in [
            (DISK_SECTORS, 512),
            (DISK_SECTORS - 1, 1024),
            (DISK_SECTORS + 1000, 0),
            // sector * 512 overflows.
            (u64::MAX, 512),
            (u64::MAX / 512, 512),
            (1 << 55, 512),
        ] {
            header(&mem, HDR, t, sector);
            fresh_status(&mem);
            assert_eq!(
                run(&mem, &mut h, &[&simple(len, flags)]),
                vec![(0, 1)],
                "type {t} sector {sector} len {len}"
            );
            assert_eq!(status(&mem, STATUS), S_IOERR);
        }
    }
    // The last sector itself is fine, and so is an empty request at the end.
    header(&mem, HDR, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    run(&mem, &mut h, &[&simple(512, W)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    header(&mem, HDR, VIRTIO_BLK_T_OUT, DISK_SECTORS);
    run(&mem, &mut h, &[&simple(0, R)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    assert_eq!(disk.contents(), before);
}

#[test]
fn partial_last_sector_is_not_exposed() {
    let disk = FakeDisk::new(4, false);
    disk.data.lock().unwrap().extend([1u8; 100]);
    let dev = device(&disk, false);
    assert_eq!(dev.capacity(), 4);
    let mem = memory();
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 4);
    run(&mem, &mut h, &[&simple(512, W)]);
    assert_eq!(status(&mem, STATUS), S_IOERR);
}

#[test]
fn unaligned_lengths_fail() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    let before = disk.contents();
    for (t, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
        header(&mem, HDR, t, 0);
        for len in [1, 511, 513] {
            fresh_status(&mem);
            assert_eq!(run(&mem, &mut h, &[&simple(len, flags)]), vec![(0, 1)]);
            assert_eq!(status(&mem, STATUS), S_IOERR);
        }
    }
    assert_eq!(disk.contents(), before);
}

#[test]
fn buffers_outside_guest_memory_fail() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    let before = disk.contents();
    for (t, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
        header(&mem, HDR, t, 0);
        for addr in [MEM_SIZE, MEM_SIZE - 256, u64::MAX - 100, u64::MAX] {
            fresh_status(&mem);
            let chain = [(HDR, 16, R), (addr, 512, flags), (STATUS, 1, W)];
            assert_eq!(run(&mem, &mut h, &[&chain]), vec![(0, 1)]);
            assert_eq!(status(&mem, STATUS), S_IOERR);
        }
    }
    // A header outside memory.
    fresh_status(&mem);
    let chain = [(MEM_SIZE + 0x1000, 16, R), (DATA, 512, W), (STATUS, 1, W)];
    assert_eq!(run(&mem, &mut h, &[&chain]), vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), S_IOERR);
    // A status byte outside memory: nothing can be reported.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let chain = [(HDR, 16, R), (DATA, 512, R), (MEM_SIZE, 1, W)];
    assert_eq!(run(&mem, &mut h, &[&chain]), vec![(0, 0)]);
    let chain = [(HDR, 16, R), (DATA, 512, R), (u64::MAX, 1, W)];
    assert_eq!(run(&mem, &mut h, &[&chain]), vec![(0, 0)]);
    assert_eq!(disk.contents(), before);
}

#[test]
fn readable_status_or_no_writable_buffer() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    let before = disk.contents();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    fresh_status(&mem);
    // All readable: no status to write, nothing done.
    assert_eq!(
        run(
            &mem,
            &mut h,
            &[&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)]]
        ),
        vec![(0, 0)]
    );
    assert_eq!(status(&mem, STATUS), 0xee);
    // Writable data, then a readable "status": out of order, fails; the
    // status goes to the last writable byte the driver gave.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(
            &mem,
            &mut h,
            &[&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)]]
        ),
        vec![(0, 1)]
    );
    assert_eq!(status(&mem, STATUS), 0xee);
    assert_eq!(status(&mem, DATA + 511), S_IOERR);
    assert_eq!(status(&mem, DATA), 0xaa);
    // Header only.
    assert_eq!(run(&mem, &mut h, &[&[(HDR, 16, R)]]), vec![(0, 0)]);
    // A zero-length "status".
    assert_eq!(
        run(&mem, &mut h, &[&[(HDR, 16, R), (STATUS, 0, W)]]),
        vec![(0, 0)]
    );
    assert_eq!(disk.contents(), before);
}

#[test]
fn short_or_missing_header() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    fresh_status(&mem);
    assert_eq!(
        run(&mem, &mut h, &[&[(HDR, 15, R), (STATUS, 1, W)]]),
        vec![(0, 1)]
    );
    assert_eq!(status(&mem, STATUS), S_IOERR);
    fresh_status(&mem);
    assert_eq!(run(&mem, &mut h, &[&[(STATUS, 1, W)]]), vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), S_IOERR);
}

#[test]
fn descriptor_loop_does_not_hang() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&mem, 64);
    let mut q: Queue = vq.create_queue().unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    // 0 -> 1 -> 2 -> 1 -> 2 ...: a writable pair looping.
    let descs = [
        Descriptor::new(HDR, 16, next, 1),
        Descriptor::new(DATA, 512, W | next, 2),
        Descriptor::new(STATUS, 1, W | next, 1),
    ];
    for (i, d) in descs.iter().enumerate() {
        vq.desc_table()
            .store(i as u16, RawDescriptor::from(*d))
            .unwrap();
    }
    // And a self-loop at 3.
    vq.desc_table()
        .store(3, RawDescriptor::from(Descriptor::new(HDR, 16, next, 3)))
        .unwrap();
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().ring().ref_at(1).unwrap().store(3);
    vq.avail().idx().store(2);
    assert!(h.process(0, &mut q, &mem));
    let ring = used(&vq);
    assert_eq!(ring.len(), 2);
    // The walk ends after 64 descriptors; the loop is just odd buffers
    // (the status byte's descriptor repeated), which the device survives.
    assert_eq!(ring[1], (3, 0));
}

#[test]
fn head_index_out_of_range() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    let vq = MockSplitQueue::new(&mem, 64);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.avail().ring().ref_at(0).unwrap().store(1000);
    vq.avail().idx().store(1);
    // Nothing to walk and nothing to return, but no panic and the queue
    // moves on.
    h.process(0, &mut q, &mem);
    assert_eq!(q.next_avail(), 1);
}

#[test]
fn corrupt_available_index() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    let vq = MockSplitQueue::new(&mem, 64);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    vq.avail().idx().store(500);
    assert!(!h.process(0, &mut q, &mem));
    // Skipped, so that the queue does not look busy forever.
    assert_eq!(q.next_avail(), 500);
    assert!(!q.enable_notification(&mem).unwrap());
}

#[test]
fn readonly_disk_refuses_changes() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, true);
    let dev = device(&disk, true);
    let f = dev.features();
    assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
    assert_eq!(f & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
    let mut h = dev.handler(f, 0);
    let before = disk.contents();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    fresh_status(&mem);
    assert_eq!(run(&mem, &mut h, &[&simple(512, R)]), vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), S_IOERR);
    // Discard and write-zeroes are not negotiable.
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&mem, HDR, t, 0);
        segment(&mem, DATA, 0, 1, 0);
        run(&mem, &mut h, &[&simple(16, R)]);
        assert_eq!(status(&mem, STATUS), S_UNSUPP);
    }
    // Even a handler told they were negotiated refuses to change the disk.
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    run(&mem, &mut h, &[&simple(16, R)]);
    assert_ne!(status(&mem, STATUS), S_OK);
    // Reads still work.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    run(&mem, &mut h, &[&simple(512, W)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    assert_eq!(disk.contents(), before);
    assert_eq!(disk.changes.load(Ordering::SeqCst), 0);
}

#[test]
fn zero_length_data_descriptors() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    fresh_status(&mem);
    // Empty descriptors (even at bogus addresses) around a real one.
    let chain = [
        (HDR, 16, R),
        (u64::MAX, 0, W),
        (DATA, 512, W),
        (0, 0, W),
        (STATUS, 1, W),
        (MEM_SIZE * 2, 0, W),
    ];
    assert_eq!(run(&mem, &mut h, &[&chain]), vec![(0, 513)]);
    assert_eq!(status(&mem, STATUS), S_OK);
    // A read with no data at all.
    fresh_status(&mem);
    assert_eq!(run(&mem, &mut h, &[&simple(0, W)]), vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), S_OK);
}

#[test]
fn unsupported_types() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    for t in [2, 3, 5, 14, 16, 0x8000_0000, u32::MAX] {
        header(&mem, HDR, t, 0);
        fresh_status(&mem);
        assert_eq!(run(&mem, &mut h, &[&simple(512, W)]), vec![(0, 1)]);
        assert_eq!(status(&mem, STATUS), S_UNSUPP, "type {t}");
    }
    assert_eq!(dev.counters()["errors"], 7);
}

#[test]
fn too_many_descriptors() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // An indirect table of MAX + 2 descriptors: header, MAX data, status.
    let n = MAX_DESCRIPTORS_PER_REQUEST + 2;
    let table = 0x50_0000u64;
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, R),
            i if i == n - 1 => (STATUS, 1, W),
            _ => (DATA, 512, W),
        };
        let flags = if i == n - 1 {
            flags
        } else {
            flags | VRING_DESC_F_NEXT as u16
        };
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1));
        mem.write_obj(d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let vq = MockSplitQueue::new(&mem, 64);
    let mut q: Queue = vq.create_queue().unwrap();
    let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    vq.desc_table()
        .store(
            0,
            RawDescriptor::from(Descriptor::new(table, 16 * n as u32, indirect, 0)),
        )
        .unwrap();
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);
    fresh_status(&mem);
    assert!(h.process(0, &mut q, &mem));
    assert_eq!(used(&vq), vec![(0, 1)]);
    assert_eq!(status(&mem, STATUS), S_IOERR);
}

#[test]
fn every_chain_is_returned() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let dev = device(&disk, false);
    let mut h = dev.handler(ALL, 0);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    header(&mem, HDR + 16, 99, 0);
    header(&mem, HDR + 32, VIRTIO_BLK_T_IN, u64::MAX);
    let good = simple(512, W);
    let bad_type = [(HDR + 16, 16, R), (STATUS, 1, W)];
    let beyond = [(HDR + 32, 16, R), (DATA, 512, W), (STATUS + 1, 1, W)];
    let no_status: [(u64, u32, u16); 1] = [(HDR, 16, R)];
    let outside = [(HDR, 16, R), (MEM_SIZE, 512, W), (STATUS + 2, 1, W)];
    let used = run(
        &mem,
        &mut h,
        &[&good, &bad_type, &beyond, &no_status, &outside, &good],
    );
    let heads: Vec<u32> = used.iter().map(|u| u.0).collect();
    assert_eq!(heads, vec![0, 3, 5, 8, 9, 12]);
    assert_eq!(used[0].1, 513);
    assert_eq!(used[3].1, 0);
    assert_eq!(used[5].1, 513);
    assert_eq!(dev.counters()["queue0_requests"], 6);
}

#[test]
fn config_space_layout() {
    let disk = FakeDisk::new(2048 + 1, true);
    let dev = Block::new(
        "d".to_string(),
        Box::new(disk),
        false,
        4,
        256,
        String::new(),
    )
    .unwrap();
    let f = dev.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & 1 << bit, 0, "feature {bit}");
    }
    assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(f >> 32, 0, "transport bits are the transport's");
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.queue_max_sizes(), vec![256; 4]);

    let read = |offset: u64, len: usize| {
        let mut b = vec![0xffu8; len];
        dev.read_config(offset, &mut b);
        b
    };
    let u32_at = |o| u32::from_le_bytes(read(o, 4).try_into().unwrap());
    assert_eq!(read(0, 8), 2049u64.to_le_bytes());
    assert_eq!(u32_at(8), 0);
    assert_eq!(u32_at(12), 254);
    assert_eq!(u32_at(20), 512);
    assert_eq!(read(34, 2), 4u16.to_le_bytes());
    assert_eq!(u32_at(36), MAX_DISCARD_SECTORS);
    assert_eq!(u32_at(40), MAX_DISCARD_SEGMENTS);
    assert_eq!(u32_at(44), DISCARD_SECTOR_ALIGNMENT);
    assert_eq!(u32_at(48), MAX_DISCARD_SECTORS);
    assert_eq!(u32_at(52), MAX_DISCARD_SEGMENTS);
    assert_eq!(read(56, 1), [1]);
    // Reads at odd offsets and sizes, and past the end.
    assert_eq!(read(1, 2), [8, 0]);
    assert_eq!(read(58, 4), [0, 0, 0, 0]);
    assert_eq!(read(0x1000, 4), [0, 0, 0, 0]);
    assert_eq!(read(u64::MAX, 4), [0, 0, 0, 0]);

    // One queue: no MQ; small queues: small seg_max.
    let dev = Block::new(
        "d".to_string(),
        Box::new(FakeDisk::new(1, false)),
        true,
        1,
        8,
        String::new(),
    )
    .unwrap();
    assert_eq!(dev.features() & 1 << VIRTIO_BLK_F_MQ, 0);
    let mut b = [0u8; 4];
    dev.read_config(12, &mut b);
    assert_eq!(u32::from_le_bytes(b), 6);
    dev.read_config(48, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn bad_parameters_are_refused() {
    let mk = |queues, size| {
        Block::new(
            "x".to_string(),
            Box::new(FakeDisk::new(1, false)),
            false,
            queues,
            size,
            String::new(),
        )
    };
    assert!(mk(0, 128).is_err());
    assert!(mk(MAX_QUEUES + 1, 128).is_err());
    assert!(mk(1, 0).is_err());
    assert!(mk(1, 2).is_err());
    assert!(mk(1, 100).is_err());
    assert!(mk(1, 32768).is_ok());
    let e = mk(0, 128).unwrap_err().to_string();
    assert!(e.contains("virtio-blk x"), "{e}");
}

/// Two queues, each on its own worker thread, through activate and reset.
#[test]
fn workers_serve_each_queue() {
    let mem = memory();
    let disk = FakeDisk::new(DISK_SECTORS, false);
    let mut dev = Block::new(
        "mq".to_string(),
        Box::new(disk.clone()),
        false,
        2,
        16,
        String::new(),
    )
    .unwrap();
    let interrupt = Arc::new(CountingInterrupt::default());
    for round in 0..2 {
        let vqs = [
            MockSplitQueue::create(&mem, GuestAddress(0x60_0000), 16),
            MockSplitQueue::create(&mem, GuestAddress(0x61_0000), 16),
        ];
        let kicks: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let queues = vqs
            .iter()
            .zip(&kicks)
            .enumerate()
            .map(|(i, (vq, kick))| {
                let mut queue: Queue = vq.create_queue().unwrap();
                queue.set_event_idx(true);
                ActiveQueue {
                    index: i as u16,
                    queue,
                    notify: kick.try_clone().unwrap(),
                }
            })
            .collect();
        dev.activate(
            mem.clone(),
            interrupt.clone(),
            queues,
            ALL | 1 << VIRTIO_BLK_F_MQ | 1 << VIRTIO_RING_F_EVENT_IDX,
        )
        .unwrap();
        for (i, vq) in vqs.iter().enumerate() {
            let base = 0x62_0000 + 0x1_0000 * i as u64;
            header(&mem, base, VIRTIO_BLK_T_IN, i as u64);
            let descs = [
                Descriptor::new(base, 16, VRING_DESC_F_NEXT as u16, 1),
                Descriptor::new(base + 0x100, 512, W | VRING_DESC_F_NEXT as u16, 2),
                Descriptor::new(base + 0x1000, 1, W, 0),
            ]
            .map(RawDescriptor::from);
            vq.add_desc_chains(&descs, 0).unwrap();
            kicks[i].write(1).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while vqs.iter().any(|vq| vq.used().idx().load() < 1) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        for (i, vq) in vqs.iter().enumerate() {
            assert_eq!(used(vq), vec![(0, 513)], "round {round} queue {i}");
            let base = 0x62_0000 + 0x1_0000 * i as u64;
            assert_eq!(status(&mem, base + 0x1000), S_OK);
        }
        dev.reset();
    }
    let c = dev.counters();
    assert_eq!(c["queue0_requests"], 2);
    assert_eq!(c["queue1_requests"], 2);
    assert_eq!(c["read_ops"], 4);
    let mut signalled = interrupt.0.lock().unwrap().clone();
    signalled.sort();
    assert_eq!(signalled, vec![0, 0, 1, 1]);
}

#[test]
fn fuzz_entry_point() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let descs = simple(512, W).map(|(a, l, f)| (a, l, f));
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(a, l, f))| {
            let f = if i < 2 {
                f | VRING_DESC_F_NEXT as u16
            } else {
                f
            };
            RawDescriptor::from(Descriptor::new(a, l, f, i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&raw, 0).unwrap();
    assert!(process_queue_for_fuzzing(
        Box::new(FakeDisk::new(4, false)),
        false,
        ALL,
        &mut q,
        &mem
    ));
    assert_eq!(status(&mem, STATUS), S_OK);
}

#[test]
fn odd_ids_make_valid_thread_names() {
    let mem = memory();
    let mut dev = Block::new(
        "bad\0id with spaces and a very long name".to_string(),
        Box::new(FakeDisk::new(1, false)),
        false,
        1,
        16,
        String::new(),
    )
    .unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x60_0000), 16);
    let queue = ActiveQueue {
        index: 0,
        queue: vq.create_queue().unwrap(),
        notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    };
    dev.activate(
        mem.clone(),
        Arc::new(CountingInterrupt::default()),
        vec![queue],
        ALL,
    )
    .unwrap();
    dev.reset();
}

// io_uring on a real raw file.

/// A raw image file of `sectors` sectors holding the FakeDisk pattern,
/// removed when dropped.
struct RawFile(PathBuf);

impl RawFile {
    fn new(name: &str, sectors: u64) -> RawFile {
        let path = std::env::temp_dir().join(format!("kite-blk-{}-{name}", std::process::id()));
        std::fs::write(&path, FakeDisk::new(sectors, false).contents()).unwrap();
        RawFile(path)
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for RawFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A device on `file` and a queue-0 handler that has an io_uring.
fn uring_handler(file: &RawFile, direct: bool, mem: &GuestMemoryMmap) -> (Block, BlockHandler) {
    let opts = ::block::OpenOptions {
        direct,
        format: Some(::block::ImageFormat::Raw),
        ..Default::default()
    };
    let disk = ::block::open_image(&file.0, &opts).unwrap();
    let dev = Block::new("disk0".to_string(), disk, false, 1, 64, String::new()).unwrap();
    let mut h = dev.handler(ALL, 0);
    h.uring = dev.uring(0, 64, mem);
    assert!(h.uring.is_some(), "no io_uring on this host");
    (dev, h)
}

/// Like [`run`], but keeps serving, each time the handler's eventfd says
/// completions arrived, until `want` chains are used (or five seconds pass:
/// a completion that never wakes the worker fails the test).
fn run_async(
    mem: &GuestMemoryMmap,
    h: &mut BlockHandler,
    chains: &[&[(u64, u32, u16)]],
    want: usize,
) -> Vec<(u32, u32)> {
    let vq = MockSplitQueue::new(mem, 64);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chains(&vq, 0, chains);
    let deadline = Instant::now() + Duration::from_secs(5);
    h.process(0, &mut q, mem);
    while used(&vq).len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the eventfd never announced the completions"
        );
        let mut pfd = libc::pollfd {
            fd: h.input_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } == 1 {
            h.process(0, &mut q, mem);
        }
    }
    used(&vq)
}

#[test]
fn uring_reads_and_writes_a_raw_file() {
    let mem = memory();
    let file = RawFile::new("uring-rw", DISK_SECTORS);
    let (_dev, mut h) = uring_handler(&file, false, &mem);
    let before = file.contents();

    // Eight reads of two sectors each and eight writes, all in flight at once.
    let mut chains = Vec::new();
    for i in 0..16u64 {
        let hdr = HDR + i * 16;
        let data = DATA + i * 0x1000;
        if i < 8 {
            header(&mem, hdr, VIRTIO_BLK_T_IN, i * 2);
            chains.push([(hdr, 16, R), (data, 1024, W), (STATUS + i, 1, W)]);
        } else {
            header(&mem, hdr, VIRTIO_BLK_T_OUT, 32 + i);
            mem.write_slice(&[i as u8; 512], GuestAddress(data))
                .unwrap();
            chains.push([(hdr, 16, R), (data, 512, R), (STATUS + i, 1, W)]);
        }
        mem.write_obj(0xeeu8, GuestAddress(STATUS + i)).unwrap();
    }
    let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| &c[..]).collect();
    let mut ring = run_async(&mem, &mut h, &refs, 16);
    ring.sort();
    let heads: Vec<(u32, u32)> = (0..16)
        .map(|i| (i * 3, if i < 8 { 1025 } else { 1 }))
        .collect();
    assert_eq!(ring, heads);

    let after = file.contents();
    for i in 0..16u64 {
        assert_eq!(status(&mem, STATUS + i), S_OK, "request {i}");
        let mut data = vec![0u8; 1024];
        mem.read_slice(&mut data, GuestAddress(DATA + i * 0x1000))
            .unwrap();
        if i < 8 {
            let at = (i * 2 * SECTOR_SIZE) as usize;
            assert_eq!(data, before[at..at + 1024], "read {i}");
        } else {
            let at = ((32 + i) * SECTOR_SIZE) as usize;
            assert!(
                after[at..at + 512].iter().all(|&b| b == i as u8),
                "write {i}"
            );
        }
    }
    // Nothing else changed.
    assert_eq!(after[..40 * 512], before[..40 * 512]);
    assert_eq!(after[48 * 512..], before[48 * 512..]);
    let c = VirtioDevice::counters(&_dev);
    assert_eq!((c["read_ops"], c["write_ops"]), (8, 8));
    assert_eq!((c["read_bytes"], c["write_bytes"]), (8 * 1024, 8 * 512));
}

#[test]
fn uring_direct_io_with_unaligned_buffers_still_works() {
    let mem = memory();
    let file = RawFile::new("uring-direct", DISK_SECTORS);
    let (_dev, mut h) = uring_handler(&file, true, &mem);
    let before = file.contents();
    // Page-aligned (goes to the ring) and odd (served through the bounce
    // buffer) data buffers, read and written.
    for (n, data) in [DATA, DATA + 3].into_iter().enumerate() {
        let sector = 8 + n as u64 * 8;
        header(&mem, HDR, VIRTIO_BLK_T_IN, sector);
        fresh_status(&mem);
        let chain = [(HDR, 16, R), (data, 4096, W), (STATUS, 1, W)];
        assert_eq!(run_async(&mem, &mut h, &[&chain], 1), vec![(0, 4097)]);
        assert_eq!(status(&mem, STATUS), S_OK);
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(data)).unwrap();
        let at = sector as usize * 512;
        assert_eq!(got, before[at..at + 4096]);
    }
    for (n, data) in [DATA, DATA + 3].into_iter().enumerate() {
        let sector = 24 + n as u64 * 8;
        mem.write_slice(&[0x5a + n as u8; 4096], GuestAddress(data))
            .unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, sector);
        fresh_status(&mem);
        let chain = [(HDR, 16, R), (data, 4096, R), (STATUS, 1, W)];
        assert_eq!(run_async(&mem, &mut h, &[&chain], 1), vec![(0, 1)]);
        assert_eq!(status(&mem, STATUS), S_OK);
        let at = sector as usize * 512;
        assert!(file.contents()[at..at + 4096]
            .iter()
            .all(|&b| b == 0x5a + n as u8));
    }
}

#[test]
fn uring_handler_dropped_with_requests_in_flight() {
    let mem = memory();
    let file = RawFile::new("uring-drop", DISK_SECTORS);
    let (_dev, mut h) = uring_handler(&file, false, &mem);
    let vq = MockSplitQueue::new(&mem, 64);
    let mut q: Queue = vq.create_queue().unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 5);
    mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    add_chains(&vq, 0, &[&simple(512, R)]);
    h.process(0, &mut q, &mem);
    // Reset: the handler waits for the write before it lets go of memory.
    drop(h);
    assert!(file.contents()[5 * 512..6 * 512].iter().all(|&b| b == 0x77));
}
