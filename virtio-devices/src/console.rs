//! virtio-console (type 3) with a single port (no VIRTIO_CONSOLE_F_MULTIPORT):
//! queue 0 is the receive queue (host to guest), queue 1 the transmit queue
//! (guest to host).
//!
//! * Transmit: the bytes of every device-readable descriptor go to the
//!   output, which is flushed once per batch; chains are returned with used
//!   length 0. At most [`MAX_TX_BYTES_PER_REQUEST`] of one chain are taken.
//! * Receive: host input is read when its fd is readable into a bounded
//!   buffer ([`MAX_PENDING_INPUT`]) and copied into the receive buffers the
//!   driver posts. Input arriving while that buffer is full is dropped (and
//!   counted), like a UART overrun: reading it anyway keeps the worker from
//!   spinning on a level-triggered fd the guest is not draining. At end of
//!   input the fd is no longer watched.
//!
//! VIRTIO_CONSOLE_F_SIZE is offered with a fixed size (80x24 unless
//! [`Console::with_size`] says otherwise).
//!
//! Notification suppression: the receive queue normally holds buffers the
//! device is not ready to use (no input yet). This device starts its worker
//! without the worker's EVENT_IDX loop and re-enables notifications itself,
//! only when it has consumed every buffer it wants (see
//! `rearm`). (It predates the worker loop going round only
//! when the driver adds buffers; it could now use that loop instead.)

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::device::{ActivateError, ActiveQueue, QueueInterrupt, VirtioDevice};
use crate::worker::{skip_corrupt_avail, QueueHandler, Worker};
use crate::GuestMemoryMmap;

/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Host to guest.
pub const RX_QUEUE: u16 = 0;
/// Guest to host.
pub const TX_QUEUE: u16 = 1;
/// Host input waiting for receive buffers, at most.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;
/// The most output taken from one transmit chain; the rest is ignored.
pub const MAX_TX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// The device reports its size in `cols` and `rows`.
const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
/// struct virtio_console_config: cols u16, rows u16, max_nr_ports u32,
/// emerg_wr u32.
const CONFIG_SIZE: usize = 12;
/// Host input is read in pieces of this size.
const INPUT_CHUNK: usize = 4096;

#[derive(Default)]
struct Counters {
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
}

type Output = Arc<Mutex<Box<dyn Write + Send>>>;

/// A virtio-console device with one port.
pub struct Console {
    output: Output,
    input: Option<Arc<File>>,
    cols: u16,
    rows: u16,
    counters: Arc<Counters>,
    worker: Option<Worker>,
}

impl Console {
    /// A console writing guest output to `output` and, when `input` is
    /// given, feeding the guest what can be read from it. `input` should be
    /// pollable (a tty, pipe or socket, e.g. a dup of stdin); a regular file
    /// cannot be polled and then gives no input.
    pub fn new(output: Box<dyn Write + Send>, input: Option<File>) -> Console {
        Console {
            output: Arc::new(Mutex::new(output)),
            input: input.map(Arc::new),
            cols: 80,
            rows: 24,
            counters: Arc::new(Counters::default()),
            worker: None,
        }
    }

    /// Sets the size reported to the driver (default 80x24).
    pub fn with_size(mut self, cols: u16, rows: u16) -> Console {
        self.cols = cols;
        self.rows = rows;
        self
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..2].copy_from_slice(&self.cols.to_le_bytes());
        c[2..4].copy_from_slice(&self.rows.to_le_bytes());
        // max_nr_ports and emerg_wr only exist with MULTIPORT / EMERG_WRITE.
        c
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_CONSOLE_F_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn QueueInterrupt>,
        queues: Vec<ActiveQueue>,
        _features: u64,
    ) -> Result<(), ActivateError> {
        self.reset();
        let handler = ConsoleHandler::new(
            self.output.clone(),
            self.input.clone(),
            self.counters.clone(),
        );
        // The handler manages EVENT_IDX itself (see the module docs); the
        // queues know whether it was negotiated.
        self.worker = Some(Worker::spawn(
            "virtio-console".to_string(),
            handler,
            queues,
            mem,
            interrupt,
            false,
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("tx_bytes".to_string(), c.tx_bytes.load(Ordering::Relaxed)),
            ("rx_bytes".to_string(), c.rx_bytes.load(Ordering::Relaxed)),
            (
                "rx_dropped".to_string(),
                c.rx_dropped.load(Ordering::Relaxed),
            ),
        ])
    }
}

/// Serves both queues on the worker thread.
struct ConsoleHandler {
    output: Output,
    input: Option<Arc<File>>,
    pending: VecDeque<u8>,
    counters: Arc<Counters>,
    buf: Vec<u8>,
    output_error_logged: bool,
}

impl ConsoleHandler {
    fn new(output: Output, input: Option<Arc<File>>, counters: Arc<Counters>) -> Self {
        ConsoleHandler {
            output,
            input,
            pending: VecDeque::new(),
            counters,
            buf: Vec::new(),
            output_error_logged: false,
        }
    }

    /// Queues host input for the guest, dropping what does not fit.
    fn push_input(&mut self, data: &[u8]) {
        let room = MAX_PENDING_INPUT - self.pending.len();
        let keep = data.len().min(room);
        self.pending.extend(&data[..keep]);
        let dropped = (data.len() - keep) as u64;
        if dropped > 0 {
            self.counters
                .rx_dropped
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Writes every transmit chain to the output.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        let mut wrote = false;
        let mut out = self.output.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let mut budget = MAX_TX_BYTES_PER_REQUEST;
                for desc in chain.readable() {
                    let len = (desc.len() as usize).min(budget);
                    if len == 0 {
                        if budget == 0 {
                            break;
                        }
                        continue;
                    }
                    if self.buf.len() < len {
                        self.buf.resize(len, 0);
                    }
                    if let Err(e) = mem.read_slice(&mut self.buf[..len], desc.addr()) {
                        log::debug!("virtio-console: bad transmit buffer: {e}");
                        break;
                    }
                    budget -= len;
                    self.counters
                        .tx_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                    match out.write_all(&self.buf[..len]) {
                        Ok(()) => {
                            wrote = true;
                            self.output_error_logged = false;
                        }
                        Err(e) => {
                            if !self.output_error_logged {
                                log::warn!("virtio-console: cannot write output: {e}");
                                self.output_error_logged = true;
                            }
                        }
                    }
                }
                used |= return_chain(queue, mem, head, 0);
            }
            if !rearm(queue, mem) {
                break;
            }
        }
        if wrote {
            if let Err(e) = out.flush() {
                if !self.output_error_logged {
                    log::warn!("virtio-console: cannot flush output: {e}");
                    self.output_error_logged = true;
                }
            }
        }
        used
    }

    /// Copies pending input into receive buffers while there are both.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while !self.pending.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Out of buffers: ask the driver to say when it adds some
                // (and go on if it did meanwhile).
                if rearm(queue, mem) {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            'descs: for desc in chain.writable() {
                let mut addr = desc.addr();
                let mut space = desc.len() as usize;
                while space > 0 {
                    let (front, _) = self.pending.as_slices();
                    if front.is_empty() {
                        break 'descs;
                    }
                    let n = front.len().min(space);
                    if let Err(e) = mem.write_slice(&front[..n], addr) {
                        log::debug!("virtio-console: bad receive buffer: {e}");
                        break 'descs;
                    }
                    self.pending.drain(..n);
                    written += n;
                    space -= n;
                    let Some(next) = addr.0.checked_add(n as u64) else {
                        break 'descs;
                    };
                    addr = GuestAddress(next);
                }
            }
            self.counters
                .rx_bytes
                .fetch_add(written as u64, Ordering::Relaxed);
            // At most MAX_PENDING_INPUT bytes, which fits in a u32.
            used |= return_chain(queue, mem, head, written as u32);
        }
        used
    }
}

/// Puts a chain in the used ring; false if the driver's ring refused it.
fn return_chain(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("virtio-console: cannot return chain {head}: {e}");
            false
        }
    }
}

/// Once a queue is drained: with EVENT_IDX, asks the driver to notify at its
/// next buffer and returns true if buffers arrived in the meantime. Also
/// recovers from a driver whose available index ran more than a ring ahead
/// (no chain can be popped then, and the queue would look busy forever).
fn rearm(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if skip_corrupt_avail(queue, mem, "virtio-console") {
        return false;
    }
    queue.event_idx_enabled() && queue.enable_notification(mem).unwrap_or(false)
}

impl QueueHandler for ConsoleHandler {
    fn process(&mut self, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            _ => false,
        }
    }

    fn input_fd(&self) -> Option<RawFd> {
        self.input.as_ref().map(|f| f.as_raw_fd())
    }

    fn input_ready(&mut self) -> bool {
        let Some(input) = self.input.clone() else {
            return false;
        };
        let mut chunk = [0u8; INPUT_CHUNK];
        match (&*input).read(&mut chunk) {
            Ok(0) => {
                log::debug!("virtio-console: end of input");
                false
            }
            Ok(n) => {
                self.push_input(&chunk[..n]);
                true
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                true
            }
            Err(e) => {
                log::warn!("virtio-console: cannot read input: {e}; ignoring further input");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EventFd;

    use crate::test_util::{add_chains, thread_cpu_time, used, W};

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A Write whose bytes the test can look at.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn handler(out: &Captured, input: Option<File>) -> ConsoleHandler {
        ConsoleHandler::new(
            Arc::new(Mutex::new(Box::new(out.clone()))),
            input.map(Arc::new),
            Arc::new(Counters::default()),
        )
    }

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array on success.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(r, 0);
        // SAFETY: the fds are fresh and owned by nothing else.
        unsafe {
            (
                File::from(OwnedFd::from_raw_fd(fds[0])),
                File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        }
    }

    #[test]
    fn transmits_readable_descriptors() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        mem.write_slice(b"hello, ", GuestAddress(0x1_0000)).unwrap();
        mem.write_slice(b"world\n", GuestAddress(0x2_0000)).unwrap();
        mem.write_slice(b"bye\n", GuestAddress(0x3_0000)).unwrap();
        add_chains(
            &vq,
            0,
            &[
                &[(0x1_0000, 7, 0), (0x2_0000, 6, 0), (0x5_0000, 100, W)],
                &[(0x3_0000, 4, 0)],
                // Outside guest memory: ignored, but returned.
                &[(0xfff_0000, 4, 0)],
                // Empty.
                &[(0x3_0000, 0, 0)],
            ],
        );
        let out = Captured::default();
        let mut h = handler(&out, None);
        assert!(h.process(TX_QUEUE, &mut q, &mem));
        assert_eq!(&*out.0.lock().unwrap(), b"hello, world\nbye\n");
        assert_eq!(used(&vq), vec![(0, 0), (3, 0), (4, 0), (5, 0)]);
        assert_eq!(h.counters.tx_bytes.load(Ordering::Relaxed), 17);
    }

    #[test]
    fn transmit_is_bounded_per_chain() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        add_chains(&vq, 0, &[&[(0x1_0000, 0x8000, 0), (0x1_0000, 0xf000, 0)]]);
        let out = Captured::default();
        let mut h = handler(&out, None);
        assert!(h.process(TX_QUEUE, &mut q, &mem));
        assert_eq!(out.0.lock().unwrap().len(), MAX_TX_BYTES_PER_REQUEST);
        assert_eq!(used(&vq), vec![(0, 0)]);
    }

    #[test]
    fn delivers_input_into_receive_buffers() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let (r, mut w) = pipe();
        let out = Captured::default();
        let mut h = handler(&out, Some(r));
        assert!(h.input_fd().is_some());

        // Buffers but no input: nothing is used.
        let next = add_chains(&vq, 0, &[&[(0x1_0000, 4, W), (0x2_0000, 8, W)]]);
        assert!(!h.process(RX_QUEUE, &mut q, &mem));
        assert!(used(&vq).is_empty());

        w.write_all(b"0123456789abcdef").unwrap();
        assert!(h.input_ready());
        assert!(h.process(RX_QUEUE, &mut q, &mem));
        assert_eq!(used(&vq), vec![(0, 12)]);
        let mut b = [0u8; 8];
        mem.read_slice(&mut b[..4], GuestAddress(0x1_0000)).unwrap();
        assert_eq!(&b[..4], b"0123");
        mem.read_slice(&mut b, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(&b, b"456789ab");

        // The rest waits for the next buffer; a readable descriptor is skipped.
        assert!(!h.process(RX_QUEUE, &mut q, &mem));
        add_chains(&vq, next, &[&[(0x3_0000, 2, 0), (0x4_0000, 64, W)]]);
        assert!(h.process(RX_QUEUE, &mut q, &mem));
        assert_eq!(used(&vq), vec![(0, 12), (2, 4)]);
        mem.read_slice(&mut b[..4], GuestAddress(0x4_0000)).unwrap();
        assert_eq!(&b[..4], b"cdef");
        assert_eq!(h.counters.rx_bytes.load(Ordering::Relaxed), 16);

        // End of input: stop watching.
        drop(w);
        assert!(!h.input_ready());
    }

    #[test]
    fn bad_receive_buffer_keeps_the_input() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let out = Captured::default();
        let mut h = handler(&out, None);
        h.push_input(b"xyz");
        add_chains(
            &vq,
            0,
            &[
                &[(0xfff_0000, 16, W)],
                &[(0xf_fffe, 16, W)],
                &[(0x1000, 16, W)],
            ],
        );
        assert!(h.process(RX_QUEUE, &mut q, &mem));
        assert_eq!(used(&vq), vec![(0, 0), (1, 0), (2, 3)]);
        let mut b = [0u8; 3];
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"xyz");
    }

    #[test]
    fn pending_input_is_bounded() {
        let out = Captured::default();
        let mut h = handler(&out, None);
        h.push_input(&vec![b'a'; MAX_PENDING_INPUT - 10]);
        h.push_input(&[b'b'; 30]);
        assert_eq!(h.pending.len(), MAX_PENDING_INPUT);
        assert_eq!(h.counters.rx_dropped.load(Ordering::Relaxed), 20);
    }

    #[test]
    fn corrupt_available_index_does_not_wedge_the_queue() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        // The driver claims 1000 new chains on a 16-entry ring.
        vq.avail().idx().store(1000);
        let out = Captured::default();
        let mut h = handler(&out, None);
        assert!(!h.process(TX_QUEUE, &mut q, &mem));
        assert_eq!(q.next_avail(), 1000);
        // The queue works again once the driver behaves.
        add_chains(&vq, 0, &[&[(0x1000, 0, 0)]]);
        assert!(h.process(TX_QUEUE, &mut q, &mem));
    }

    #[test]
    fn config_reports_size() {
        let c = Console::new(Box::new(io::sink()), None).with_size(132, 43);
        assert_eq!(c.device_type(), 3);
        assert_eq!(c.queue_max_sizes(), vec![256, 256]);
        assert_eq!(c.features(), 1);
        let mut d = [0xffu8; 6];
        c.read_config(0, &mut d);
        assert_eq!(d, [132, 0, 43, 0, 0, 0]);
        let mut d = [0xffu8; 2];
        c.read_config(2, &mut d);
        assert_eq!(d, [43, 0]);
        c.read_config(11, &mut d);
        assert_eq!(d, [0, 0]);
        c.read_config(u64::MAX, &mut d);
        assert_eq!(d, [0, 0]);
    }

    /// With EVENT_IDX and receive buffers posted but no input, the worker
    /// must sleep rather than spin, and must still deliver output and input.
    #[test]
    fn worker_with_event_idx_and_idle_receive_buffers() {
        let mem = memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x9_0000), 16);
        let mut rx: Queue = rxq.create_queue().unwrap();
        let mut tx: Queue = txq.create_queue().unwrap();
        rx.set_event_idx(true);
        tx.set_event_idx(true);
        add_chains(&rxq, 0, &[&[(0x1_0000, 64, W)]]);
        let rx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let tx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let queues = vec![
            ActiveQueue {
                index: RX_QUEUE,
                queue: rx,
                notify: rx_kick.try_clone().unwrap(),
            },
            ActiveQueue {
                index: TX_QUEUE,
                queue: tx,
                notify: tx_kick.try_clone().unwrap(),
            },
        ];
        let (r, mut w) = pipe();
        let out = Captured::default();
        let mut console = Console::new(Box::new(out.clone()), Some(r));
        console
            .activate(
                mem.clone(),
                Arc::new(crate::test_util::CountingInterrupt::default()),
                queues,
                1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
            )
            .unwrap();
        rx_kick.write(1).unwrap();

        // Give a spinning worker time to show up in its CPU time.
        let cpu_before = thread_cpu_time("virtio-console");
        std::thread::sleep(Duration::from_millis(300));
        let spent = thread_cpu_time("virtio-console") - cpu_before;
        assert!(spent < 100, "worker used {spent} ms of CPU while idle");

        mem.write_slice(b"out", GuestAddress(0x2_0000)).unwrap();
        add_chains(&txq, 0, &[&[(0x2_0000, 3, 0)]]);
        tx_kick.write(1).unwrap();
        w.write_all(b"in").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while (out.0.lock().unwrap().len() < 3 || rxq.used().idx().load() < 1)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*out.0.lock().unwrap(), b"out");
        assert_eq!(used(&rxq), vec![(0, 2)]);
        console.reset();
    }
}
