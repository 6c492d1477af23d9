//! virtio-net (type 1) over a TAP interface.
//!
//! # Queues and threads
//!
//! Queues are `rx0, tx0, rx1, tx1, ...` and, with more than one queue pair,
//! a control queue last. Each pair has its own TAP queue ([`Tap`]) and its
//! own worker thread, which sleeps in epoll on the pair's two notify
//! eventfds, its TAP descriptor, a stop eventfd and a wake eventfd (used
//! when the control queue changes the active pairs). The control queue is
//! served by a [`Worker`] of its own.
//!
//! # Frames
//!
//! Every frame, both ways, starts with the 12-byte virtio-net header
//! (`virtio_net_hdr_mrg_rxbuf`, the only header of virtio 1.x). The TAP is
//! opened with `IFF_VNET_HDR` and that header size, so the kernel reads the
//! guest's header (checksum and segmentation offload requests) and writes
//! its own in front of received frames: headers pass through unchanged,
//! but for `num_buffers`, which the device fills in.
//!
//! * Transmit: the device-readable descriptors of a chain are gathered, in
//!   order, into one buffer and written to the TAP in one `write`. A chain
//!   with a device-writable descriptor, with a buffer outside guest memory,
//!   shorter than a header plus an Ethernet header, or longer than
//!   [`VNET_HDR_LEN`] + [`MAX_FRAME_LEN`] is dropped (counted in
//!   `tx_dropped`); so is a frame the TAP refuses. TAP writes do not block
//!   in practice (the kernel queues or drops); a write that would block
//!   drops the frame rather than stall the queue. Chains are returned with
//!   used length 0.
//! * Receive: one frame at a time is read from the TAP into a buffer of the
//!   worker's and copied into receive buffers: as many chains as it takes
//!   with VIRTIO_NET_F_MRG_RXBUF (`num_buffers` says how many), otherwise
//!   one, which must be big enough. When the driver has not posted enough
//!   buffers the frame waits, the TAP is no longer polled (so the kernel
//!   queues, and eventually drops, what follows) and the worker waits for
//!   the driver's notification. A frame is dropped (`rx_dropped`) only when
//!   the driver can never take it: its single buffer is too small, its
//!   whole ring is too small, a chain is malformed (a device-readable
//!   descriptor, a buffer outside guest memory: the chains taken for that
//!   frame are returned with used length 0), or the header asks for an
//!   offload the driver did not negotiate.
//!
//! # Offloads
//!
//! Checksum, TSO (v4 and v6) and UFO are offered both ways as configured;
//! TSO and UFO only with checksum offload. At activation the TAP is told
//! (TUNSETOFFLOAD) which offloads the driver accepted for received frames
//! (VIRTIO_NET_F_GUEST_*), so the kernel segments and checksums the others
//! itself. Without VIRTIO_NET_F_GUEST_CSUM the header's flags are cleared.
//!
//! # Multiqueue
//!
//! With more than one queue pair VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ
//! are offered. Only the first pair is active until the driver sends
//! VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; the TAP queues of inactive pairs are
//! detached (TUNSETQUEUE), so the kernel steers no frames to them. Other
//! control commands get VIRTIO_NET_ERR.
//!
//! Hostile drivers: every guest buffer is checked against guest memory
//! before use and accessed through vm-memory; chain walks are bounded by the
//! queue size; bad chains cost only their frame.

mod tap;

pub use tap::{
    HostConfig, Tap, TapError, TapIo, DEFAULT_NAME_TEMPLATE, MAX_NAME_LEN, TUN_F_CSUM, TUN_F_TSO4,
    TUN_F_TSO6, TUN_F_UFO, VNET_HDR_LEN,
};

use std::collections::BTreeMap;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_OK,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActivateError, ActiveQueue, QueueInterrupt, VirtioDevice};
use crate::worker::{skip_corrupt_avail, QueueHandler, Worker};
use crate::GuestMemoryMmap;

/// Longest frame (after the virtio-net header) either way: 64 KiB, what a
/// segmentation-offloaded packet can reach, plus room for the Ethernet,
/// VLAN and IPv6 headers.
pub const MAX_FRAME_LEN: usize = (64 << 10) + 64;
/// Most queue pairs a device may have (two MSI-X vectors and a thread each).
pub const MAX_QUEUE_PAIRS: u16 = 128;
/// Smallest MTU the device reports (ETH_MIN_MTU; drivers refuse less).
pub const MIN_MTU: u16 = 68;

/// Ethernet header length: a shorter transmitted frame is malformed.
/// Smallest queue for which large receive offloads are offered (see
/// `Net::new`): a 64 KiB frame in buffers of at least 1518 bytes needs 44.
const MIN_QUEUE_SIZE_FOR_GUEST_GSO: u16 = 128;
const ETH_HLEN: usize = 14;
/// struct virtio_net_config up to mtu: mac[6], status, max_virtqueue_pairs,
/// mtu (each le16).
const CONFIG_SIZE: usize = 12;
/// Frames read from the TAP per wake-up before the worker looks at its
/// other queue again (the TAP stays polled, so it comes back at once).
const RX_BUDGET: usize = 256;
/// Chains transmitted per turn before the worker looks at the receive side.
const TX_BUDGET: usize = 256;
/// The readable part of a control command kept (class, command, data); MQ
/// commands need 4 bytes.
const MAX_CTRL_COMMAND: usize = 64;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_WAKE: u64 = 3;
const TOKEN_STOP: u64 = 4;

/// Offloads the device offers (Cloud Hypervisor's `offload_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    /// Checksum offload both ways (VIRTIO_NET_F_CSUM, _GUEST_CSUM).
    pub csum: bool,
    /// TCP segmentation offload both ways (HOST_TSO4/6, GUEST_TSO4/6).
    /// Needs `csum`.
    pub tso: bool,
    /// UDP fragmentation offload both ways (HOST_UFO, GUEST_UFO). Needs
    /// `csum`.
    pub ufo: bool,
}

impl Offloads {
    /// Every offload (Cloud Hypervisor's default).
    pub const ALL: Offloads = Offloads {
        csum: true,
        tso: true,
        ufo: true,
    };
    /// None: every frame is complete and checksummed.
    pub const NONE: Offloads = Offloads {
        csum: false,
        tso: false,
        ufo: false,
    };
}

/// Why a network device cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("virtio-net {id}: {reason}")]
pub struct NetError {
    pub id: String,
    pub reason: String,
}

/// A random locally administered unicast MAC (first byte `x2`, `x6`, `xa`
/// or `xe`), for a device configured without one.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most mac.len() bytes into mac.
    let got = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if got != mac.len() as isize {
        // Not expected on Linux >= 3.17; fall back to a weaker source.
        let bytes = vmm_sys_util::rand::rand_bytes(mac.len());
        mac.copy_from_slice(&bytes);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

#[derive(Default)]
struct Counters {
    rx_bytes: AtomicU64,
    rx_frames: AtomicU64,
    rx_dropped: AtomicU64,
    tx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_dropped: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A virtio-net device.
pub struct Net {
    id: String,
    taps: Vec<Arc<dyn TapIo>>,
    queue_size: u16,
    features: u64,
    config: [u8; CONFIG_SIZE],
    counters: Arc<Counters>,
    workers: Vec<PairWorker>,
    ctrl: Option<Worker>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("id", &self.id)
            .field("tap", &self.taps.first().map(|t| t.name().to_string()))
            .field("queue_pairs", &self.taps.len())
            .field("queue_size", &self.queue_size)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device on `taps`, one per queue pair (from [`Tap::open_or_create`]
    /// or [`Tap::from_fds`]), whose guest MAC is `mac` (see [`random_mac`]),
    /// reporting `mtu` when given, with queues of up to `queue_size` entries
    /// (a power of two, 4 to 32768).
    pub fn new(
        id: String,
        taps: Vec<Tap>,
        mac: [u8; 6],
        mtu: Option<u16>,
        offloads: Offloads,
        queue_size: u16,
    ) -> Result<Net, NetError> {
        let taps = taps
            .into_iter()
            .map(|t| Arc::new(t) as Arc<dyn TapIo>)
            .collect();
        Net::with_backends(id, taps, mac, mtu, offloads, queue_size)
    }

    /// [`Net::new`] on any [`TapIo`] (tests use sockets).
    pub fn with_backends(
        id: String,
        taps: Vec<Arc<dyn TapIo>>,
        mac: [u8; 6],
        mtu: Option<u16>,
        offloads: Offloads,
        queue_size: u16,
    ) -> Result<Net, NetError> {
        let invalid = |reason: String| NetError {
            id: id.clone(),
            reason,
        };
        let pairs = u16::try_from(taps.len()).unwrap_or(u16::MAX);
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS {
            return Err(invalid(format!(
                "needs 1 to {MAX_QUEUE_PAIRS} TAP queues (one per queue pair), not {}",
                taps.len()
            )));
        }
        if !queue_size.is_power_of_two() || !(4..=32768).contains(&queue_size) {
            return Err(invalid(format!(
                "queue_size must be a power of two between 4 and 32768, not {queue_size}"
            )));
        }
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(invalid(format!(
                "{} is not a unicast MAC address",
                format_mac(&mac)
            )));
        }
        if let Some(mtu) = mtu.filter(|&m| m < MIN_MTU) {
            return Err(invalid(format!("MTU {mtu} is below {MIN_MTU}")));
        }

        let bit = |b: u32| 1u64 << b;
        let mut features =
            bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MRG_RXBUF);
        if mtu.is_some() {
            features |= bit(VIRTIO_NET_F_MTU);
        }
        // Large frames towards the guest (up to 64 KiB from the TAP) take
        // dozens of mergeable receive buffers. Linux refills its receive ring
        // only once more than half of it is free, so on a small ring such a
        // frame could wait for buffers forever: offer them only on rings big
        // enough to hold one in half the ring.
        let big_rx = queue_size >= MIN_QUEUE_SIZE_FOR_GUEST_GSO;
        if offloads.csum {
            features |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
            if offloads.tso {
                features |= bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6);
                if big_rx {
                    features |= bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
                }
            }
            if offloads.ufo {
                features |= bit(VIRTIO_NET_F_HOST_UFO);
                if big_rx {
                    features |= bit(VIRTIO_NET_F_GUEST_UFO);
                }
            }
        }
        if pairs > 1 {
            features |= bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ);
        }

        let mut config = [0u8; CONFIG_SIZE];
        config[0..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&pairs.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());

        Ok(Net {
            id,
            taps,
            queue_size,
            features,
            config,
            counters: Arc::new(Counters::default()),
            workers: Vec::new(),
            ctrl: None,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        self.taps[0].name()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[0..6]);
        mac
    }

    fn queue_pairs(&self) -> u16 {
        // At most MAX_QUEUE_PAIRS, checked in with_backends.
        self.taps.len() as u16
    }

    /// Thread names: no NUL (spawn would panic) and, as Linux keeps 15
    /// bytes, the pair first.
    fn thread_name(&self, what: &str) -> String {
        let id: String = self.id.chars().filter(char::is_ascii_graphic).collect();
        format!("net{what}-{id}")
    }
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What the driver accepted, as far as the data path cares.
#[derive(Clone, Copy, Debug, Default)]
struct Negotiated {
    mrg_rxbuf: bool,
    guest_csum: bool,
    guest_tso4: bool,
    guest_tso6: bool,
    guest_ufo: bool,
}

impl Negotiated {
    fn from_features(features: u64) -> Self {
        let has = |b: u32| features & (1u64 << b) != 0;
        let guest_csum = has(VIRTIO_NET_F_GUEST_CSUM);
        Negotiated {
            mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum,
            // Segmentation offloads need checksum offload (the spec says so,
            // and so does TUNSETOFFLOAD).
            guest_tso4: guest_csum && has(VIRTIO_NET_F_GUEST_TSO4),
            guest_tso6: guest_csum && has(VIRTIO_NET_F_GUEST_TSO6),
            guest_ufo: guest_csum && has(VIRTIO_NET_F_GUEST_UFO),
        }
    }

    /// The TUNSETOFFLOAD flags for what the driver can receive.
    fn tun_offloads(&self) -> u32 {
        if !self.guest_csum {
            return 0;
        }
        let mut flags = TUN_F_CSUM;
        if self.guest_tso4 {
            flags |= TUN_F_TSO4;
        }
        if self.guest_tso6 {
            flags |= TUN_F_TSO6;
        }
        if self.guest_ufo {
            flags |= TUN_F_UFO;
        }
        flags
    }

    /// Whether a received frame's `gso_type` is one the driver accepts.
    fn accepts_gso(&self, gso_type: u8) -> bool {
        match u32::from(gso_type) {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => self.guest_tso4,
            VIRTIO_NET_HDR_GSO_TCPV6 => self.guest_tso6,
            VIRTIO_NET_HDR_GSO_UDP => self.guest_ufo,
            // ECN and USO were not offered.
            _ => false,
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let pairs = usize::from(self.queue_pairs());
        let queues = if pairs > 1 { pairs * 2 + 1 } else { 2 };
        vec![self.queue_size; queues]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config, offset, data);
    }

    // The MAC is writable only by legacy drivers (and with
    // VIRTIO_NET_F_CTRL_MAC_ADDR, not offered): writes are ignored.

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn QueueInterrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        self.reset();
        let negotiated = features & self.features;
        let event_idx = features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let accepted = Negotiated::from_features(negotiated);
        let offload = accepted.tun_offloads();
        if let Err(e) = self.taps[0].set_offload(offload) {
            // Offloads the TAP does not use are merely not used: a driver
            // that accepted more still gets only complete frames.
            log::warn!(
                "virtio-net {}: cannot set TAP {} offloads {offload:#x}: {e}; receiving without offloads",
                self.id,
                self.taps[0].name()
            );
            if let Err(e) = self.taps[0].set_offload(0) {
                log::warn!("virtio-net {}: cannot clear TAP offloads: {e}", self.id);
            }
        }
        // Only the first pair is active until the driver asks for more.
        for (pair, tap) in self.taps.iter().enumerate() {
            if let Err(e) = tap.set_queue_enabled(pair == 0) {
                log::warn!(
                    "virtio-net {}: cannot {} TAP queue {pair}: {e}",
                    self.id,
                    if pair == 0 { "attach" } else { "detach" }
                );
            }
        }

        let pairs = usize::from(self.queue_pairs());
        let mut slots: Vec<Option<ActiveQueue>> =
            (0..self.queue_max_sizes().len()).map(|_| None).collect();
        for q in queues {
            if let Some(slot) = slots.get_mut(usize::from(q.index)) {
                *slot = Some(q);
            }
        }
        let ctrl = if pairs > 1 {
            slots.pop().flatten()
        } else {
            None
        };
        let mut wakes = Vec::new();
        for pair in 0..pairs {
            let (Some(rx), Some(tx)) = (slots[2 * pair].take(), slots[2 * pair + 1].take()) else {
                log::debug!(
                    "virtio-net {}: queue pair {pair} is not enabled; not serving it",
                    self.id
                );
                wakes.push(None);
                continue;
            };
            let handler = RxTx::new(
                self.taps[pair].clone(),
                self.taps[0].clone(),
                self.counters.clone(),
                accepted,
            );
            match PairWorker::spawn(
                self.thread_name(&pair.to_string()),
                handler,
                rx,
                tx,
                mem.clone(),
                interrupt.clone(),
            ) {
                Ok(w) => {
                    wakes.push(w.wake.try_clone().ok());
                    self.workers.push(w);
                }
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            }
        }
        if let Some(ctrl) = ctrl {
            let handler = CtrlHandler {
                id: self.id.clone(),
                taps: self.taps.clone(),
                wakes,
                mq: negotiated & (1u64 << VIRTIO_NET_F_MQ) != 0,
            };
            match Worker::spawn(
                self.thread_name("c"),
                handler,
                vec![ctrl],
                mem,
                interrupt,
                event_idx,
            ) {
                Ok(w) => self.ctrl = Some(w),
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            }
        }
        log::debug!(
            "virtio-net {}: TAP {}, {} queue pair(s) served, TAP offloads {offload:#x}{}",
            self.id,
            self.tap_name(),
            self.workers.len(),
            if accepted.mrg_rxbuf {
                ", mergeable receive buffers"
            } else {
                ""
            }
        );
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping a worker stops and joins its thread; a frame it held for
        // the guest is lost, as on a real NIC reset.
        self.ctrl = None;
        self.workers.clear();
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let c = &self.counters;
        [
            ("rx_bytes", &c.rx_bytes),
            ("rx_frames", &c.rx_frames),
            ("rx_dropped", &c.rx_dropped),
            ("tx_bytes", &c.tx_bytes),
            ("tx_frames", &c.tx_frames),
            ("tx_dropped", &c.tx_dropped),
        ]
        .into_iter()
        .map(|(name, v)| (name.to_string(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// What [`RxTx::receive`] left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxState {
    /// No frame waits; the TAP may have more (it stays polled).
    Ready,
    /// A frame waits for receive buffers.
    WaitingForBuffers,
    /// The TAP cannot be read (its queue is detached or the interface is
    /// gone); poll it again only once woken.
    TapUnavailable,
}

/// One chain taken for a received frame.
#[derive(Clone, Copy, Debug)]
struct RxChain {
    head: u16,
    /// Bytes of the frame it gets.
    len: usize,
}

/// What happened to the frame [`RxTx::deliver`] was given.
enum Delivery {
    Delivered,
    /// `returned`: chains went back to the driver (with used length 0).
    Dropped {
        returned: bool,
    },
    NoBuffers,
}

/// Serves one queue pair: moves frames between its queues and its TAP.
struct RxTx {
    tap: Arc<dyn TapIo>,
    /// Where transmitted frames go while this pair's TAP queue is detached.
    fallback: Arc<dyn TapIo>,
    counters: Arc<Counters>,
    features: Negotiated,
    /// The received frame being delivered (header first), `pending` bytes.
    frame: Vec<u8>,
    pending: Option<usize>,
    tx_buf: Vec<u8>,
    chains: Vec<RxChain>,
    segs: Vec<(GuestAddress, usize)>,
    tx_errors_logged: bool,
    rx_errors_logged: bool,
}

impl RxTx {
    fn new(
        tap: Arc<dyn TapIo>,
        fallback: Arc<dyn TapIo>,
        counters: Arc<Counters>,
        features: Negotiated,
    ) -> Self {
        RxTx {
            tap,
            fallback,
            counters,
            features,
            // One byte more than the longest frame, to see a longer one.
            frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN + 1],
            pending: None,
            tx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            chains: Vec::new(),
            segs: Vec::new(),
            tx_errors_logged: false,
            rx_errors_logged: false,
        }
    }

    /// Sends the chains the driver made available on the transmit queue, up
    /// to [`TX_BUDGET`] of them; returns whether it used any, and whether
    /// it stopped at the budget (the caller must come back without waiting
    /// for a notification).
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> (bool, bool) {
        let mut used = false;
        let mut budget = TX_BUDGET;
        loop {
            if !queue.event_idx_enabled() {
                let _ = queue.disable_notification(mem);
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let mut len = 0usize;
                let mut bad = None;
                for desc in chain {
                    if desc.is_write_only() {
                        bad = Some("a device-writable descriptor");
                        break;
                    }
                    let n = desc.len() as usize;
                    if n == 0 {
                        continue;
                    }
                    let Some(buf) = self.tx_buf.get_mut(len..len + n) else {
                        bad = Some("a frame over the size limit");
                        break;
                    };
                    if let Err(e) = mem.read_slice(buf, desc.addr()) {
                        log::debug!("virtio-net: bad transmit buffer: {e}");
                        bad = Some("a buffer outside guest memory");
                        break;
                    }
                    len += n;
                }
                if bad.is_none() && len < VNET_HDR_LEN + ETH_HLEN {
                    bad = Some("no room for the headers");
                }
                match bad {
                    Some(why) => {
                        log::debug!("virtio-net: dropping transmit chain {head}: {why}");
                        bump(&self.counters.tx_dropped, 1);
                    }
                    None => self.send(len),
                }
                match queue.add_used(mem, head, 0) {
                    Ok(()) => used = true,
                    Err(e) => log::debug!("virtio-net: cannot return chain {head}: {e}"),
                }
                budget -= 1;
                if budget == 0 {
                    // Let the receive side have a turn; notifications stay
                    // off (they are re-enabled once the queue is drained).
                    return (used, true);
                }
            }
            if !rearm(queue, mem) {
                break;
            }
        }
        (used, false)
    }

    /// Writes the frame in `tx_buf[..len]` to the TAP.
    fn send(&mut self, len: usize) {
        let tap = if self.tap.queue_enabled() {
            &self.tap
        } else {
            &self.fallback
        };
        let frame = &self.tx_buf[..len];
        let result = loop {
            match tap.write_frame(frame) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match result {
            Ok(_) => {
                bump(&self.counters.tx_frames, 1);
                bump(&self.counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
            }
            Err(e) => {
                bump(&self.counters.tx_dropped, 1);
                // The guest can make the kernel refuse frames (e.g. with a
                // bad offload header): warn once, not at its frame rate.
                if self.tx_errors_logged {
                    log::debug!("virtio-net: TAP {} refused a frame: {e}", tap.name());
                } else {
                    log::warn!(
                        "virtio-net: TAP {} refused a frame: {e} (further refusals are logged at debug level)",
                        tap.name()
                    );
                    self.tx_errors_logged = true;
                }
            }
        }
    }

    /// Moves frames from the TAP to the receive queue until the TAP is
    /// drained, the budget is spent or the driver runs out of buffers.
    /// Returns whether it used buffers, and what it left behind.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> (bool, RxState) {
        let mut used = false;
        let mut budget = RX_BUDGET;
        // Each retry needs the driver to have added buffers, and it cannot
        // add more than a ring's worth without the device using some: this
        // bound is only a safety net.
        let mut retries = 2 * usize::from(queue.size()) + 2;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => {
                    if budget == 0 {
                        return (used, RxState::Ready);
                    }
                    budget -= 1;
                    match self.read_frame() {
                        Ok(Some(len)) => len,
                        Ok(None) => return (used, RxState::Ready),
                        Err(state) => return (used, state),
                    }
                }
            };
            self.pending = Some(len);
            let before = queue.avail_idx(mem, Ordering::Acquire).ok();
            match self.deliver(queue, mem, len) {
                Delivery::Delivered => {
                    used = true;
                    self.pending = None;
                }
                Delivery::Dropped { returned } => {
                    used |= returned;
                    bump(&self.counters.rx_dropped, 1);
                    self.pending = None;
                }
                Delivery::NoBuffers => {
                    // Ask the driver to notify when it adds buffers; go on at
                    // once if it did meanwhile.
                    let more = before.is_some_and(|b| notify_beyond(queue, mem, b));
                    if more && retries > 0 {
                        retries -= 1;
                        continue;
                    }
                    return (used, RxState::WaitingForBuffers);
                }
            }
        }
    }

    /// Reads one frame from the TAP into `frame`: its length, `None` when
    /// the TAP has nothing, or the state to go to when it cannot be read.
    fn read_frame(&mut self) -> Result<Option<usize>, RxState> {
        loop {
            match self.tap.read_frame(&mut self.frame) {
                Ok(0) => {
                    // A TAP never reads empty; a closed socket (in tests) does.
                    return Err(RxState::TapUnavailable);
                }
                Ok(n) if !(VNET_HDR_LEN..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&n) => {
                    log::debug!("virtio-net: dropping a {n}-byte frame from the TAP");
                    bump(&self.counters.rx_dropped, 1);
                    continue;
                }
                Ok(n) => return Ok(Some(n)),
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => match e.raw_os_error() {
                        // Frame-level failures (e.g. one too big for the
                        // buffer): that frame is gone, go on.
                        Some(libc::EFAULT) | Some(libc::EINVAL) | Some(libc::EMSGSIZE) => {
                            bump(&self.counters.rx_dropped, 1);
                            continue;
                        }
                        _ => {
                            // Detached queue (EBADFD), interface gone (EIO).
                            if self.tap.queue_enabled() && !self.rx_errors_logged {
                                log::warn!(
                                    "virtio-net: cannot read from TAP {}: {e}",
                                    self.tap.name()
                                );
                                self.rx_errors_logged = true;
                            }
                            return Err(RxState::TapUnavailable);
                        }
                    },
                },
            }
        }
    }

    /// Copies the frame in `frame[..len]` into receive buffers.
    fn deliver(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, len: usize) -> Delivery {
        if !self.features.accepts_gso(self.frame[1]) {
            log::debug!(
                "virtio-net: dropping a frame with gso_type {} the driver did not accept",
                self.frame[1]
            );
            return Delivery::Dropped { returned: false };
        }
        if !self.features.guest_csum {
            // Without GUEST_CSUM the flags must be zero (the kernel then
            // checksums everything itself: no TUN_F_CSUM).
            self.frame[0] = 0;
        }
        self.chains.clear();
        self.segs.clear();
        let max_chains = if self.features.mrg_rxbuf {
            usize::from(queue.size())
        } else {
            1
        };
        let mut room = 0usize;
        let mut popped = 0usize;
        let mut bad = false;
        while room < len && popped < max_chains {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            popped += 1;
            let head = chain.head_index();
            let mut chain_len = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    bad = true;
                    break;
                }
                let want = (desc.len() as usize).min(len - room - chain_len);
                if want == 0 {
                    if room + chain_len == len {
                        break;
                    }
                    continue;
                }
                if !GuestMemoryBackend::check_range(mem, desc.addr(), want) {
                    bad = true;
                    break;
                }
                self.segs.push((desc.addr(), want));
                chain_len += want;
            }
            self.chains.push(RxChain {
                head,
                len: chain_len,
            });
            // Every chain must have room for the header, so that
            // num_buffers lands in the first one.
            if bad || chain_len == 0 || (popped == 1 && chain_len < VNET_HDR_LEN) {
                bad = true;
                break;
            }
            room += chain_len;
        }
        if bad || (room < len && popped == max_chains) {
            // A malformed chain, or the driver's buffers can never hold this
            // frame: return what was taken, empty.
            log::debug!(
                "virtio-net: dropping a {}-byte frame: {}",
                len - VNET_HDR_LEN,
                if bad {
                    "malformed receive chain"
                } else {
                    "receive buffers too small"
                }
            );
            for c in &self.chains {
                if let Err(e) = queue.add_used(mem, c.head, 0) {
                    log::debug!("virtio-net: cannot return chain {}: {e}", c.head);
                }
            }
            return Delivery::Dropped {
                returned: !self.chains.is_empty(),
            };
        }
        if room < len {
            // Not enough buffers yet: give them back and wait for more.
            for _ in 0..popped {
                queue.go_to_previous_position();
            }
            return Delivery::NoBuffers;
        }

        // At most the queue size (<= 32768) chains.
        let num_buffers = self.chains.len() as u16;
        self.frame[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        let mut offset = 0;
        for &(addr, n) in &self.segs {
            if let Err(e) = mem.write_slice(&self.frame[offset..offset + n], addr) {
                // Checked above; memory does not shrink under a running VM.
                log::warn!("virtio-net: cannot fill a receive buffer: {e}");
            }
            offset += n;
        }
        for c in &self.chains {
            // Each chain holds at most one frame, far below 4 GiB.
            if let Err(e) = queue.add_used(mem, c.head, c.len as u32) {
                log::debug!("virtio-net: cannot return chain {}: {e}", c.head);
            }
        }
        bump(&self.counters.rx_frames, 1);
        bump(&self.counters.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Delivery::Delivered
    }
}

/// Once a queue is drained: re-enables driver notifications and returns
/// true if buffers arrived meanwhile (which the driver may not have
/// notified). Also recovers from a driver whose available index ran more
/// than a ring ahead (no chain can be popped then, and the queue would look
/// busy forever).
fn rearm(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if skip_corrupt_avail(queue, mem, "virtio-net") {
        return false;
    }
    queue.enable_notification(mem).unwrap_or(false)
}

/// For a receive queue whose available buffers (up to available index
/// `seen`) are not enough: asks the driver to notify when it makes more
/// available, and returns true if it already has.
///
/// With EVENT_IDX the driver notifies when its index passes `avail_event`,
/// which [`QueueT::enable_notification`] sets to the next chain the device
/// will take: here that chain is still waiting, so the driver would never
/// notify. The event is set to `seen` instead.
fn notify_beyond(queue: &mut Queue, mem: &GuestMemoryMmap, seen: Wrapping<u16>) -> bool {
    if skip_corrupt_avail(queue, mem, "virtio-net") {
        return false;
    }
    let next = queue.next_avail();
    queue.set_next_avail(seen.0);
    // Also fences before reading the index again.
    let _ = queue.enable_notification(mem);
    queue.set_next_avail(next);
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|now| now != seen)
}

/// The thread of one queue pair; dropping it stops and joins the thread.
struct PairWorker {
    stop: EventFd,
    /// Makes the thread look at its TAP queue again (after attaching it).
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// The queues and wiring a pair thread serves.
struct PairQueues {
    rx: ActiveQueue,
    tx: ActiveQueue,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn QueueInterrupt>,
}

impl PairQueues {
    fn signal(&mut self, rx: bool) {
        let q = if rx { &mut self.rx } else { &mut self.tx };
        if q.queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_queue(q.index);
        }
    }
}

impl PairWorker {
    fn spawn(
        name: String,
        handler: RxTx,
        rx: ActiveQueue,
        tx: ActiveQueue,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn QueueInterrupt>,
    ) -> Result<PairWorker, ActivateError> {
        let thread_err = |source| ActivateError::Thread {
            device: name.clone(),
            source,
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(thread_err)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(thread_err)?;
        let epoll = Epoll::new().map_err(thread_err)?;
        for (fd, token) in [
            (rx.notify.as_raw_fd(), TOKEN_RX),
            (tx.notify.as_raw_fd(), TOKEN_TX),
            (wake.as_raw_fd(), TOKEN_WAKE),
            (stop.as_raw_fd(), TOKEN_STOP),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(thread_err)?;
        }
        let mut queues = PairQueues {
            rx,
            tx,
            mem,
            interrupt,
        };
        // The transport set EVENT_IDX on the queues (if negotiated); the
        // handler manages notifications itself.
        let wake_fd = wake.try_clone().map_err(thread_err)?;
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || run_pair(thread_name, handler, &mut queues, &epoll, &wake_fd))
            .map_err(thread_err)?;
        Ok(PairWorker {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

fn run_pair(name: String, mut h: RxTx, q: &mut PairQueues, epoll: &Epoll, wake: &EventFd) {
    let tap_fd: RawFd = h.tap.poll_fd();
    let mut tap_polled = false;
    let mut tap_unavailable = false;
    // Serve what may have been posted before the thread started.
    let (mut rx_due, mut tx_due) = (true, true);
    let mut tx_again = false;
    let mut events = [EpollEvent::default(); 8];
    loop {
        if tx_due {
            let used;
            (used, tx_again) = h.transmit(&mut q.tx.queue, &q.mem);
            if used {
                q.signal(false);
            }
        }
        if rx_due {
            let (used, state) = h.receive(&mut q.rx.queue, &q.mem);
            if used {
                q.signal(true);
            }
            if state == RxState::TapUnavailable {
                tap_unavailable = true;
            }
        }
        // Poll the TAP only when a frame read from it can go somewhere:
        // level-triggered epoll would otherwise spin.
        let want = !tap_unavailable && h.pending.is_none() && h.tap.queue_enabled();
        if want != tap_polled {
            let result = if want {
                epoll.ctl(
                    ControlOperation::Add,
                    tap_fd,
                    EpollEvent::new(EventSet::IN, TOKEN_TAP),
                )
            } else {
                epoll.ctl(ControlOperation::Delete, tap_fd, EpollEvent::default())
            };
            match result {
                Ok(()) => tap_polled = want,
                Err(e) => {
                    log::error!("{name}: cannot poll the TAP: {e}");
                    tap_unavailable = true;
                }
            }
        }
        (rx_due, tx_due) = (false, tx_again);
        // With transmit work left, only look for other events.
        let timeout = if tx_again { 0 } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("{name}: epoll failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return,
                TOKEN_RX => {
                    let _ = q.rx.notify.read();
                    rx_due = true;
                }
                TOKEN_TX => {
                    let _ = q.tx.notify.read();
                    tx_due = true;
                }
                TOKEN_TAP => rx_due = true,
                TOKEN_WAKE => {
                    let _ = wake.read();
                    tap_unavailable = false;
                    rx_due = true;
                }
                _ => {}
            }
        }
    }
}

impl Drop for PairWorker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("a virtio-net worker thread panicked");
            }
        }
    }
}

/// Serves the control queue: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
struct CtrlHandler {
    id: String,
    taps: Vec<Arc<dyn TapIo>>,
    /// Per pair, the wake eventfd of its thread (none if not served).
    wakes: Vec<Option<EventFd>>,
    mq: bool,
}

impl CtrlHandler {
    /// Carries out one command; returns the ack (VIRTIO_NET_OK or _ERR).
    fn command(&mut self, command: &[u8]) -> u8 {
        let &[class, cmd, ref data @ ..] = command else {
            return VIRTIO_NET_ERR as u8;
        };
        if u32::from(class) != VIRTIO_NET_CTRL_MQ
            || u32::from(cmd) != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
            || !self.mq
        {
            log::debug!(
                "virtio-net {}: unsupported control command {class}/{cmd}",
                self.id
            );
            return VIRTIO_NET_ERR as u8;
        }
        let &[lo, hi, ..] = data else {
            return VIRTIO_NET_ERR as u8;
        };
        let pairs = usize::from(u16::from_le_bytes([lo, hi]));
        if pairs == 0 || pairs > self.taps.len() {
            log::debug!(
                "virtio-net {}: driver asked for {pairs} queue pairs of {}",
                self.id,
                self.taps.len()
            );
            return VIRTIO_NET_ERR as u8;
        }
        let mut ok = true;
        for (pair, tap) in self.taps.iter().enumerate() {
            if let Err(e) = tap.set_queue_enabled(pair < pairs) {
                log::warn!(
                    "virtio-net {}: cannot {} TAP queue {pair}: {e}",
                    self.id,
                    if pair < pairs { "attach" } else { "detach" }
                );
                ok = false;
            }
            if let Some(Some(wake)) = self.wakes.get(pair) {
                let _ = wake.write(1);
            }
        }
        log::debug!("virtio-net {}: {pairs} queue pair(s) active", self.id);
        if ok {
            VIRTIO_NET_OK as u8
        } else {
            VIRTIO_NET_ERR as u8
        }
    }
}

impl QueueHandler for CtrlHandler {
    fn process(&mut self, _index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut command = [0u8; MAX_CTRL_COMMAND];
            let mut len = 0;
            let mut ack_at = None;
            let mut bad = false;
            for desc in chain {
                if desc.is_write_only() {
                    if ack_at.is_none() && desc.len() > 0 {
                        ack_at = Some(desc.addr());
                    }
                    continue;
                }
                if ack_at.is_some() {
                    // A readable descriptor after the ack.
                    bad = true;
                    break;
                }
                let n = (desc.len() as usize).min(MAX_CTRL_COMMAND - len);
                if bad
                    || mem
                        .read_slice(&mut command[len..len + n], desc.addr())
                        .is_err()
                {
                    // Go on looking for where the ack goes.
                    bad = true;
                    continue;
                }
                len += n;
            }
            let ack = if bad {
                VIRTIO_NET_ERR as u8
            } else {
                self.command(&command[..len])
            };
            let written = match ack_at {
                Some(addr) if mem.write_obj(ack, addr).is_ok() => 1,
                _ => 0,
            };
            match queue.add_used(mem, head, written) {
                Ok(()) => used = true,
                Err(e) => log::debug!("virtio-net: cannot return control chain {head}: {e}"),
            }
        }
        skip_corrupt_avail(queue, mem, "virtio-net");
        used
    }
}

#[cfg(test)]
mod tests;
