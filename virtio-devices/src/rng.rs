//! virtio-rng, the entropy device (type 4): one request queue whose chains
//! are device-writable buffers the device fills with bytes from a host
//! source, normally `/dev/urandom`.
//!
//! Every request is bounded ([`MAX_BYTES_PER_REQUEST`]): a driver asking for
//! more gets that much, and the used length tells it how much it got.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use crate::device::{ActivateError, ActiveQueue, QueueInterrupt, VirtioDevice};
use crate::worker::{skip_corrupt_avail, QueueHandler, Worker};
use crate::GuestMemoryMmap;

/// The size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most entropy one request gets.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    requests: AtomicU64,
}

/// A virtio-rng device reading from a host entropy source.
pub struct Rng {
    path: PathBuf,
    source: Arc<File>,
    counters: Arc<Counters>,
    worker: Option<Worker>,
}

impl Rng {
    /// Opens `source` (e.g. `/dev/urandom`) once; it is read for every request.
    pub fn new(source: PathBuf) -> io::Result<Rng> {
        let file = File::open(&source).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open entropy source {}: {e}", source.display()),
            )
        })?;
        Ok(Rng {
            path: source,
            source: Arc::new(file),
            counters: Arc::new(Counters::default()),
            worker: None,
        })
    }

    /// The entropy source's path.
    pub fn source(&self) -> &Path {
        &self.path
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn QueueInterrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        self.reset();
        let handler = RngHandler::new(self.source.clone(), self.counters.clone());
        let event_idx = features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.worker = Some(Worker::spawn(
            "virtio-rng".to_string(),
            handler,
            queues,
            mem,
            interrupt,
            event_idx,
        )?);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::from([
            (
                "entropy_bytes".to_string(),
                self.counters.bytes.load(Ordering::Relaxed),
            ),
            (
                "requests".to_string(),
                self.counters.requests.load(Ordering::Relaxed),
            ),
        ])
    }
}

/// Serves the request queue on the worker thread.
struct RngHandler {
    source: Arc<File>,
    counters: Arc<Counters>,
    buf: Vec<u8>,
}

impl RngHandler {
    fn new(source: Arc<File>, counters: Arc<Counters>) -> Self {
        RngHandler {
            source,
            counters,
            buf: Vec::new(),
        }
    }

    /// Fills the chain's device-writable descriptors, in order, and returns
    /// how many bytes it wrote. It stops at the first descriptor it cannot
    /// fill completely (outside guest memory, source exhausted), so that the
    /// used length always covers a prefix of the writable buffer.
    fn fill(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let mut written = 0usize;
        for desc in chain.writable() {
            let want = (desc.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
            if want == 0 {
                if written == MAX_BYTES_PER_REQUEST {
                    break;
                }
                continue;
            }
            if !GuestMemoryBackend::check_range(mem, desc.addr(), want) {
                log::debug!(
                    "virtio-rng: buffer {:#x}+{want} is outside guest memory",
                    desc.addr().0
                );
                break;
            }
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            let got = read_full(&self.source, &mut self.buf[..want]);
            if got > 0 {
                if let Err(e) = mem.write_slice(&self.buf[..got], desc.addr()) {
                    log::debug!("virtio-rng: cannot fill guest buffer: {e}");
                    break;
                }
                written += got;
            }
            if got < want {
                break;
            }
        }
        // At most MAX_BYTES_PER_REQUEST, which fits in a u32.
        written as u32
    }
}

/// Reads until `buf` is full, the source ends, or it fails; returns the
/// number of bytes read.
fn read_full(mut source: &File, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match source.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("virtio-rng: reading the entropy source failed: {e}");
                break;
            }
        }
    }
    done
}

impl QueueHandler for RngHandler {
    fn process(&mut self, _index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.fill(chain, mem);
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes
                .fetch_add(u64::from(len), Ordering::Relaxed);
            match queue.add_used(mem, head, len) {
                Ok(()) => used = true,
                Err(e) => log::debug!("virtio-rng: cannot return chain {head}: {e}"),
            }
        }
        skip_corrupt_avail(queue, mem, "virtio-rng");
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use crate::test_util::{add_chains, used, W};

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn source_file(content: &[u8]) -> (PathBuf, Arc<File>) {
        let path = std::env::temp_dir().join(format!(
            "kite-rng-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(content)
            .unwrap();
        let file = File::open(&path).unwrap();
        (path, Arc::new(file))
    }

    #[test]
    fn fills_writable_buffers_from_urandom() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        // Two writable descriptors in one chain, one in another; a readable
        // one is skipped.
        add_chains(
            &vq,
            0,
            &[
                &[(0x1_0000, 0, 0), (0x2_0000, 100, W), (0x3_0000, 28, W)],
                &[(0x4_0000, 4096, W)],
            ],
        );
        let rng = Rng::new(PathBuf::from("/dev/urandom")).unwrap();
        let mut h = RngHandler::new(rng.source.clone(), rng.counters.clone());
        assert!(h.process(0, &mut q, &mem));
        assert_eq!(used(&vq), vec![(0, 128), (3, 4096)]);
        let mut page = vec![0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(0x4_0000)).unwrap();
        assert!(page.iter().any(|&b| b != 0));
        assert_eq!(rng.counters()["entropy_bytes"], 4224);
        assert_eq!(rng.counters()["requests"], 2);
    }

    #[test]
    fn requests_are_bounded_and_bad_buffers_stop_the_fill() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        add_chains(
            &vq,
            0,
            &[
                // Asks for 192 KiB; gets 64 KiB.
                &[
                    (0x1_0000, 0x1_0000, W),
                    (0x2_0000, 0x1_0000, W),
                    (0x3_0000, 0x1_0000, W),
                ],
                // Second buffer outside guest memory: only the first counts.
                &[(0x5_0000, 16, W), (0xffff_0000, 16, W), (0x5_1000, 16, W)],
                // Partly outside guest memory.
                &[(0xf_fff0, 0x20, W)],
                // Nothing writable at all.
                &[(0x6_0000, 16, 0)],
            ],
        );
        let (path, file) = source_file(&[7u8; 256 * 1024]);
        let mut h = RngHandler::new(file, Arc::new(Counters::default()));
        assert!(h.process(0, &mut q, &mem));
        assert_eq!(used(&vq), vec![(0, 0x1_0000), (3, 16), (6, 0), (7, 0)]);
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(b, [0; 4]);
        mem.read_slice(&mut b, GuestAddress(0x1_fffc)).unwrap();
        assert_eq!(b, [7; 4]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn exhausted_source_reports_what_it_wrote() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        add_chains(&vq, 0, &[&[(0x1_0000, 100, W)], &[(0x2_0000, 100, W)]]);
        let (path, file) = source_file(&[1u8; 30]);
        let mut h = RngHandler::new(file, Arc::new(Counters::default()));
        assert!(h.process(0, &mut q, &mem));
        assert_eq!(used(&vq), vec![(0, 30), (1, 0)]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn descriptor_loop_terminates() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        // Descriptor 0 points at itself.
        let d = Descriptor::new(0x1_0000, 16, W | VRING_DESC_F_NEXT as u16, 0);
        vq.add_desc_chains(&[RawDescriptor::from(d)], 0).unwrap();
        let (path, file) = source_file(&[2u8; 4096]);
        let mut h = RngHandler::new(file, Arc::new(Counters::default()));
        assert!(h.process(0, &mut q, &mem));
        // The TTL stops the walk after queue-size descriptors.
        assert_eq!(used(&vq), vec![(0, 16 * 16)]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn corrupt_available_index_is_skipped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        vq.avail().idx().store(40);
        let (path, file) = source_file(&[2u8; 16]);
        let mut h = RngHandler::new(file, Arc::new(Counters::default()));
        assert!(!h.process(0, &mut q, &mem));
        assert_eq!(q.next_avail(), 40);
        // So the worker's EVENT_IDX loop sees nothing pending.
        assert!(!q.enable_notification(&mem).unwrap());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn missing_source_is_an_error() {
        let err = match Rng::new(PathBuf::from("/nonexistent/kite-rng")) {
            Err(e) => e,
            Ok(_) => panic!("opened a missing source"),
        };
        assert!(err.to_string().contains("/nonexistent/kite-rng"));
    }

    #[test]
    fn device_identity() {
        let rng = Rng::new(PathBuf::from("/dev/urandom")).unwrap();
        assert_eq!(rng.device_type(), 4);
        assert_eq!(rng.queue_max_sizes(), vec![256]);
        assert_eq!(rng.features(), 0);
        let mut cfg = [0xffu8; 4];
        rng.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 4]);
    }
}
