//! virtio-blk (type 2) over a [`DiskImage`].
//!
//! Each queue has its own worker thread; the workers share the image behind
//! a mutex that is held only for the I/O call itself.
//!
//! # Requests
//!
//! A request is read as two byte streams, whatever the descriptor layout
//! (virtio 1.x implies VIRTIO_F_ANY_LAYOUT): the device-readable descriptors
//! in chain order, then the device-writable ones. The readable stream starts
//! with the 16-byte header (type u32, reserved u32, sector u64), which may
//! be split across descriptors; the rest of it is the data of OUT,
//! DISCARD and WRITE_ZEROES. The last byte of the writable stream is the
//! status; the bytes before it are the data of IN and GET_ID. A chain with a
//! readable descriptor after a writable one, or with more than
//! [`MAX_DESCRIPTORS_PER_REQUEST`] descriptors, fails with IOERR; one without
//! any writable byte (so no status) is returned with used length 0.
//!
//! Every descriptor is checked against guest memory before anything is done,
//! and every disk access against the disk's size (`sector * 512 + len` must
//! not overflow and must end within the disk), so a request either fits or
//! never reaches the image. Data moves through one reusable buffer per
//! worker, [`IO_CHUNK`] bytes at a time, so a request of any size (a chain
//! carries less than 4 GiB) uses bounded memory and no allocation once the
//! buffer has grown. Discard and write-zeroes ranges are handed to the image
//! in pieces of at most [`ZERO_CHUNK`] bytes so that other queues can reach
//! the disk in between, and a device reset need not wait for the rest.
//!
//! On a raw image, reads and writes go instead through an io_uring per
//! queue ([`uring`]), straight between guest memory and the file, many at a
//! time; their status is written when the kernel completes them, in
//! whatever order that is. Without io_uring (an old or locked-down host)
//! everything is served synchronously as above.
//!
//! # Write cache
//!
//! VIRTIO_BLK_F_FLUSH is offered: the device then behaves like a disk with a
//! volatile write cache, and a FLUSH returns only once the image has synced.
//! A driver that does not negotiate it gets write-through: every write,
//! discard and write-zeroes is followed by a flush before its status.

mod uring;

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ::block::{BlockError, DiskImage};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::device::{ActivateError, ActiveQueue, QueueInterrupt, VirtioDevice};
use crate::log_budget::LogBudget;
use crate::worker::{skip_corrupt_avail, QueueHandler, Worker};
use crate::GuestMemoryMmap;
use uring::{Completion, Op, Request, Uring};

/// Bytes in a virtio-blk sector (requests are addressed in these units).
pub const SECTOR_SIZE: u64 = 512;
/// The most queues a device may have (each gets a thread and an MSI-X vector).
pub const MAX_QUEUES: u16 = 256;
/// The most descriptors one request may use; drivers are told `seg_max`
/// (at most 254) data segments, plus header and status.
pub const MAX_DESCRIPTORS_PER_REQUEST: usize = 1024;
/// Data moves between guest memory and the disk this many bytes at a time.
pub const IO_CHUNK: usize = 1 << 20;
/// Discard and write-zeroes reach the image in pieces of at most this size
/// (where an image without a fast way has to write zeros: a fraction of a
/// second on a slow disk).
pub const ZERO_CHUNK: u64 = 32 << 20;
/// Segments in one discard or write-zeroes request, at most.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Sectors in one discard or write-zeroes segment, at most.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX;
/// Discard granularity advertised, in sectors (4 KiB).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Data segments per request advertised, at most.
const MAX_SEG_MAX: u16 = 254;

const HEADER_SIZE: usize = 16;
const SEGMENT_SIZE: usize = 16;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// struct virtio_blk_config up to write_zeroes_may_unmap and its padding.
const CONFIG_SIZE: usize = 60;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Why a block device cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("virtio-blk {id}: {reason}")]
pub struct BlockConfigError {
    pub id: String,
    pub reason: String,
}

#[derive(Default)]
struct Counters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    read_latency: Latency,
    write_latency: Latency,
    flush_ops: AtomicU64,
    discard_ops: AtomicU64,
    write_zeroes_ops: AtomicU64,
    errors: AtomicU64,
    /// Requests completed, per queue.
    queue_requests: Vec<AtomicU64>,
}

/// How long requests of one kind took, from the worker taking them off the
/// queue to their completion, in microseconds.
struct Latency {
    min: AtomicU64,
    max: AtomicU64,
    total: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }
}

impl Latency {
    fn record(&self, started: Instant) {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.min.fetch_min(micros, Ordering::Relaxed);
        self.max.fetch_max(micros, Ordering::Relaxed);
        self.total.fetch_add(micros, Ordering::Relaxed);
    }

    /// Cloud Hypervisor's `<kind>_latency_min|max|avg` for `ops` requests
    /// (all 0 before the first).
    fn report(&self, kind: &str, ops: u64, m: &mut BTreeMap<String, u64>) {
        let load = |v: &AtomicU64| {
            if ops == 0 {
                0
            } else {
                v.load(Ordering::Relaxed)
            }
        };
        m.insert(format!("{kind}_latency_min"), load(&self.min));
        m.insert(format!("{kind}_latency_max"), load(&self.max));
        m.insert(
            format!("{kind}_latency_avg"),
            load(&self.total) / ops.max(1),
        );
    }
}

type SharedDisk = Arc<Mutex<Box<dyn DiskImage>>>;

fn lock(disk: &Mutex<Box<dyn DiskImage>>) -> MutexGuard<'_, Box<dyn DiskImage>> {
    // A worker that panicked mid-request cannot have left the image in a
    // state worse than a crash would; keep serving.
    disk.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A virtio-blk device.
pub struct Block {
    id: String,
    disk: SharedDisk,
    readonly: bool,
    num_queues: u16,
    queue_size: u16,
    /// Disk size in sectors; a partial last sector is not exposed.
    capacity: u64,
    discard: bool,
    serial: [u8; ID_BYTES],
    features: u64,
    config: [u8; CONFIG_SIZE],
    counters: Arc<Counters>,
    /// Set while the workers are being stopped, so that a long discard or
    /// write-zeroes gives up instead of holding up a reset.
    stopping: Arc<AtomicBool>,
    workers: Vec<Worker>,
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block")
            .field("id", &self.id)
            .field("readonly", &self.readonly)
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A device serving `disk` on `num_queues` queues of up to `queue_size`
    /// entries (a power of two, 4 to 32768). `serial` is what GET_ID returns
    /// (its first 20 bytes); empty means the id.
    pub fn new(
        id: String,
        disk: Box<dyn DiskImage>,
        readonly: bool,
        num_queues: u16,
        queue_size: u16,
        serial: String,
    ) -> Result<Block, BlockConfigError> {
        let invalid = |reason: String| BlockConfigError {
            id: id.clone(),
            reason,
        };
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(invalid(format!(
                "num_queues must be between 1 and {MAX_QUEUES}, not {num_queues}"
            )));
        }
        if !queue_size.is_power_of_two() || !(4..=32768).contains(&queue_size) {
            return Err(invalid(format!(
                "queue_size must be a power of two between 4 and 32768, not {queue_size}"
            )));
        }
        let capacity = disk.size() / SECTOR_SIZE;
        let discard = !readonly && disk.supports_discard();
        let write_zeroes = !readonly;
        let seg_max = (queue_size - 2).min(MAX_SEG_MAX);

        let mut features = 1u64 << VIRTIO_BLK_F_FLUSH
            | 1u64 << VIRTIO_BLK_F_SEG_MAX
            | 1u64 << VIRTIO_BLK_F_BLK_SIZE;
        if num_queues > 1 {
            features |= 1u64 << VIRTIO_BLK_F_MQ;
        }
        if readonly {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        if discard {
            features |= 1u64 << VIRTIO_BLK_F_DISCARD;
        }
        if write_zeroes {
            features |= 1u64 << VIRTIO_BLK_F_WRITE_ZEROES;
        }

        let mut config = [0u8; CONFIG_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &capacity.to_le_bytes());
        // size_max (8) and geometry (16) are not offered.
        put(12, &u32::from(seg_max).to_le_bytes());
        // blk_size: the guest then aligns its requests to what the image
        // serves without read-modify-write (O_DIRECT on a 4 KiB-sector disk).
        let block_size = u32::try_from(disk.block_size()).unwrap_or(SECTOR_SIZE as u32);
        put(20, &block_size.to_le_bytes());
        // topology (24) and writeback (32) are not offered.
        put(34, &num_queues.to_le_bytes());
        if discard {
            put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
            put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
        }
        if write_zeroes {
            put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
            put(56, &[u8::from(discard)]);
        }

        let source = if serial.is_empty() { &id } else { &serial };
        let mut serial_bytes = [0u8; ID_BYTES];
        let n = source.len().min(ID_BYTES);
        serial_bytes[..n].copy_from_slice(&source.as_bytes()[..n]);

        let counters = Counters {
            queue_requests: (0..num_queues).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        };
        Ok(Block {
            id,
            disk: Arc::new(Mutex::new(disk)),
            readonly,
            num_queues,
            queue_size,
            capacity,
            discard,
            serial: serial_bytes,
            features,
            config,
            counters: Arc::new(counters),
            stopping: Arc::new(AtomicBool::new(false)),
            workers: Vec::new(),
        })
    }

    /// An io_uring for a queue of `depth` entries, if the image is raw and
    /// the host lets us have one.
    fn uring(&self, index: u16, depth: u16, mem: &GuestMemoryMmap) -> Option<Uring> {
        let file = lock(&self.disk).flat_file()?;
        match Uring::new(file, depth, mem.clone()) {
            Ok(u) => Some(u),
            Err(e) => {
                log::info!(
                    "virtio-blk {}: no io_uring ({e}); serving queue {index} synchronously",
                    self.id
                );
                None
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// A handler for queue `index` with the driver's `features`, serving
    /// synchronously until given an io_uring.
    fn handler(&self, features: u64, index: u16) -> BlockHandler {
        let has = |bit: u32| features & self.features & (1u64 << bit) != 0;
        BlockHandler {
            id: self.id.clone(),
            disk: self.disk.clone(),
            disk_bytes: self.capacity * SECTOR_SIZE,
            readonly: self.readonly,
            writethrough: !has(VIRTIO_BLK_F_FLUSH),
            discard: has(VIRTIO_BLK_F_DISCARD),
            write_zeroes: has(VIRTIO_BLK_F_WRITE_ZEROES),
            serial: self.serial,
            counters: self.counters.clone(),
            stopping: self.stopping.clone(),
            queue: usize::from(index),
            rsegs: Vec::new(),
            wsegs: Vec::new(),
            buf: Vec::new(),
            disk_errors: LogBudget::default(),
            uring: None,
            completions: Vec::new(),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues)]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config, offset, data);
    }

    // The only writable field, writeback, needs VIRTIO_BLK_F_CONFIG_WCE,
    // which is not offered: writes are ignored.

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn QueueInterrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        self.reset();
        let event_idx = features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in queues {
            let mut handler = self.handler(features, q.index);
            handler.uring = self.uring(q.index, q.queue.size(), &mem);
            // Thread names: no NUL (spawn would panic) and, as Linux keeps
            // 15 bytes, the queue first.
            let id: String = self.id.chars().filter(char::is_ascii_graphic).collect();
            let name = format!("blk{}-{id}", q.index);
            match Worker::spawn(
                name,
                handler,
                vec![q],
                mem.clone(),
                interrupt.clone(),
                event_idx,
            ) {
                Ok(w) => self.workers.push(w),
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            }
        }
        log::debug!(
            "virtio-blk {}: {} queue(s), {} sectors{}{}",
            self.id,
            self.workers.len(),
            self.capacity,
            if self.readonly { ", read-only" } else { "" },
            if self.discard { ", discard" } else { "" },
        );
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping a worker stops and joins its thread; requests in flight
        // complete first, but a discard or write-zeroes stops at its next
        // piece.
        self.stopping.store(true, Ordering::Relaxed);
        self.workers.clear();
        self.stopping.store(false, Ordering::Relaxed);
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let c = &self.counters;
        let mut m = BTreeMap::new();
        for (name, v) in [
            ("read_bytes", &c.read_bytes),
            ("write_bytes", &c.write_bytes),
            ("read_ops", &c.read_ops),
            ("write_ops", &c.write_ops),
            ("flush_ops", &c.flush_ops),
            ("discard_ops", &c.discard_ops),
            ("write_zeroes_ops", &c.write_zeroes_ops),
            ("errors", &c.errors),
        ] {
            m.insert(name.to_string(), v.load(Ordering::Relaxed));
        }
        for (i, v) in c.queue_requests.iter().enumerate() {
            m.insert(format!("queue{i}_requests"), v.load(Ordering::Relaxed));
        }
        c.read_latency
            .report("read", c.read_ops.load(Ordering::Relaxed), &mut m);
        c.write_latency
            .report("write", c.write_ops.load(Ordering::Relaxed), &mut m);
        m
    }
}

/// One descriptor's buffer.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: u64,
    len: u32,
}

fn total_len(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// A position in a list of guest buffers, read or written in order.
struct Cursor<'a> {
    segs: &'a [Seg],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    fn new(segs: &'a [Seg]) -> Self {
        Cursor {
            segs,
            index: 0,
            offset: 0,
        }
    }

    /// The next contiguous piece of at most `max` bytes.
    fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        while let Some(seg) = self.segs.get(self.index) {
            let left = (seg.len - self.offset) as usize;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = left.min(max);
            let addr = seg.addr.checked_add(u64::from(self.offset))?;
            // n <= left, which is a u32.
            self.offset += n as u32;
            return Some((GuestAddress(addr), n));
        }
        None
    }

    /// The buffers not yet read or written, for a transfer that takes them
    /// all at once.
    fn rest(&mut self) -> Vec<Seg> {
        let mut segs = Vec::new();
        while let Some((addr, n)) = self.next_piece(u32::MAX as usize) {
            // n comes from a u32 length.
            segs.push(Seg {
                addr: addr.0,
                len: n as u32,
            });
        }
        segs
    }

    /// Fills `dst` from the guest buffers.
    fn read(&mut self, mem: &GuestMemoryMmap, dst: &mut [u8]) -> bool {
        let mut done = 0;
        while done < dst.len() {
            let Some((addr, n)) = self.next_piece(dst.len() - done) else {
                return false;
            };
            if mem.read_slice(&mut dst[done..done + n], addr).is_err() {
                return false;
            }
            done += n;
        }
        true
    }

    /// Copies `src` into the guest buffers.
    fn write(&mut self, mem: &GuestMemoryMmap, src: &[u8]) -> bool {
        let mut done = 0;
        while done < src.len() {
            let Some((addr, n)) = self.next_piece(src.len() - done) else {
                return false;
            };
            if mem.write_slice(&src[done..done + n], addr).is_err() {
                return false;
            }
            done += n;
        }
        true
    }
}

/// Serves one queue on its worker thread.
struct BlockHandler {
    id: String,
    disk: SharedDisk,
    /// The disk size the guest sees, in bytes (a multiple of 512).
    disk_bytes: u64,
    readonly: bool,
    /// FLUSH not negotiated: sync after every change.
    writethrough: bool,
    discard: bool,
    write_zeroes: bool,
    serial: [u8; ID_BYTES],
    counters: Arc<Counters>,
    stopping: Arc<AtomicBool>,
    queue: usize,
    /// Scratch, reused from request to request.
    rsegs: Vec<Seg>,
    wsegs: Vec<Seg>,
    buf: Vec<u8>,
    /// A failing host disk must not flood the log at the guest's request rate.
    disk_errors: LogBudget,
    /// Reads and writes in flight, on raw images.
    uring: Option<Uring>,
    completions: Vec<Completion>,
}

/// What became of a request.
enum Outcome {
    /// Finished: its status and the data bytes written into guest buffers.
    Done(u8, u32),
    /// In flight on the io_uring; its completion finishes it.
    Queued,
}

impl From<(u8, u32)> for Outcome {
    fn from((status, written): (u8, u32)) -> Outcome {
        Outcome::Done(status, written)
    }
}

impl BlockHandler {
    /// Serves one chain; returns its used length, or `None` while it is in
    /// flight on the io_uring.
    fn process_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Option<u32> {
        let mut rsegs = std::mem::take(&mut self.rsegs);
        let mut wsegs = std::mem::take(&mut self.wsegs);
        let used = self.handle(chain, mem, &mut rsegs, &mut wsegs);
        self.rsegs = rsegs;
        self.wsegs = wsegs;
        used
    }

    fn handle(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        rsegs: &mut Vec<Seg>,
        wsegs: &mut Vec<Seg>,
    ) -> Option<u32> {
        let head = chain.head_index();
        let malformed = collect(chain, rsegs, wsegs);
        let Some(status_addr) = take_status_byte(wsegs) else {
            log::debug!("virtio-blk {}: request without a status byte", self.id);
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return Some(0);
        };
        if !GuestMemoryBackend::check_range(mem, status_addr, 1) {
            log::debug!("virtio-blk {}: status byte outside guest memory", self.id);
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return Some(0);
        }
        let outcome = if malformed {
            log::debug!("virtio-blk {}: malformed descriptor chain", self.id);
            Outcome::Done(S_IOERR, 0)
        } else if !in_memory(mem, rsegs) || !in_memory(mem, wsegs) {
            log::debug!("virtio-blk {}: buffer outside guest memory", self.id);
            Outcome::Done(S_IOERR, 0)
        } else {
            self.execute(mem, rsegs, wsegs, head, status_addr)
        };
        match outcome {
            Outcome::Done(status, written) => {
                Some(self.put_status(mem, status_addr, status, written))
            }
            Outcome::Queued => None,
        }
    }

    /// Writes a finished request's status; returns its used length.
    fn put_status(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        status: u8,
        written: u32,
    ) -> u32 {
        if status != S_OK {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        if mem.write_obj(status, addr).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    /// Runs a well-formed request.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        rsegs: &[Seg],
        wsegs: &[Seg],
        head: u16,
        status: GuestAddress,
    ) -> Outcome {
        let mut reader = Cursor::new(rsegs);
        let mut header = [0u8; HEADER_SIZE];
        if total_len(rsegs) < HEADER_SIZE as u64 || !reader.read(mem, &mut header) {
            log::debug!("virtio-blk {}: request header too short", self.id);
            return Outcome::Done(S_IOERR, 0);
        }
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
        let req_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes(s);
        let rlen = total_len(rsegs) - HEADER_SIZE as u64;
        let wlen = total_len(wsegs);
        let mut writer = Cursor::new(wsegs);
        match req_type {
            VIRTIO_BLK_T_IN => {
                self.transfer(Op::Read, mem, head, status, sector, &mut writer, wlen)
            }
            VIRTIO_BLK_T_OUT => {
                self.transfer(Op::Write, mem, head, status, sector, &mut reader, rlen)
            }
            VIRTIO_BLK_T_FLUSH => self.flush().into(),
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, &mut writer, wlen).into(),
            VIRTIO_BLK_T_DISCARD => self.discard_or_zero(mem, &mut reader, rlen, false).into(),
            VIRTIO_BLK_T_WRITE_ZEROES => self.discard_or_zero(mem, &mut reader, rlen, true).into(),
            other => {
                log::debug!("virtio-blk {}: unsupported request type {other}", self.id);
                Outcome::Done(S_UNSUPP, 0)
            }
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they lie within the disk.
    fn disk_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= self.disk_bytes).then_some(offset)
    }

    fn grow_buffer(&mut self, n: usize) {
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
    }

    fn disk_error(&mut self, what: &str, e: &dyn fmt::Display) {
        let level = self.disk_errors.level();
        log::log!(level, "virtio-blk {}: {what} failed: {e}", self.id);
    }

    /// Syncs the image if the driver did not negotiate a write cache.
    fn sync_if_writethrough(&mut self) -> bool {
        if !self.writethrough {
            return true;
        }
        let result = lock(&self.disk).flush();
        match result {
            Ok(()) => true,
            Err(e) => {
                self.disk_error("flush", &e);
                false
            }
        }
    }

    /// Hands a checked read or write to the io_uring, if there is one and it
    /// takes it; otherwise gives the request back to be served synchronously.
    /// Writes stay synchronous in write-through mode, which syncs after each.
    fn queue(&mut self, request: Request) -> Result<(), Request> {
        match &mut self.uring {
            Some(uring) if request.op == Op::Read || !self.writethrough => uring.push(request),
            _ => Err(request),
        }
    }

    /// A read (IN) or write (OUT) of `len` bytes at `sector`, with the data
    /// in the guest buffers of `data`: checked, then handed to the io_uring
    /// or served synchronously.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &mut self,
        op: Op,
        mem: &GuestMemoryMmap,
        head: u16,
        status: GuestAddress,
        sector: u64,
        data: &mut Cursor,
        len: u64,
    ) -> Outcome {
        let started = Instant::now();
        if op == Op::Write && self.readonly {
            log::debug!("virtio-blk {}: write to a read-only disk", self.id);
            return Outcome::Done(S_IOERR, 0);
        }
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Outcome::Done(S_IOERR, 0);
        }
        let Some(offset) = self.disk_range(sector, len) else {
            log::debug!(
                "virtio-blk {}: {} of {len} bytes at sector {sector} is outside the disk",
                self.id,
                op.name()
            );
            return Outcome::Done(S_IOERR, 0);
        };
        if self.uring.is_none() {
            return self
                .transfer_sync(op, mem, offset, data, len, started)
                .into();
        }
        let request = Request {
            op,
            head,
            status,
            offset,
            len,
            data: data.rest(),
            started,
        };
        match self.queue(request) {
            Ok(()) => Outcome::Queued,
            Err(r) => {
                let mut data = Cursor::new(&r.data);
                self.transfer_sync(op, mem, offset, &mut data, len, started)
                    .into()
            }
        }
    }

    fn transfer_sync(
        &mut self,
        op: Op,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &mut Cursor,
        len: u64,
        started: Instant,
    ) -> (u8, u32) {
        match op {
            Op::Read => self.read_sync(mem, offset, data, len, started),
            Op::Write => self.write_sync(mem, offset, data, len, started),
        }
    }

    fn read_sync(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        writer: &mut Cursor,
        len: u64,
        started: Instant,
    ) -> (u8, u32) {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(IO_CHUNK as u64) as usize;
            self.grow_buffer(n);
            let result = lock(&self.disk).read_at(&mut self.buf[..n], offset + done);
            if let Err(e) = result {
                self.disk_error("read", &e);
                return (S_IOERR, u32::try_from(done).unwrap_or(u32::MAX));
            }
            if !writer.write(mem, &self.buf[..n]) {
                return (S_IOERR, u32::try_from(done).unwrap_or(u32::MAX));
            }
            done += n as u64;
        }
        self.count_read(len, started)
    }

    fn count_read(&self, len: u64, started: Instant) -> (u8, u32) {
        self.counters.read_latency.record(started);
        self.counters.read_ops.fetch_add(1, Ordering::Relaxed);
        self.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
        // A chain carries less than 4 GiB, so len fits.
        (S_OK, u32::try_from(len).unwrap_or(u32::MAX))
    }

    fn write_sync(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        reader: &mut Cursor,
        len: u64,
        started: Instant,
    ) -> (u8, u32) {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(IO_CHUNK as u64) as usize;
            self.grow_buffer(n);
            if !reader.read(mem, &mut self.buf[..n]) {
                return (S_IOERR, 0);
            }
            let result = lock(&self.disk).write_at(&self.buf[..n], offset + done);
            if let Err(e) = result {
                self.disk_error("write", &e);
                return (S_IOERR, 0);
            }
            done += n as u64;
        }
        if !self.sync_if_writethrough() {
            return (S_IOERR, 0);
        }
        self.count_write(len, started)
    }

    fn count_write(&self, len: u64, started: Instant) -> (u8, u32) {
        self.counters.write_latency.record(started);
        self.counters.write_ops.fetch_add(1, Ordering::Relaxed);
        self.counters.write_bytes.fetch_add(len, Ordering::Relaxed);
        (S_OK, 0)
    }

    /// Puts a finished chain in the used ring; true if it is there.
    fn give_back(&self, queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
        if let Some(c) = self.counters.queue_requests.get(self.queue) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        match queue.add_used(mem, head, len) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("virtio-blk {}: cannot return chain {head}: {e}", self.id);
                false
            }
        }
    }

    /// Finishes what the io_uring completed; true if any chain was used.
    fn complete_finished(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let Some(uring) = &mut self.uring else {
            return false;
        };
        let mut completions = std::mem::take(&mut self.completions);
        uring.reap(&mut completions);
        let mut used = false;
        for c in completions.drain(..) {
            let (head, len) = self.complete(mem, c);
            used |= self.give_back(queue, mem, head, len);
        }
        self.completions = completions;
        used
    }

    /// Finishes a request the io_uring completed; returns its head and used
    /// length. A short or misaligned (`EINVAL` under `O_DIRECT`) transfer is
    /// done again synchronously, which copes with both.
    fn complete(&mut self, mem: &GuestMemoryMmap, c: Completion) -> (u16, u32) {
        let r = c.request;
        let (status, written) = match u64::try_from(c.result) {
            Ok(n) if n == r.len => match r.op {
                Op::Read => self.count_read(r.len, r.started),
                Op::Write => self.count_write(r.len, r.started),
            },
            Err(_) if c.result != -libc::EINVAL => {
                let e = std::io::Error::from_raw_os_error(-c.result);
                self.disk_error(r.op.name(), &format_args!("at byte {}: {e}", r.offset));
                (S_IOERR, 0)
            }
            _ => {
                let mut data = Cursor::new(&r.data);
                self.transfer_sync(r.op, mem, r.offset, &mut data, r.len, r.started)
            }
        };
        (r.head, self.put_status(mem, r.status, status, written))
    }

    fn flush(&mut self) -> (u8, u32) {
        let result = lock(&self.disk).flush();
        if let Err(e) = result {
            self.disk_error("flush", &e);
            return (S_IOERR, 0);
        }
        self.counters.flush_ops.fetch_add(1, Ordering::Relaxed);
        (S_OK, 0)
    }

    fn get_id(&mut self, mem: &GuestMemoryMmap, writer: &mut Cursor, len: u64) -> (u8, u32) {
        let n = (ID_BYTES as u64).min(len) as usize;
        if !writer.write(mem, &self.serial[..n]) {
            return (S_IOERR, 0);
        }
        (S_OK, n as u32)
    }

    fn discard_or_zero(
        &mut self,
        mem: &GuestMemoryMmap,
        reader: &mut Cursor,
        len: u64,
        zeroes: bool,
    ) -> (u8, u32) {
        let what = if zeroes { "write-zeroes" } else { "discard" };
        if !(if zeroes {
            self.write_zeroes
        } else {
            self.discard
        }) {
            return (S_UNSUPP, 0);
        }
        if self.readonly {
            return (S_IOERR, 0);
        }
        let max = u64::from(MAX_DISCARD_SEGMENTS) * SEGMENT_SIZE as u64;
        if len == 0 || !len.is_multiple_of(SEGMENT_SIZE as u64) || len > max {
            log::debug!(
                "virtio-blk {}: {what} with {len} bytes of segments",
                self.id
            );
            return (S_IOERR, 0);
        }
        let count = (len / SEGMENT_SIZE as u64) as usize;
        let mut raw = [0u8; MAX_DISCARD_SEGMENTS as usize * SEGMENT_SIZE];
        if !reader.read(mem, &mut raw[..count * SEGMENT_SIZE]) {
            return (S_IOERR, 0);
        }
        // Check every segment before touching the disk.
        let mut ranges = [(0u64, 0u64, false); MAX_DISCARD_SEGMENTS as usize];
        for (i, seg) in raw[..count * SEGMENT_SIZE]
            .chunks_exact(SEGMENT_SIZE)
            .enumerate()
        {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(sector);
            let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            let unknown = if zeroes {
                flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                // Discard defines no flags, not even unmap.
                flags
            };
            if unknown != 0 {
                return (S_UNSUPP, 0);
            }
            // num_sectors is within MAX_DISCARD_SECTORS (u32::MAX) by type.
            let bytes = u64::from(num_sectors) * SECTOR_SIZE;
            let Some(offset) = self.disk_range(sector, bytes) else {
                log::debug!(
                    "virtio-blk {}: {what} of {num_sectors} sectors at {sector} is outside the disk",
                    self.id
                );
                return (S_IOERR, 0);
            };
            ranges[i] = (offset, bytes, unmap);
        }
        for &(offset, bytes, unmap) in &ranges[..count] {
            let mut done = 0;
            while done < bytes {
                if self.stopping.load(Ordering::Relaxed) {
                    log::debug!("virtio-blk {}: {what} cut short by a reset", self.id);
                    return (S_IOERR, 0);
                }
                let n = (bytes - done).min(ZERO_CHUNK);
                let result = {
                    let mut disk = lock(&self.disk);
                    if zeroes {
                        disk.write_zeroes(offset + done, n, unmap)
                    } else {
                        disk.discard(offset + done, n)
                    }
                };
                match result {
                    Ok(()) => {}
                    Err(BlockError::Unsupported { .. }) => return (S_UNSUPP, 0),
                    Err(e) => {
                        self.disk_error(what, &e);
                        return (S_IOERR, 0);
                    }
                }
                done += n;
            }
        }
        if !self.sync_if_writethrough() {
            return (S_IOERR, 0);
        }
        let counter = if zeroes {
            &self.counters.write_zeroes_ops
        } else {
            &self.counters.discard_ops
        };
        counter.fetch_add(1, Ordering::Relaxed);
        (S_OK, 0)
    }
}

/// Splits a chain into its readable and writable buffers, in order; returns
/// true if the chain is malformed (a readable buffer after a writable one,
/// or too many descriptors). The walk itself is bounded by virtio-queue (a
/// chain ends after queue-size descriptors, or the indirect table's size).
fn collect(
    chain: DescriptorChain<&GuestMemoryMmap>,
    rsegs: &mut Vec<Seg>,
    wsegs: &mut Vec<Seg>,
) -> bool {
    rsegs.clear();
    wsegs.clear();
    let mut malformed = false;
    // The chain iterator stops quietly after as many descriptors as the
    // queue holds (a loop), at a NEXT outside the table or at a bad indirect
    // table: a last descriptor that still says NEXT means the chain was cut.
    let mut cut = false;
    for (n, desc) in chain.enumerate() {
        cut = desc.has_next();
        let seg = Seg {
            addr: desc.addr().0,
            len: desc.len(),
        };
        let over = n >= MAX_DESCRIPTORS_PER_REQUEST;
        malformed |= over;
        if desc.is_write_only() {
            match wsegs.last_mut() {
                // Past the limit only the last writable buffer is kept, to
                // find the status byte.
                Some(last) if over => *last = seg,
                _ => wsegs.push(seg),
            }
        } else {
            malformed |= !wsegs.is_empty();
            if !over {
                rsegs.push(seg);
            }
        }
    }
    malformed || cut
}

/// Removes the last byte of the writable buffers and returns its address.
fn take_status_byte(wsegs: &mut Vec<Seg>) -> Option<GuestAddress> {
    while let Some(last) = wsegs.last_mut() {
        if last.len == 0 {
            wsegs.pop();
            continue;
        }
        last.len -= 1;
        return last.addr.checked_add(u64::from(last.len)).map(GuestAddress);
    }
    None
}

fn in_memory(mem: &GuestMemoryMmap, segs: &[Seg]) -> bool {
    segs.iter()
        .all(|s| GuestMemoryBackend::check_range(mem, GuestAddress(s.addr), s.len as usize))
}

impl QueueHandler for BlockHandler {
    fn process(&mut self, _index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = self.complete_finished(queue, mem);
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if let Some(len) = self.process_chain(chain, mem) {
                used |= self.give_back(queue, mem, head, len);
            }
        }
        if let Some(uring) = &mut self.uring {
            if let Err(e) = uring.submit() {
                log::error!("virtio-blk {}: io_uring submit failed: {e}", self.id);
            }
            // Reads from the page cache often complete within the submit.
            used |= self.complete_finished(queue, mem);
        }
        skip_corrupt_avail(queue, mem, format_args!("virtio-blk {}", self.id));
        used
    }

    fn input_fd(&self) -> Option<RawFd> {
        self.uring.as_ref().map(Uring::eventfd)
    }

    fn input_ready(&mut self) -> bool {
        // The worker serves the queue next, which reaps the completions.
        true
    }

    fn in_flight(&self) -> bool {
        self.uring.as_ref().is_some_and(|u| u.in_flight() > 0)
    }
}

/// Serves every available chain of `queue` against `disk`, as a queue worker
/// of a device built with these arguments would, with the driver features
/// `features`; returns whether chains were used. For fuzzers.
#[doc(hidden)]
pub fn process_queue_for_fuzzing(
    disk: Box<dyn DiskImage>,
    readonly: bool,
    features: u64,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> bool {
    match Block::new("fuzz".to_string(), disk, readonly, 1, 256, String::new()) {
        Ok(block) => block.handler(features, 0).process(0, queue, mem),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests;
