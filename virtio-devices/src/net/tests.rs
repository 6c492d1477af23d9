use super::*;
use crate::test_util::{add_chains, thread_cpu_time, used, CountingInterrupt, W};
use std::collections::VecDeque;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_queue::mock::MockSplitQueue;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b
}

/// A frame as the TAP gives it: a header (flags, gso_type, the rest zero)
/// and `payload` bytes counting up from `seed`.
fn frame(flags: u8, gso_type: u8, payload: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = flags;
    f[1] = gso_type;
    // What a TAP leaves in num_buffers is whatever was in the buffer.
    f[10] = 0xee;
    f[11] = 0xee;
    f.extend((0..payload).map(|i| seed.wrapping_add(i as u8)));
    f
}

/// A TAP in memory: frames to hand the device, frames it wrote.
#[derive(Default)]
struct FakeTap {
    incoming: Mutex<VecDeque<Vec<u8>>>,
    written: Mutex<Vec<Vec<u8>>>,
    detached: AtomicBool,
    offload: Mutex<Option<u32>>,
    refuse_writes: AtomicBool,
}

impl FakeTap {
    fn push(&self, f: Vec<u8>) {
        self.incoming.lock().unwrap().push_back(f);
    }
    fn left(&self) -> usize {
        self.incoming.lock().unwrap().len()
    }
}

impl TapIo for FakeTap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.detached.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        match self.incoming.lock().unwrap().pop_front() {
            Some(f) if f.len() > buf.len() => Err(io::Error::from_raw_os_error(libc::EFAULT)),
            Some(f) => {
                buf[..f.len()].copy_from_slice(&f);
                Ok(f.len())
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        if self.refuse_writes.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.written.lock().unwrap().push(buf.to_vec());
        Ok(buf.len())
    }
    fn poll_fd(&self) -> RawFd {
        -1
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        *self.offload.lock().unwrap() = Some(flags);
        Ok(())
    }
    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        self.detached.store(!enabled, Ordering::SeqCst);
        Ok(())
    }
    fn queue_enabled(&self) -> bool {
        !self.detached.load(Ordering::SeqCst)
    }
    fn name(&self) -> &str {
        "fake"
    }
}

fn all_features() -> Negotiated {
    Negotiated {
        mrg_rxbuf: true,
        guest_csum: true,
        guest_tso4: true,
        guest_tso6: true,
        guest_ufo: true,
    }
}

fn handler(tap: &Arc<FakeTap>, features: Negotiated) -> RxTx {
    RxTx::new(
        tap.clone(),
        tap.clone(),
        Arc::new(Counters::default()),
        features,
    )
}

fn count(h: &RxTx, c: fn(&Counters) -> &AtomicU64) -> u64 {
    c(&h.counters).load(Ordering::Relaxed)
}

#[test]
fn transmits_gathered_chains() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    let f = frame(1, 0, 100, 7);
    // Header split across two descriptors, payload in two more.
    mem.write_slice(&f[..5], GuestAddress(0x1_0000)).unwrap();
    mem.write_slice(&f[5..40], GuestAddress(0x2_0000)).unwrap();
    mem.write_slice(&f[40..], GuestAddress(0x3_0000)).unwrap();
    let g = frame(0, 0, 60, 1);
    mem.write_slice(&g, GuestAddress(0x4_0000)).unwrap();
    add_chains(
        &vq,
        0,
        &[
            &[
                (0x1_0000, 5, 0),
                (0x2_0000, 35, 0),
                (0x9_0000, 0, 0),
                (0x3_0000, 72, 0),
            ],
            &[(0x4_0000, g.len() as u32, 0)],
        ],
    );
    let tap = Arc::new(FakeTap::default());
    let mut h = handler(&tap, all_features());
    assert_eq!(h.transmit(&mut q, &mem), (true, false));
    assert_eq!(*tap.written.lock().unwrap(), vec![f, g]);
    assert_eq!(used(&vq), vec![(0, 0), (4, 0)]);
    assert_eq!(count(&h, |c| &c.tx_frames), 2);
    assert_eq!(count(&h, |c| &c.tx_bytes), 160);
    assert_eq!(count(&h, |c| &c.tx_dropped), 0);
}

#[test]
fn hostile_transmit_chains_cost_only_their_frame() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 64);
    let mut q: Queue = vq.create_queue().unwrap();
    let good = frame(0, 0, 64, 3);
    mem.write_slice(&good, GuestAddress(0x5_0000)).unwrap();
    add_chains(
        &vq,
        0,
        &[
            // A device-writable descriptor.
            &[(0x1_0000, 64, 0), (0x2_0000, 64, W)],
            // Outside guest memory.
            &[(0x1_0000, 12, 0), (0xfff_0000, 64, 0)],
            // Partly outside guest memory.
            &[(0x1f_ffe0, 0x40, 0)],
            // Over the size limit: 3 x 32 KiB.
            &[
                (0x8_0000, 0x8000, 0),
                (0x8_0000, 0x8000, 0),
                (0x8_0000, 0x8000, 0),
            ],
            // Only a header.
            &[(0x1_0000, 12, 0)],
            // Empty.
            &[(0x1_0000, 0, 0)],
            // And a good one after all that.
            &[(0x5_0000, good.len() as u32, 0)],
        ],
    );
    let tap = Arc::new(FakeTap::default());
    let mut h = handler(&tap, all_features());
    assert_eq!(h.transmit(&mut q, &mem), (true, false));
    assert_eq!(*tap.written.lock().unwrap(), vec![good]);
    assert_eq!(
        used(&vq),
        vec![(0, 0), (2, 0), (4, 0), (5, 0), (8, 0), (9, 0), (10, 0)]
    );
    assert_eq!(count(&h, |c| &c.tx_dropped), 6);
    assert_eq!(count(&h, |c| &c.tx_frames), 1);

    // A TAP that refuses frames costs them too, and the queue goes on.
    tap.refuse_writes.store(true, Ordering::SeqCst);
    add_chains(&vq, 11, &[&[(0x5_0000, 76, 0)]]);
    assert_eq!(h.transmit(&mut q, &mem), (true, false));
    assert_eq!(count(&h, |c| &c.tx_dropped), 7);
    assert_eq!(used(&vq).len(), 8);
}

#[test]
fn transmit_yields_after_its_budget() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 512);
    let mut q: Queue = vq.create_queue().unwrap();
    let f = frame(0, 0, 50, 9);
    mem.write_slice(&f, GuestAddress(0x1_0000)).unwrap();
    let chain: &[(u64, u32, u16)] = &[(0x1_0000, f.len() as u32, 0)];
    add_chains(&vq, 0, &vec![chain; 300]);
    let tap = Arc::new(FakeTap::default());
    let mut h = handler(&tap, all_features());
    assert_eq!(h.transmit(&mut q, &mem), (true, true));
    assert_eq!(tap.written.lock().unwrap().len(), TX_BUDGET);
    assert_eq!(h.transmit(&mut q, &mem), (true, false));
    assert_eq!(tap.written.lock().unwrap().len(), 300);
}

#[test]
fn transmit_uses_the_first_queue_while_detached() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    let f = frame(0, 0, 50, 9);
    mem.write_slice(&f, GuestAddress(0x1_0000)).unwrap();
    add_chains(&vq, 0, &[&[(0x1_0000, f.len() as u32, 0)]]);
    let own = Arc::new(FakeTap::default());
    own.set_queue_enabled(false).unwrap();
    let first = Arc::new(FakeTap::default());
    let mut h = RxTx::new(
        own.clone(),
        first.clone(),
        Arc::new(Counters::default()),
        all_features(),
    );
    assert_eq!(h.transmit(&mut q, &mem), (true, false));
    assert!(own.written.lock().unwrap().is_empty());
    assert_eq!(*first.written.lock().unwrap(), vec![f]);
}

#[test]
fn receives_into_one_buffer_without_mergeable_buffers() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chains(
        &vq,
        0,
        &[
            &[(0x1_0000, 2048, W)],
            &[(0x2_0000, 8, W), (0x3_0000, 2040, W)],
        ],
    );
    let tap = Arc::new(FakeTap::default());
    let f1 = frame(2, 0, 100, 1);
    let f2 = frame(0, 0, 1500, 2);
    tap.push(f1.clone());
    tap.push(f2.clone());
    let features = Negotiated {
        mrg_rxbuf: false,
        ..all_features()
    };
    let mut h = handler(&tap, features);
    assert_eq!(h.receive(&mut q, &mem), (true, RxState::Ready));
    assert_eq!(used(&vq), vec![(0, 112), (1, 1512)]);
    let mut expect = f1.clone();
    expect[10..12].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(read(&mem, 0x1_0000, 112), expect);
    // The second frame spans the chain's two descriptors.
    let mut expect = f2.clone();
    expect[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut got = read(&mem, 0x2_0000, 8);
    got.extend(read(&mem, 0x3_0000, 1504));
    assert_eq!(got, expect);
    assert_eq!(count(&h, |c| &c.rx_frames), 2);
    assert_eq!(count(&h, |c| &c.rx_bytes), 1600);
}

#[test]
fn mergeable_buffers_take_a_frame_in_pieces() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chains(
        &vq,
        0,
        &[
            &[(0x1_0000, 1024, W)],
            &[(0x2_0000, 1024, W)],
            &[(0x3_0000, 1024, W)],
            &[(0x4_0000, 1024, W)],
        ],
    );
    let tap = Arc::new(FakeTap::default());
    let f = frame(1, 0, 3000, 5);
    tap.push(f.clone());
    let mut h = handler(&tap, all_features());
    assert_eq!(h.receive(&mut q, &mem), (true, RxState::Ready));
    assert_eq!(used(&vq), vec![(0, 1024), (1, 1024), (2, 964)]);
    let mut got = read(&mem, 0x1_0000, 1024);
    got.extend(read(&mem, 0x2_0000, 1024));
    got.extend(read(&mem, 0x3_0000, 964));
    let mut expect = f;
    expect[10..12].copy_from_slice(&3u16.to_le_bytes());
    assert_eq!(got, expect);
    // The fourth buffer is left for the next frame.
    assert_eq!(q.next_avail(), 3);
}

#[test]
fn frame_waits_for_buffers_and_the_tap_is_not_drained() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    let tap = Arc::new(FakeTap::default());
    tap.push(frame(0, 0, 500, 1));
    tap.push(frame(0, 0, 600, 2));
    tap.push(frame(0, 0, 700, 3));
    let mut h = handler(&tap, all_features());

    // No buffers: the first frame waits, the others stay in the TAP.
    assert_eq!(h.receive(&mut q, &mem), (false, RxState::WaitingForBuffers));
    assert_eq!(h.pending, Some(512));
    assert_eq!(tap.left(), 2);

    // One buffer: the first frame goes, the second waits.
    let next = add_chains(&vq, 0, &[&[(0x1_0000, 4096, W)]]);
    assert_eq!(h.receive(&mut q, &mem), (true, RxState::WaitingForBuffers));
    assert_eq!(used(&vq), vec![(0, 512)]);
    assert_eq!(h.pending, Some(612));
    assert_eq!(tap.left(), 1);

    // Not enough room (mergeable): the buffer is given back, untouched.
    let next = add_chains(&vq, next, &[&[(0x2_0000, 300, W)]]);
    assert_eq!(h.receive(&mut q, &mem), (false, RxState::WaitingForBuffers));
    assert_eq!(q.next_avail(), 1);
    assert_eq!(used(&vq).len(), 1);

    // Enough now: both remaining frames go, none is dropped.
    add_chains(&vq, next, &[&[(0x3_0000, 4096, W)], &[(0x4_0000, 4096, W)]]);
    assert_eq!(h.receive(&mut q, &mem), (true, RxState::Ready));
    assert_eq!(used(&vq), vec![(0, 512), (1, 300), (2, 312), (3, 712)]);
    assert_eq!(read(&mem, 0x1_0000, 12)[10..12], 1u16.to_le_bytes());
    assert_eq!(read(&mem, 0x2_0000, 12)[10..12], 2u16.to_le_bytes());
    assert_eq!(read(&mem, 0x2_0000 + 12, 1), vec![2]);
    assert_eq!(read(&mem, 0x4_0000 + 12, 1), vec![3]);
    assert_eq!(h.pending, None);
    assert_eq!(count(&h, |c| &c.rx_frames), 3);
    assert_eq!(count(&h, |c| &c.rx_dropped), 0);
}

#[test]
fn waiting_with_event_idx_asks_for_a_notification_at_the_next_buffer() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    let tap = Arc::new(FakeTap::default());
    tap.push(frame(0, 0, 3000, 1));
    let mut h = handler(&tap, all_features());
    add_chains(&vq, 0, &[&[(0x1_0000, 1024, W)], &[(0x2_0000, 1024, W)]]);
    assert_eq!(h.receive(&mut q, &mem), (false, RxState::WaitingForBuffers));
    assert_eq!(q.next_avail(), 0);
    // avail_event (after the used ring) is the driver's current index, 2:
    // its next buffer makes it notify.
    let avail_event = vq.used_addr().0 + 4 + 8 * 16;
    assert_eq!(mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 2);
}

#[test]
fn hostile_receive_chains_cost_only_their_frame() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 32);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chains(
        &vq,
        0,
        &[
            // A device-readable descriptor.
            &[(0x1_0000, 16, 0), (0x2_0000, 4096, W)],
            // Outside guest memory.
            &[(0xfff_0000, 4096, W)],
            // Partly outside guest memory.
            &[(0x1f_ffe0, 0x1000, W)],
            // Nothing writable.
            &[(0x1_0000, 0, W)],
            // A first buffer too small for the header.
            &[(0x1_0000, 8, W)],
            // Good.
            &[(0x3_0000, 4096, W)],
        ],
    );
    let tap = Arc::new(FakeTap::default());
    for i in 0..6 {
        tap.push(frame(0, 0, 100, i));
    }
    let mut h = handler(&tap, all_features());
    assert_eq!(h.receive(&mut q, &mem), (true, RxState::Ready));
    assert_eq!(
        used(&vq),
        vec![(0, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 112)]
    );
    assert_eq!(read(&mem, 0x3_0000 + 12, 1), vec![5]);
    assert_eq!(count(&h, |c| &c.rx_dropped), 5);
    assert_eq!(count(&h, |c| &c.rx_frames), 1);
    assert_eq!(h.pending, None);
}

#[test]
fn frames_the_driver_can_never_take_are_dropped() {
    let mem = memory();
    // Without mergeable buffers, one chain must hold the whole frame.
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chains(&vq, 0, &[&[(0x1_0000, 1000, W)], &[(0x2_0000, 4096, W)]]);
    let tap = Arc::new(FakeTap::default());
    tap.push(frame(0, 0, 2000, 0));
    tap.push(frame(0, 0, 100, 1));
    let features = Negotiated {
        mrg_rxbuf: false,
        ..all_features()
    };
    let mut h = handler(&tap, features);
    assert_eq!(h.receive(&mut q, &mem), (true, RxState::Ready));
    assert_eq!(used(&vq), vec![(0, 0), (1, 112)]);
    assert_eq!(count(&h, |c| &c.rx_dropped), 1);

    // With them, a ring whose every buffer together is too small.
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 4);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chains(
        &vq,
        0,
        &[
            &[(0x1_0000, 100, W)],
            &[(0x2_0000, 100, W)],
            &[(0x3_0000, 100, W)],
            &[(0x4_0000, 100, W)],
        ],
    );
    tap.push(frame(0, 0, 1000, 0));
    let mut h = handler(&tap, all_features());
    let (_, state) = h.receive(&mut q, &mem);
    assert_eq!(state, RxState::Ready);
    assert_eq!(count(&h, |c| &c.rx_dropped), 1);
    assert_eq!(used(&vq), vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
}

#[test]
fn offloads_the_driver_did_not_accept_are_not_delivered() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chains(&vq, 0, &[&[(0x1_0000, 0x1_0000, W)]]);
    let tap = Arc::new(FakeTap::default());
    tap.push(frame(1, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 4000, 0));
    tap.push(frame(0, 0x80 | VIRTIO_NET_HDR_GSO_TCPV6 as u8, 4000, 0));
    tap.push(frame(2, 0, 100, 0));
    let features = Negotiated {
        mrg_rxbuf: true,
        ..Negotiated::default()
    };
    let mut h = handler(&tap, features);
    assert_eq!(h.receive(&mut q, &mem), (true, RxState::Ready));
    // The GSO frames were dropped without using a buffer; the last one
    // arrived with its DATA_VALID flag cleared (no GUEST_CSUM).
    assert_eq!(used(&vq), vec![(0, 112)]);
    assert_eq!(read(&mem, 0x1_0000, 1), vec![0]);
    assert_eq!(count(&h, |c| &c.rx_dropped), 2);
    assert_eq!(Negotiated::from_features(0).tun_offloads(), 0);
}

#[test]
fn tap_errors_and_odd_reads() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    add_chains(&vq, 0, &[&[(0x1_0000, 0x1_0000, W)]]);
    let tap = Arc::new(FakeTap::default());
    // Shorter than a header, and longer than any frame (EFAULT).
    tap.push(vec![0; 5]);
    tap.push(vec![0; VNET_HDR_LEN + MAX_FRAME_LEN + 100]);
    tap.push(frame(0, 0, 10, 4));
    let mut h = handler(&tap, all_features());
    assert_eq!(h.receive(&mut q, &mem), (true, RxState::Ready));
    assert_eq!(count(&h, |c| &c.rx_dropped), 2);
    assert_eq!(used(&vq), vec![(0, 22)]);
    // A detached queue cannot be read: stop polling it.
    tap.set_queue_enabled(false).unwrap();
    assert_eq!(h.receive(&mut q, &mem), (false, RxState::TapUnavailable));
}

#[test]
fn corrupt_available_index_does_not_wedge_receive() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    vq.avail().idx().store(1000);
    let tap = Arc::new(FakeTap::default());
    tap.push(frame(0, 0, 10, 0));
    let mut h = handler(&tap, all_features());
    assert_eq!(h.receive(&mut q, &mem), (false, RxState::WaitingForBuffers));
    assert_eq!(q.next_avail(), 1000);
    // Transmit too.
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    vq.avail().idx().store(500);
    assert_eq!(h.transmit(&mut q, &mem), (false, false));
    assert_eq!(q.next_avail(), 500);
}

#[test]
fn negotiated_offloads_become_tap_offloads() {
    let bits = |bs: &[u32]| bs.iter().fold(0u64, |f, b| f | 1 << b);
    let all = Negotiated::from_features(bits(&[
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
    ]));
    assert_eq!(
        all.tun_offloads(),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO
    );
    let csum = Negotiated::from_features(bits(&[VIRTIO_NET_F_GUEST_CSUM]));
    assert_eq!(csum.tun_offloads(), TUN_F_CSUM);
    // TSO without checksum offload is not a thing.
    let odd = Negotiated::from_features(bits(&[VIRTIO_NET_F_GUEST_TSO4]));
    assert_eq!(odd.tun_offloads(), 0);
    assert!(!odd.accepts_gso(VIRTIO_NET_HDR_GSO_TCPV4 as u8));
}

fn fake_taps(n: usize) -> Vec<Arc<FakeTap>> {
    (0..n).map(|_| Arc::new(FakeTap::default())).collect()
}

fn as_io(taps: &[Arc<FakeTap>]) -> Vec<Arc<dyn TapIo>> {
    taps.iter().map(|t| t.clone() as Arc<dyn TapIo>).collect()
}

#[test]
fn device_identity_and_config() {
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let net = Net::with_backends(
        "net0".into(),
        as_io(&fake_taps(1)),
        mac,
        Some(9000),
        Offloads::ALL,
        256,
    )
    .unwrap();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), vec![256, 256]);
    let f = net.features();
    let has = |b: u32| f & (1u64 << b) != 0;
    for b in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_GUEST_UFO,
    ] {
        assert!(has(b), "feature {b}");
    }
    assert!(!has(VIRTIO_NET_F_MQ) && !has(VIRTIO_NET_F_CTRL_VQ));
    let mut cfg = [0xffu8; 14];
    net.read_config(0, &mut cfg);
    assert_eq!(
        cfg,
        [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0x28, 0x23, 0, 0]
    );
    let mut b = [0u8; 2];
    net.read_config(10, &mut b);
    assert_eq!(u16::from_le_bytes(b), 9000);
    net.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0]);
    assert_eq!(net.mac(), mac);
    assert_eq!(
        net.counters().keys().collect::<Vec<_>>(),
        [
            "rx_bytes",
            "rx_dropped",
            "rx_frames",
            "tx_bytes",
            "tx_dropped",
            "tx_frames"
        ]
    );

    // Multiqueue, no MTU, no offloads.
    let net = Net::with_backends(
        "net1".into(),
        as_io(&fake_taps(3)),
        mac,
        None,
        Offloads::NONE,
        64,
    )
    .unwrap();
    assert_eq!(net.queue_max_sizes(), vec![64; 7]);
    let f = net.features();
    let has = |b: u32| f & (1u64 << b) != 0;
    assert!(has(VIRTIO_NET_F_MQ) && has(VIRTIO_NET_F_CTRL_VQ));
    assert!(!has(VIRTIO_NET_F_MTU) && !has(VIRTIO_NET_F_CSUM) && !has(VIRTIO_NET_F_GUEST_TSO4));
    net.read_config(8, &mut b);
    assert_eq!(u16::from_le_bytes(b), 3);

    // TSO without checksum offload is not offered.
    let net = Net::with_backends(
        "net2".into(),
        as_io(&fake_taps(1)),
        mac,
        None,
        Offloads {
            csum: false,
            tso: true,
            ufo: true,
        },
        64,
    )
    .unwrap();
    assert_eq!(net.features() & (1 << VIRTIO_NET_F_HOST_TSO4), 0);
}

#[test]
fn bad_device_settings_are_refused() {
    let mac = [2, 0, 0, 0, 0, 1];
    let make = |taps: usize, mac: [u8; 6], mtu, size| {
        Net::with_backends(
            "n".into(),
            as_io(&fake_taps(taps)),
            mac,
            mtu,
            Offloads::ALL,
            size,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    assert!(make(0, mac, None, 256).unwrap_err().contains("TAP queues"));
    assert!(make(1, mac, None, 100).unwrap_err().contains("queue_size"));
    assert!(make(1, mac, None, 2).unwrap_err().contains("queue_size"));
    assert!(make(1, [1, 0, 0, 0, 0, 0], None, 256)
        .unwrap_err()
        .contains("01:00:00:00:00:00 is not a unicast"));
    assert!(make(1, [0; 6], None, 256).is_err());
    assert!(make(1, mac, Some(10), 256).unwrap_err().contains("MTU 10"));
    make(1, mac, Some(68), 4).unwrap();
}

#[test]
fn random_macs_are_local_unicast() {
    let a = random_mac();
    let b = random_mac();
    for m in [a, b] {
        assert_eq!(m[0] & 0x03, 0x02, "{m:02x?}");
    }
    assert_ne!(a, b);
}

fn ctrl(taps: &[Arc<FakeTap>], mq: bool) -> CtrlHandler {
    CtrlHandler {
        id: "n".into(),
        taps: as_io(taps),
        wakes: taps.iter().map(|_| None).collect(),
        mq,
    }
}

#[test]
fn control_queue_sets_active_pairs() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 32);
    let mut q: Queue = vq.create_queue().unwrap();
    let taps = fake_taps(3);
    for t in &taps[1..] {
        t.set_queue_enabled(false).unwrap();
    }
    let mut h = ctrl(&taps, true);
    let cmd = |addr: u64, class: u8, cmd: u8, pairs: u16| {
        let mut c = vec![class, cmd];
        c.extend(pairs.to_le_bytes());
        mem.write_slice(&c, GuestAddress(addr)).unwrap();
    };
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    cmd(0x1_0000, mq, 0, 3);
    cmd(0x2_0000, mq, 0, 2);
    cmd(0x3_0000, mq, 0, 4);
    cmd(0x4_0000, mq, 0, 0);
    cmd(0x5_0000, 0, 0, 0); // VIRTIO_NET_CTRL_RX, not offered
    for a in [0x1_0100, 0x2_0100, 0x3_0100, 0x4_0100, 0x5_0100, 0x6_0100] {
        mem.write_obj(0xaau8, GuestAddress(a)).unwrap();
    }
    add_chains(
        &vq,
        0,
        &[
            // Header and data in separate descriptors.
            &[(0x1_0000, 2, 0), (0x1_0002, 2, 0), (0x1_0100, 1, W)],
            &[(0x2_0000, 4, 0), (0x2_0100, 1, W)],
            &[(0x3_0000, 4, 0), (0x3_0100, 1, W)],
            &[(0x4_0000, 4, 0), (0x4_0100, 1, W)],
            &[(0x5_0000, 4, 0), (0x5_0100, 1, W)],
            // Too short, and a readable descriptor after the ack.
            &[(0x1_0000, 1, 0), (0x6_0100, 1, W)],
            &[(0x1_0000, 4, 0), (0x6_0200, 1, W), (0x1_0000, 4, 0)],
            // No ack at all, and outside memory.
            &[(0x5_0000, 4, 0)],
            &[(0xfff_0000, 4, 0), (0x6_0300, 1, W)],
        ],
    );
    // The last command that worked set 2 pairs.
    assert!(h.process(6, &mut q, &mem));
    let ack = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
    assert_eq!(ack(0x1_0100), VIRTIO_NET_OK as u8);
    assert_eq!(ack(0x2_0100), VIRTIO_NET_OK as u8);
    for a in [0x3_0100, 0x4_0100, 0x5_0100, 0x6_0100, 0x6_0200, 0x6_0300] {
        assert_eq!(ack(a), VIRTIO_NET_ERR as u8, "{a:#x}");
    }
    let enabled: Vec<bool> = taps.iter().map(|t| t.queue_enabled()).collect();
    assert_eq!(enabled, [true, true, false]);
    assert_eq!(
        used(&vq),
        vec![
            (0, 1),
            (3, 1),
            (5, 1),
            (7, 1),
            (9, 1),
            (11, 1),
            (13, 1),
            (16, 0),
            (17, 1)
        ]
    );

    // Without MQ negotiated, the command is refused.
    let mut h = ctrl(&taps, false);
    assert_eq!(h.command(&[mq, 0, 1, 0]), VIRTIO_NET_ERR as u8);
    assert_eq!(h.command(&[]), VIRTIO_NET_ERR as u8);
}

/// A TAP stand-in over a datagram socket pair, for the worker thread.
struct SocketTap {
    sock: UnixDatagram,
    detached: AtomicBool,
}

impl TapIo for SocketTap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // Like a TAP queue, a detached one cannot be read.
        if self.detached.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        self.sock.recv(buf)
    }
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        self.sock.send(buf)
    }
    fn poll_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn set_offload(&self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        self.detached.store(!enabled, Ordering::SeqCst);
        Ok(())
    }
    fn queue_enabled(&self) -> bool {
        !self.detached.load(Ordering::SeqCst)
    }
    fn name(&self) -> &str {
        "socket"
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The whole device on its threads: frames from the host wait for receive
/// buffers and arrive once the driver posts them; transmitted frames reach
/// the host; interrupts are raised; reset stops the threads.
#[test]
fn device_moves_frames_on_its_threads() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x11_0000), 16);
    // No EVENT_IDX: MockSplitQueue puts the used ring over the avail
    // ring's used_event, so interrupt suppression would read garbage.
    let rx: Queue = rxq.create_queue().unwrap();
    let tx: Queue = txq.create_queue().unwrap();
    let (host, device) = UnixDatagram::pair().unwrap();
    device.set_nonblocking(true).unwrap();
    let tap = Arc::new(SocketTap {
        sock: device,
        detached: AtomicBool::new(false),
    });
    let mut net = Net::with_backends(
        "net0".into(),
        vec![tap as Arc<dyn TapIo>],
        [2, 0, 0, 0, 0, 1],
        None,
        Offloads::ALL,
        16,
    )
    .unwrap();
    let rx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let tx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupts = Arc::new(CountingInterrupt::default());
    let features = net.features();
    net.activate(
        mem.clone(),
        interrupts.clone(),
        vec![
            ActiveQueue {
                index: 0,
                queue: rx,
                notify: rx_kick.try_clone().unwrap(),
            },
            ActiveQueue {
                index: 1,
                queue: tx,
                notify: tx_kick.try_clone().unwrap(),
            },
        ],
        features,
    )
    .unwrap();

    // Frames from the host before there are buffers: they wait, and the
    // worker sleeps meanwhile rather than spin on the readable TAP.
    let f1 = frame(0, 0, 200, 1);
    let f2 = frame(0, 0, 300, 2);
    host.send(&f1).unwrap();
    host.send(&f2).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let cpu_before = thread_cpu_time("net0-net0");
    std::thread::sleep(Duration::from_millis(300));
    let spent = thread_cpu_time("net0-net0") - cpu_before;
    assert!(spent < 100, "worker used {spent} ms of CPU while waiting");
    assert_eq!(rxq.used().idx().load(), 0);
    let counters = net.counters();
    assert_eq!(counters["rx_frames"], 0);
    assert_eq!(counters["rx_dropped"], 0);

    add_chains(&rxq, 0, &[&[(0x1_0000, 4096, W)], &[(0x2_0000, 4096, W)]]);
    rx_kick.write(1).unwrap();
    wait_for("both frames", || rxq.used().idx().load() == 2);
    assert_eq!(used(&rxq), vec![(0, 212), (1, 312)]);
    assert_eq!(read(&mem, 0x2_0000 + 12, 300), f2[12..]);
    wait_for("the receive interrupt", || {
        interrupts.0.lock().unwrap().contains(&0)
    });

    // A frame from the guest.
    let g = frame(0, 0, 100, 9);
    mem.write_slice(&g, GuestAddress(0x3_0000)).unwrap();
    add_chains(&txq, 0, &[&[(0x3_0000, g.len() as u32, 0)]]);
    tx_kick.write(1).unwrap();
    let mut buf = vec![0u8; 1000];
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = host.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &g[..]);
    wait_for("the transmit chain", || txq.used().idx().load() == 1);
    wait_for("the transmit interrupt", || {
        interrupts.0.lock().unwrap().contains(&1)
    });
    let counters = net.counters();
    assert_eq!(counters["rx_frames"], 2);
    assert_eq!(counters["rx_bytes"], 500);
    assert_eq!(counters["tx_frames"], 1);
    assert_eq!(counters["tx_bytes"], 100);

    // More host frames than buffers: the third waits, none is lost.
    add_chains(&rxq, 2, &[&[(0x4_0000, 4096, W)]]);
    rx_kick.write(1).unwrap();
    for i in 0..3 {
        host.send(&frame(0, 0, 64, 10 + i)).unwrap();
    }
    wait_for("one more frame", || rxq.used().idx().load() == 3);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rxq.used().idx().load(), 3);
    add_chains(&rxq, 3, &[&[(0x5_0000, 4096, W)], &[(0x6_0000, 4096, W)]]);
    rx_kick.write(1).unwrap();
    wait_for("the waiting frames", || rxq.used().idx().load() == 5);
    assert_eq!(read(&mem, 0x6_0000 + 12, 1), vec![12]);
    assert_eq!(net.counters()["rx_dropped"], 0);

    net.reset();
    assert!(net.workers.is_empty());
}

/// Two pairs and the control queue: the second TAP queue is detached until
/// the driver asks for two pairs, and its worker then polls it.
#[test]
fn multiqueue_device_attaches_pairs_on_request() {
    let mem = memory();
    let mut queues = Vec::new();
    let mut mocks = Vec::new();
    let mut kicks = Vec::new();
    for i in 0..5u16 {
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x10_0000 + u64::from(i) * 0x1000), 16);
        let q: Queue = vq.create_queue().unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        queues.push(ActiveQueue {
            index: i,
            queue: q,
            notify: kick.try_clone().unwrap(),
        });
        mocks.push(vq);
        kicks.push(kick);
    }
    let mut hosts = Vec::new();
    let mut taps: Vec<Arc<SocketTap>> = Vec::new();
    for _ in 0..2 {
        let (host, device) = UnixDatagram::pair().unwrap();
        device.set_nonblocking(true).unwrap();
        hosts.push(host);
        taps.push(Arc::new(SocketTap {
            sock: device,
            detached: AtomicBool::new(false),
        }));
    }
    let mut net = Net::with_backends(
        "mq".into(),
        taps.iter().map(|t| t.clone() as Arc<dyn TapIo>).collect(),
        [2, 0, 0, 0, 0, 2],
        None,
        Offloads::ALL,
        16,
    )
    .unwrap();
    net.activate(
        mem.clone(),
        Arc::new(CountingInterrupt::default()),
        queues,
        net.features(),
    )
    .unwrap();
    assert!(taps[0].queue_enabled());
    assert!(!taps[1].queue_enabled());

    // Pair 1 has buffers; a frame on its (detached) queue is not read.
    add_chains(&mocks[2], 0, &[&[(0x1_0000, 4096, W)]]);
    kicks[2].write(1).unwrap();
    hosts[1].send(&frame(0, 0, 50, 1)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(mocks[2].used().idx().load(), 0);

    // VQ_PAIRS_SET 2 on the control queue.
    mem.write_slice(&[VIRTIO_NET_CTRL_MQ as u8, 0, 2, 0], GuestAddress(0x2_0000))
        .unwrap();
    add_chains(&mocks[4], 0, &[&[(0x2_0000, 4, 0), (0x2_0100, 1, W)]]);
    kicks[4].write(1).unwrap();
    wait_for("the control command", || mocks[4].used().idx().load() == 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x2_0100)).unwrap(),
        VIRTIO_NET_OK as u8
    );
    assert!(taps[1].queue_enabled());
    wait_for("the frame on pair 1", || mocks[2].used().idx().load() == 1);
    net.reset();
}
