//! Cloud Hypervisor's `VmConfig`, as far as kite implements it. Field names and
//! JSON shapes follow `cloud-hypervisor.yaml`, so existing clients work unchanged.
//!
//! Deserializing goes through [`crate::compat`], which accepts every field of
//! Cloud Hypervisor's schema but refuses any that asks for a feature kite lacks.
//! [`VmConfig::validate`] then checks the values kite does use. Serializing
//! produces the Cloud Hypervisor shape of the fields kite has (for `vm.info`).

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Default guest memory when a config gives none (Cloud Hypervisor's default).
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;

/// Most vCPUs a VM may have. Keeps the per-VM thread count and the firmware
/// tables (MP table / MADT) small; raise it together with those.
pub const MAX_VCPUS: u8 = 32;

/// Smallest guest RAM kite accepts. The kernel is loaded at 1 MiB and a
/// compressed bzImage decompresses above it; below 16 MiB no stock Linux kernel
/// boots, and refusing at `vm.create` beats a guest that dies silently.
pub const MIN_MEMORY: u64 = 16 << 20;

/// Guest RAM must be whole pages: KVM memory slots are page-granular.
pub const MEMORY_ALIGNMENT: u64 = 4 << 10;

/// Default number of request queues of a disk (Cloud Hypervisor's default).
pub const DEFAULT_DISK_NUM_QUEUES: u16 = 1;

/// Default size of each disk queue (Cloud Hypervisor's default).
pub const DEFAULT_DISK_QUEUE_SIZE: u16 = 128;

/// Most request queues a disk may have. Each queue gets its own worker
/// thread and MSI-X vector, so keep the count small.
pub const MAX_DISK_QUEUES: u16 = 16;

/// Smallest disk queue. A virtio-blk request takes at least three
/// descriptors (header, data, status), so a 2-entry queue cannot hold one;
/// Cloud Hypervisor refuses it too.
pub const MIN_DISK_QUEUE_SIZE: u16 = 4;

/// Largest disk queue. The virtio spec allows split queues of up to 32768
/// entries; 1024 is ample for a disk and bounds the guest memory that each
/// queue's rings take.
pub const MAX_DISK_QUEUE_SIZE: u16 = 1024;

/// Longest `DiskConfig.serial`: the virtio-blk ID is 20 bytes
/// (VIRTIO_BLK_ID_BYTES); a longer one would be cut short in the guest.
pub const MAX_DISK_SERIAL_LEN: usize = 20;

/// Cloud Hypervisor's (and kite's) entropy source for the virtio-rng device.
pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";

/// Host address Cloud Hypervisor's schema gives a TAP device it creates.
pub const DEFAULT_NET_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 249, 1);

/// Netmask of [`DEFAULT_NET_IP`] (Cloud Hypervisor's default).
pub const DEFAULT_NET_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);

/// Default queues of a network device: one receive/transmit pair (Cloud
/// Hypervisor's default).
pub const DEFAULT_NET_NUM_QUEUES: u16 = 2;

/// Most queues of a network device (8 pairs). Each pair gets a worker thread,
/// a TAP queue and two MSI-X vectors.
pub const MAX_NET_NUM_QUEUES: u16 = 16;

/// Default size of each network queue (Cloud Hypervisor's default).
pub const DEFAULT_NET_QUEUE_SIZE: u16 = 256;

/// Smallest network queue.
pub const MIN_NET_QUEUE_SIZE: u16 = 4;

/// Largest network queue; see [`MAX_DISK_QUEUE_SIZE`].
pub const MAX_NET_QUEUE_SIZE: u16 = 1024;

/// Smallest MTU (Cloud Hypervisor's `MIN_MTU`: IPv6's minimum link MTU).
pub const MIN_NET_MTU: u16 = 1280;

/// Largest MTU: a TAP's (65535 less its Ethernet header).
pub const MAX_NET_MTU: u16 = 65521;

/// Longest network interface name: IFNAMSIZ (16) less the NUL.
pub const MAX_TAP_NAME_LEN: usize = 15;

/// Device ids starting with this are kite's own names (`__rng`, ...), as in
/// Cloud Hypervisor, so a user-chosen id can never collide with one.
pub const RESERVED_ID_PREFIX: &str = "__";

/// Why a VM configuration was refused. Every message names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON, a wrong type, or a missing required field (serde's message).
    #[error("invalid VmConfig: {0}")]
    Json(#[from] serde_json::Error),
    /// Not a field of Cloud Hypervisor's schema (`field` is its dotted path).
    #[error("unknown field `{0}`")]
    UnknownField(String),
    /// A Cloud Hypervisor field whose value asks for something kite lacks.
    #[error("{field}: {feature} is not supported by kite yet")]
    Unsupported {
        field: String,
        feature: &'static str,
    },
    #[error("payload.kernel is required: kite boots a Linux kernel directly (firmware and IGVM payloads are not supported)")]
    MissingKernel,
    #[error("cpus.boot_vcpus must be at least 1")]
    NoBootVcpus,
    #[error("cpus.boot_vcpus ({boot}) must not exceed cpus.max_vcpus ({max})")]
    BootAboveMax { boot: u8, max: u8 },
    #[error("cpus: {0} vCPUs is more than kite's maximum of {MAX_VCPUS}")]
    TooManyVcpus(u32),
    #[error("memory.size ({0} bytes) is below kite's minimum of {min} MiB", min = MIN_MEMORY >> 20)]
    MemoryTooSmall(u64),
    #[error("memory.size ({0} bytes) is not a multiple of 4 KiB")]
    MemoryUnaligned(u64),
    #[error("{device}.mode {mode:?} is not supported by kite yet (use {allowed})")]
    Mode {
        device: &'static str,
        mode: ConsoleMode,
        allowed: &'static str,
    },
    #[error("{0}.file is required when {0}.mode is File")]
    MissingFile(&'static str),
    #[error("{0}.file is only used with mode File; remove it or set mode File")]
    StrayFile(&'static str),
    #[error("serial.mode and console.mode are both Tty, but only one device can own the terminal; set the other to Off, Null or File")]
    TwoTtys,
    #[error("disks[{0}].path is required")]
    MissingDiskPath(usize),
    #[error("disks[{index}].num_queues ({value}) must be from 1 to {MAX_DISK_QUEUES}")]
    DiskNumQueues { index: usize, value: u64 },
    #[error("disks[{index}].queue_size ({value}) must be a power of two from {MIN_DISK_QUEUE_SIZE} to {MAX_DISK_QUEUE_SIZE}")]
    DiskQueueSize { index: usize, value: u64 },
    #[error("disks[{index}].serial is {len} bytes; the virtio-blk serial holds at most {MAX_DISK_SERIAL_LEN}")]
    DiskSerialTooLong { index: usize, len: usize },
    /// `field` is the dotted path of the bad value, `reason` says what is
    /// wrong with it.
    #[error("{field}: {reason}")]
    Net { field: String, reason: String },
    #[error("rng.src must not be empty")]
    EmptyRngSource,
    /// `field` is the dotted path of the `id`.
    #[error("{field} must not be empty")]
    EmptyId { field: String },
    #[error("{field} `{id}` is reserved: ids starting with `__` name kite's own devices")]
    ReservedId { field: String, id: String },
    #[error("{field} `{id}` is already the id of another device")]
    DuplicateId { field: String, id: String },
}

/// The whole VM configuration (`PUT /vm.create` body). Fields serialize in
/// Cloud Hypervisor's order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    /// virtio-blk disks, in PCI slot order. Omitted from `vm.info` when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices over TAP, in PCI slot order. Omitted from `vm.info`
    /// when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// The virtio-rng device. Like Cloud Hypervisor, every VM has one.
    pub rng: RngConfig,
    pub serial: ConsoleConfig,
    pub console: ConsoleConfig,
}

impl Default for VmConfig {
    /// What a config of only `{"payload": {}}` means. It has no kernel, so it
    /// does not validate; use it with `..VmConfig::default()`.
    fn default() -> Self {
        VmConfig {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: PayloadConfig::default(),
            disks: Vec::new(),
            net: Vec::new(),
            rng: RngConfig::default(),
            serial: ConsoleConfig::serial_default(),
            console: ConsoleConfig::console_default(),
        }
    }
}

impl<'de> Deserialize<'de> for VmConfig {
    /// Accepts Cloud Hypervisor's whole schema; see [`crate::compat`].
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        crate::compat::VmConfigWire::deserialize(deserializer)?
            .into_config()
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a `vm.create` body and validates it: the one entry point for JSON
/// configs, so the HTTP server and embedders refuse exactly the same things.
pub fn parse_vm_config(json: &[u8]) -> Result<VmConfig, ConfigError> {
    let wire: crate::compat::VmConfigWire = serde_json::from_slice(json)?;
    let config = wire.into_config()?;
    config.validate()?;
    Ok(config)
}

impl VmConfig {
    /// Checks the values kite relies on, so a bad config fails at `vm.create`
    /// with a message rather than later inside the VMM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if non_empty(&self.payload.kernel).is_none() {
            return Err(ConfigError::MissingKernel);
        }

        let (boot_vcpus, max_vcpus) = (self.cpus.boot_vcpus, self.cpus.max_vcpus);
        if boot_vcpus == 0 {
            return Err(ConfigError::NoBootVcpus);
        }
        if boot_vcpus > max_vcpus {
            return Err(ConfigError::BootAboveMax {
                boot: boot_vcpus,
                max: max_vcpus,
            });
        }
        if max_vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus(max_vcpus.into()));
        }

        let size = self.memory.size;
        if size < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(size));
        }
        if !size.is_multiple_of(MEMORY_ALIGNMENT) {
            return Err(ConfigError::MemoryUnaligned(size));
        }

        use ConsoleMode::*;
        self.serial
            .check("serial", &[Off, Null, Tty, File], "Off, Null, Tty or File")?;
        self.console
            .check("console", &[Off, Null, Tty, File], "Off, Null, Tty or File")?;
        if self.serial.mode == Tty && self.console.mode == Tty {
            return Err(ConfigError::TwoTtys);
        }

        // Device ids share one namespace (they key `vm.info`'s device_tree
        // and `vm.counters`).
        let mut ids = BTreeSet::new();
        for (index, disk) in self.disks.iter().enumerate() {
            disk.validate(index)?;
            check_id(&mut ids, &disk.id, || format!("disks[{index}].id"))?;
        }
        for (index, net) in self.net.iter().enumerate() {
            net.validate(index, boot_vcpus)?;
            check_id(&mut ids, &net.id, || format!("net[{index}].id"))?;
            // Two devices on one TAP would steal each other's frames (a
            // name with `%d` is a template: each device gets its own).
            let earlier = &self.net[..index];
            if let Some(tap) = net.tap.as_ref().filter(|t| !t.contains('%')) {
                if let Some(other) = earlier.iter().position(|n| n.tap.as_ref() == Some(tap)) {
                    return Err(ConfigError::Net {
                        field: format!("net[{index}].tap"),
                        reason: format!("`{tap}` is already the TAP of net[{other}]"),
                    });
                }
            }
            for fd in net.fds.iter().flatten() {
                if let Some(other) = earlier
                    .iter()
                    .position(|n| n.fds.iter().flatten().any(|f| f == fd))
                {
                    return Err(ConfigError::Net {
                        field: format!("net[{index}].fds"),
                        reason: format!("file descriptor {fd} is already used by net[{other}]"),
                    });
                }
            }
        }
        if self.rng.src.as_os_str().is_empty() {
            return Err(ConfigError::EmptyRngSource);
        }
        check_id(&mut ids, &self.rng.id, || "rng.id".to_string())?;
        Ok(())
    }

    /// Names the disks and NICs the client left unnamed as Cloud Hypervisor
    /// does (one counter, disks first, skipping names in use: `_disk0`,
    /// `_net1`), so that the config in `vm.info`, the device tree and
    /// `vm.counters` all use the same names.
    pub fn name_devices(&mut self) {
        let mut used: BTreeSet<String> = (self.disks.iter().map(|d| &d.id))
            .chain(self.net.iter().map(|n| &n.id))
            .chain([&self.rng.id])
            .flatten()
            .cloned()
            .collect();
        let mut counter = 0..;
        let mut fresh = |prefix: &str| {
            counter
                .by_ref()
                .map(|n| format!("{prefix}{n}"))
                .find(|id| used.insert(id.clone()))
        };
        for disk in self.disks.iter_mut().filter(|d| d.id.is_none()) {
            disk.id = fresh("_disk");
        }
        for net in self.net.iter_mut().filter(|n| n.id.is_none()) {
            net.id = fresh("_net");
        }
    }
}

/// Refuses an empty, reserved or already used device id; records it in `ids`.
fn check_id(
    ids: &mut BTreeSet<String>,
    id: &Option<String>,
    field: impl Fn() -> String,
) -> Result<(), ConfigError> {
    let Some(id) = id else { return Ok(()) };
    if id.is_empty() {
        return Err(ConfigError::EmptyId { field: field() });
    }
    if id.starts_with(RESERVED_ID_PREFIX) {
        return Err(ConfigError::ReservedId {
            field: field(),
            id: id.clone(),
        });
    }
    if !ids.insert(id.clone()) {
        return Err(ConfigError::DuplicateId {
            field: field(),
            id: id.clone(),
        });
    }
    Ok(())
}

/// `CpusConfig`. kite uses `u8` counts: [`MAX_VCPUS`] is far below 255.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        }
    }
}

/// `MemoryConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
        }
    }
}

/// `PayloadConfig`: a Linux kernel with optional initramfs and command line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PayloadConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// `DiskConfig`: a virtio-blk disk backed by a raw or qcow2 image file.
///
/// Of Cloud Hypervisor's other `DiskConfig` fields, kite accepts those whose
/// value asks for nothing it lacks (see [`crate::compat`]). Two are accepted
/// whatever their value, and documented in `openapi/kite.yaml`:
/// `backing_files` (kite always opens a qcow2 image's backing chain, read-only;
/// Cloud Hypervisor's default `false` refuses such images instead) and
/// `lock_granularity` (kite always locks the whole file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiskConfig {
    /// The image file. The VMM opens it at `vm.create` and reports a missing
    /// or unreadable file there; the API checks only that it is given.
    pub path: PathBuf,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO) and open the file so.
    pub readonly: bool,
    /// Open the image with `O_DIRECT`, bypassing the host page cache.
    pub direct: bool,
    /// Request queues, 1 to [`MAX_DISK_QUEUES`].
    pub num_queues: u16,
    /// Entries per queue: a power of two from [`MIN_DISK_QUEUE_SIZE`] to
    /// [`MAX_DISK_QUEUE_SIZE`].
    pub queue_size: u16,
    /// The device id in `vm.info` and `vm.counters`; the VMM names the disk
    /// when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The serial the guest reads (VIRTIO_BLK_T_GET_ID), at most 20 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The image format if the client names it; `None` lets the VMM detect
    /// it from the file. Naming it is safer for images a guest could write
    /// to: a raw image whose guest wrote a qcow2 header is still opened raw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_type: Option<ImageType>,
}

impl DiskConfig {
    /// A disk on `path` with Cloud Hypervisor's defaults for everything else.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            readonly: false,
            direct: false,
            num_queues: DEFAULT_DISK_NUM_QUEUES,
            queue_size: DEFAULT_DISK_QUEUE_SIZE,
            id: None,
            serial: None,
            image_type: None,
        }
    }

    /// Checks the values of `disks[index]`, all but its id.
    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::MissingDiskPath(index));
        }
        check_num_queues(index, self.num_queues.into())?;
        check_queue_size(index, self.queue_size.into())?;
        if let Some(serial) = &self.serial {
            if serial.len() > MAX_DISK_SERIAL_LEN {
                return Err(ConfigError::DiskSerialTooLong {
                    index,
                    len: serial.len(),
                });
            }
        }
        Ok(())
    }
}

/// Range check of `disks[index].num_queues`, also used on the wire value
/// before it is narrowed to `u16`.
pub(crate) fn check_num_queues(index: usize, value: u64) -> Result<u16, ConfigError> {
    u16::try_from(value)
        .ok()
        .filter(|n| (1..=MAX_DISK_QUEUES).contains(n))
        .ok_or(ConfigError::DiskNumQueues { index, value })
}

/// Range check of `disks[index].queue_size`; see [`check_num_queues`].
pub(crate) fn check_queue_size(index: usize, value: u64) -> Result<u16, ConfigError> {
    u16::try_from(value)
        .ok()
        .filter(|n| n.is_power_of_two() && (MIN_DISK_QUEUE_SIZE..=MAX_DISK_QUEUE_SIZE).contains(n))
        .ok_or(ConfigError::DiskQueueSize { index, value })
}

/// `ImageType`: the disk image formats kite opens. Cloud Hypervisor's
/// `Unknown` (its default) means "detect"; kite spells that as no
/// `image_type`. Its other formats (FlatVmdk, FixedVhd, Vhdx) are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    Raw,
    Qcow2,
}

/// `NetConfig`: a virtio-net device whose host side is a TAP interface.
///
/// The backend is one of: the already open TAP file descriptors `fds` (one
/// per queue pair, from the command line's `fd=`; used as they are), the TAP
/// named `tap` if that interface exists (attached to as it is: its addresses
/// are left alone), or a TAP the VMM creates, named `tap` or, without one,
/// named by the kernel (`kite0`, `kite1`...), whose host side gets
/// `ip`/`mask`. On a TAP opened by name (existing or created) `host_mac` and
/// `mtu`, when given, are set and the interface is brought up; on inherited
/// descriptors only `mtu` is set. These are Cloud Hypervisor's semantics
/// (but for the defaults of `ip` and `mask`, which it dropped in v49: kite
/// keeps its documented schema's defaults).
///
/// Of Cloud Hypervisor's other `NetConfig` fields kite accepts only their
/// defaults (see [`crate::compat`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetConfig {
    /// The TAP interface's name, at most [`MAX_TAP_NAME_LEN`] bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Host-side IPv4 address of a TAP the VMM creates.
    pub ip: Ipv4Addr,
    /// Netmask of `ip`.
    pub mask: Ipv4Addr,
    /// The guest's MAC address. When absent the VMM picks a random locally
    /// administered one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The TAP interface's own (host-side) MAC address; the kernel's random
    /// one when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<MacAddr>,
    /// MTU given to the guest (VIRTIO_NET_F_MTU) and set on the TAP; the
    /// kernel's default (1500) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Receive plus transmit queues: twice the number of queue pairs, even,
    /// from 2 to [`MAX_NET_NUM_QUEUES`].
    pub num_queues: u16,
    /// Entries per queue: a power of two from [`MIN_NET_QUEUE_SIZE`] to
    /// [`MAX_NET_QUEUE_SIZE`].
    pub queue_size: u16,
    /// The device id in `vm.info` and `vm.counters`; the VMM names the device
    /// when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Open TAP file descriptors, one per queue pair, inherited by the VMM
    /// process (command line only: a JSON config cannot carry them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fds: Option<Vec<i32>>,
    /// Offer TCP segmentation offload (both directions). Needs `offload_csum`.
    pub offload_tso: bool,
    /// Offer UDP fragmentation offload (both directions). Needs `offload_csum`.
    pub offload_ufo: bool,
    /// Offer checksum offload (both directions).
    pub offload_csum: bool,
}

impl Default for NetConfig {
    /// Cloud Hypervisor's defaults: a TAP the VMM creates, 192.168.249.1/24
    /// on the host side, one queue pair of 256 entries, all offloads.
    fn default() -> Self {
        NetConfig {
            tap: None,
            ip: DEFAULT_NET_IP,
            mask: DEFAULT_NET_MASK,
            mac: None,
            host_mac: None,
            mtu: None,
            num_queues: DEFAULT_NET_NUM_QUEUES,
            queue_size: DEFAULT_NET_QUEUE_SIZE,
            id: None,
            fds: None,
            offload_tso: true,
            offload_ufo: true,
            offload_csum: true,
        }
    }
}

impl NetConfig {
    /// Queue pairs (each a receive and a transmit queue).
    pub fn queue_pairs(&self) -> u16 {
        self.num_queues / 2
    }

    /// Checks the values of `net[index]`, all but its id. `boot_vcpus`
    /// bounds the queue pairs, as in Cloud Hypervisor.
    fn validate(&self, index: usize, boot_vcpus: u8) -> Result<(), ConfigError> {
        let bad = |field: &str, reason: String| ConfigError::Net {
            field: format!("net[{index}].{field}"),
            reason,
        };
        let n = self.num_queues;
        check_net_num_queues(index, n.into())?;
        check_net_queue_size(index, self.queue_size.into())?;
        if self.queue_pairs() > u16::from(boot_vcpus) {
            return Err(bad(
                "num_queues",
                format!(
                    "{n} queues are {} queue pairs, more than the {boot_vcpus} boot vCPU(s)",
                    self.queue_pairs()
                ),
            ));
        }
        if let Some(tap) = &self.tap {
            check_tap_name(tap).map_err(|reason| bad("tap", reason))?;
        }
        check_netmask(self.mask).map_err(|reason| bad("mask", reason))?;
        if let Some(mtu) = self.mtu {
            check_net_mtu(index, mtu.into())?;
        }
        for (field, mac) in [("mac", self.mac), ("host_mac", self.host_mac)] {
            if let Some(mac) = mac {
                mac.check_unicast().map_err(|reason| bad(field, reason))?;
            }
        }
        if !self.offload_csum && (self.offload_tso || self.offload_ufo) {
            return Err(bad(
                "offload_csum",
                "offload_tso and offload_ufo need checksum offload; turn them off too or leave offload_csum on".into(),
            ));
        }
        if let Some(fds) = &self.fds {
            if self.tap.is_some() {
                return Err(bad(
                    "fds",
                    "give either a TAP name or TAP file descriptors, not both".into(),
                ));
            }
            if self.host_mac.is_some() {
                return Err(bad(
                    "host_mac",
                    "applies only to a TAP kite opens by name (set it on the TAP behind the file descriptors instead)".into(),
                ));
            }
            if fds.len() != usize::from(self.queue_pairs()) {
                return Err(bad(
                    "fds",
                    format!(
                        "{} file descriptor(s) given, but num_queues {n} needs one per queue pair ({})",
                        fds.len(),
                        self.queue_pairs()
                    ),
                ));
            }
            if let Some(fd) = fds.iter().find(|&&fd| fd <= 2) {
                return Err(bad(
                    "fds",
                    format!("{fd} is not a TAP file descriptor (0, 1 and 2 are stdin, stdout and stderr)"),
                ));
            }
            for (i, fd) in fds.iter().enumerate() {
                if fds[..i].contains(fd) {
                    return Err(bad("fds", format!("{fd} is given more than once")));
                }
            }
        }
        Ok(())
    }
}

/// Range check of `net[index].num_queues`, also used on the wire value.
pub(crate) fn check_net_num_queues(index: usize, value: u64) -> Result<u16, ConfigError> {
    u16::try_from(value)
        .ok()
        .filter(|n| n % 2 == 0 && (2..=MAX_NET_NUM_QUEUES).contains(n))
        .ok_or_else(|| ConfigError::Net {
            field: format!("net[{index}].num_queues"),
            reason: format!(
                "{value} must be even (a receive and a transmit queue per pair), from 2 to {MAX_NET_NUM_QUEUES}"
            ),
        })
}

/// Range check of `net[index].queue_size`, also used on the wire value.
pub(crate) fn check_net_queue_size(index: usize, value: u64) -> Result<u16, ConfigError> {
    u16::try_from(value)
        .ok()
        .filter(|n| n.is_power_of_two() && (MIN_NET_QUEUE_SIZE..=MAX_NET_QUEUE_SIZE).contains(n))
        .ok_or_else(|| ConfigError::Net {
            field: format!("net[{index}].queue_size"),
            reason: format!(
                "{value} must be a power of two from {MIN_NET_QUEUE_SIZE} to {MAX_NET_QUEUE_SIZE}"
            ),
        })
}

/// Range check of `net[index].mtu`, also used on the wire value.
pub(crate) fn check_net_mtu(index: usize, value: u64) -> Result<u16, ConfigError> {
    u16::try_from(value)
        .ok()
        .filter(|n| (MIN_NET_MTU..=MAX_NET_MTU).contains(n))
        .ok_or_else(|| ConfigError::Net {
            field: format!("net[{index}].mtu"),
            reason: format!("{value} must be from {MIN_NET_MTU} to {MAX_NET_MTU}"),
        })
}

/// An interface name the kernel accepts (`dev_valid_name`): 1 to 15 bytes,
/// not `.` or `..`, without `/`, `:` or white space. A `%d` in it asks the
/// kernel to number the interface.
pub fn check_tap_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the TAP name is empty (leave it out to let kite create one)".into());
    }
    if name.len() > MAX_TAP_NAME_LEN {
        return Err(format!(
            "TAP name `{name}` is {} bytes; interface names have at most {MAX_TAP_NAME_LEN}",
            name.len()
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':', '\0'])
        || name.contains(char::is_whitespace)
    {
        return Err(format!(
            "`{name}` is not a valid interface name (no `/`, `:` or white space)"
        ));
    }
    Ok(())
}

/// A netmask's one bits must be contiguous, from the top.
fn check_netmask(mask: Ipv4Addr) -> Result<(), String> {
    let bits = u32::from(mask);
    if bits.leading_ones() + bits.trailing_zeros() != 32 {
        return Err(format!(
            "{mask} is not a netmask (its one bits must be contiguous, e.g. 255.255.255.0)"
        ));
    }
    Ok(())
}

/// An Ethernet MAC address, written `12:34:56:78:9a:bc` in configs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Refuses multicast (group) and all-zero addresses, which no interface
    /// can have.
    pub fn check_unicast(&self) -> Result<(), String> {
        if self.0[0] & 1 != 0 {
            return Err(format!(
                "{self} is a multicast address (the low bit of the first byte is set)"
            ));
        }
        if self.0 == [0; 6] {
            return Err(format!("{self} is not a valid interface address"));
        }
        Ok(())
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;

    /// Six hexadecimal bytes separated by colons, as Cloud Hypervisor takes
    /// them (`12:34:56:78:9a:bc`; a byte may be one digit).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("`{s}` is not a MAC address (expected six hexadecimal bytes, e.g. 12:34:56:78:9a:bc)")
        };
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// `RngConfig`: the virtio-rng device and where its entropy comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RngConfig {
    /// Host file the device reads; [`DEFAULT_RNG_SOURCE`] by default.
    pub src: PathBuf,
    /// The device id; the VMM names the device when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            src: PathBuf::from(DEFAULT_RNG_SOURCE),
            id: None,
        }
    }
}

/// Where a console's output goes (`ConsoleMode` in the spec). All of Cloud
/// Hypervisor's modes parse, so an unsupported one gets a message naming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

/// `SerialConfig` / `ConsoleConfig`: the fields kite uses of either.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl ConsoleConfig {
    /// Cloud Hypervisor's serial default: the port exists, output is dropped.
    pub fn serial_default() -> Self {
        ConsoleConfig {
            mode: ConsoleMode::Null,
            file: None,
        }
    }

    /// The virtio-console is off unless asked for. Cloud Hypervisor defaults
    /// it to Tty, but kite's command line already gives the terminal to the
    /// serial port (where Linux's early boot messages go), and two devices
    /// cannot share it; a VMM serving only the API should not grab the
    /// terminal unasked either. So kite adds the device only when asked.
    pub fn console_default() -> Self {
        ConsoleConfig {
            mode: ConsoleMode::Off,
            file: None,
        }
    }

    fn check(
        &self,
        device: &'static str,
        modes: &[ConsoleMode],
        allowed: &'static str,
    ) -> Result<(), ConfigError> {
        if !modes.contains(&self.mode) {
            return Err(ConfigError::Mode {
                device,
                mode: self.mode,
                allowed,
            });
        }
        match (self.mode, non_empty(&self.file)) {
            (ConsoleMode::File, None) => Err(ConfigError::MissingFile(device)),
            (ConsoleMode::File, Some(_)) | (_, None) => Ok(()),
            (_, Some(_)) => Err(ConfigError::StrayFile(device)),
        }
    }
}

/// An empty path (`""` in JSON) means "not given".
fn non_empty(path: &Option<PathBuf>) -> Option<&Path> {
    path.as_deref().filter(|p| !p.as_os_str().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Cloud Hypervisor itself serializes for `--kernel k --cpus boot=2
    /// --memory size=1G --serial tty --console off`: every default spelled out.
    const CH_FULL_CONFIG: &str = r#"{
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": null, "kvm_hyperv": false,
                 "max_phys_bits": 46, "affinity": null, "features": {"amx": false},
                 "nested": true, "core_scheduling": "Vm", "profile": "Host"},
        "memory": {"size": 1073741824, "mergeable": false, "hotplug_method": "Acpi",
                   "hotplug_size": null, "hotplugged_size": null, "shared": false,
                   "hugepages": false, "hugepage_size": null, "prefault": false,
                   "reserve": false, "zones": null, "thp": true},
        "payload": {"firmware": null, "kernel": "/boot/vmlinux", "cmdline": "console=ttyS0",
                    "initramfs": null, "igvm": null, "host_data": null},
        "rate_limit_groups": null,
        "disks": [{"path": "/var/disk.img", "readonly": false, "direct": false, "iommu": false,
                   "num_queues": 1, "queue_size": 128, "vhost_user": false, "id": "_disk0",
                   "pci_segment": 0, "disable_io_uring": false, "disable_aio": false,
                   "backing_files": false, "sparse": true, "image_type": "Unknown",
                   "lock_granularity": "ByteRange"}],
        "net": [],
        "rng": {"src": "/dev/urandom", "iommu": false, "pci_segment": 0},
        "balloon": null, "fs": null, "generic_vhost_user": null, "pmem": null,
        "serial": {"file": null, "mode": "Tty", "socket": null},
        "console": {"file": null, "mode": "Off", "socket": null, "iommu": false,
                    "id": null, "pci_segment": 0, "pci_device_id": null},
        "debug_console": {"file": null, "mode": "Off", "iobase": 233},
        "devices": null, "user_devices": null, "vdpa": null, "vsock": null,
        "numa": null, "iommu": false, "watchdog": false, "rtc": null, "pvpanic": false,
        "pci_segments": null, "platform": null, "tpm": null,
        "landlock_enable": false, "landlock_rules": null
    }"#;

    fn minimal() -> VmConfig {
        parse_vm_config(br#"{"payload": {"kernel": "/k"}}"#).unwrap()
    }

    fn err(json: &str) -> String {
        parse_vm_config(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn full_ch_config_with_defaults_is_accepted() {
        let config = parse_vm_config(CH_FULL_CONFIG.as_bytes()).unwrap();
        assert_eq!(
            config.cpus,
            CpusConfig {
                boot_vcpus: 2,
                max_vcpus: 2
            }
        );
        assert_eq!(config.memory.size, 1 << 30);
        assert_eq!(
            config.payload.kernel.as_deref(),
            Some(Path::new("/boot/vmlinux"))
        );
        assert_eq!(config.payload.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!(config.serial.mode, ConsoleMode::Tty);
        assert_eq!(config.console.mode, ConsoleMode::Off);
        assert_eq!(
            config.disks,
            [DiskConfig {
                id: Some("_disk0".into()),
                ..DiskConfig::new("/var/disk.img")
            }]
        );
        assert_eq!(config.rng, RngConfig::default());
    }

    #[test]
    fn unnamed_devices_are_named_as_cloud_hypervisor_does() {
        let mut config = minimal();
        let disk = |id: Option<&str>| DiskConfig {
            id: id.map(Into::into),
            ..DiskConfig::new("/d")
        };
        let net = |id: Option<&str>| NetConfig {
            id: id.map(Into::into),
            ..NetConfig::default()
        };
        config.disks = vec![disk(None), disk(Some("_disk1")), disk(None)];
        config.net = vec![net(None), net(Some("lan"))];
        config.name_devices();
        let ids = |v: Vec<&Option<String>>| v.into_iter().flatten().cloned().collect::<Vec<_>>();
        assert_eq!(
            ids(config.disks.iter().map(|d| &d.id).collect()),
            ["_disk0", "_disk1", "_disk2"]
        );
        assert_eq!(
            ids(config.net.iter().map(|n| &n.id).collect()),
            ["_net3", "lan"]
        );
        // Named once, the names stay (a reboot rebuilds from this config).
        let before = config.clone();
        config.name_devices();
        assert_eq!(config, before);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = minimal();
        assert_eq!(config.cpus, CpusConfig::default());
        assert_eq!(config.memory.size, DEFAULT_MEMORY_SIZE);
        assert_eq!(config.serial, ConsoleConfig::serial_default());
        assert_eq!(config.console, ConsoleConfig::console_default());
        assert!(config.disks.is_empty());
        assert_eq!(config.rng.src, Path::new("/dev/urandom"));
        assert_eq!(config.rng.id, None);
        assert_eq!(
            config,
            VmConfig {
                payload: config.payload.clone(),
                ..VmConfig::default()
            }
        );
    }

    #[test]
    fn unsupported_values_name_the_field() {
        let cases = [
            (
                r#""net": [{"tap": "tap0", "vhost_user": true}]"#,
                "net[0].vhost_user: vhost-user is not supported by kite yet",
            ),
            (
                r#""fs": [{"tag": "t", "socket": "/s", "num_queues": 1, "queue_size": 1024}]"#,
                "fs: virtio-fs",
            ),
            (r#""pmem": [{"file": "/p"}]"#, "pmem: virtio-pmem"),
            (r#""balloon": {"size": 0}"#, "balloon: virtio-balloon"),
            (r#""devices": [{"path": "/sys/x"}]"#, "devices: VFIO"),
            (
                r#""disks": [{"path": "/d"}, {"path": "/e", "iommu": true}]"#,
                "disks[1].iommu: the virtual IOMMU",
            ),
            (
                r#""disks": [{"vhost_user": true, "vhost_socket": "/s"}]"#,
                "disks[0].vhost_socket: vhost-user is not supported",
            ),
            (
                r#""disks": [{"path": "/d", "rate_limiter_config": {"ops": {"size": 1, "refill_time": 1}}}]"#,
                "disks[0].rate_limiter_config: I/O rate limiting",
            ),
            (
                r#""disks": [{"path": "/d", "sparse": false}]"#,
                "disks[0].sparse: disabling sparse images is not supported",
            ),
            (
                r#""disks": [{"path": "/d", "pci_device_id": 5}]"#,
                "disks[0].pci_device_id: choosing the PCI slot",
            ),
            (
                r#""disks": [{"path": "/d", "image_type": "Vhdx"}]"#,
                "disks[0].image_type: the Vhdx image format is not supported",
            ),
            (
                r#""disks": [{"path": "/d", "backing_files": "yes"}]"#,
                "disks[0].backing_files:",
            ),
            (
                r#""rng": {"src": "/dev/random", "iommu": true}"#,
                "rng.iommu:",
            ),
            (
                r#""rng": {"src": "/dev/random", "pci_segment": 1}"#,
                "rng.pci_segment:",
            ),
            (r#""iommu": true"#, "iommu: the virtual IOMMU"),
            (
                r#""vsock": {"cid": 3, "socket": "/v"}"#,
                "vsock: virtio-vsock",
            ),
            (r#""debug_console": {"mode": "Tty"}"#, "debug_console:"),
            (
                r#""cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": true}"#,
                "cpus.kvm_hyperv:",
            ),
            (
                r#""cpus": {"boot_vcpus": 1, "max_vcpus": 1, "nested": false}"#,
                "cpus.nested: disabling nested",
            ),
            (
                r#""cpus": {"boot_vcpus": 1, "max_vcpus": 1, "features": {"amx": true}}"#,
                "cpus.features: AMX",
            ),
            (
                r#""memory": {"size": 1073741824, "hugepages": true}"#,
                "memory.hugepages:",
            ),
            (
                r#""memory": {"size": 1073741824, "thp": false}"#,
                "memory.thp:",
            ),
            (
                r#""memory": {"size": 1073741824, "zones": [{"id": "z", "size": 1}]}"#,
                "memory.zones:",
            ),
            (
                r#""serial": {"mode": "Socket", "socket": "/s"}"#,
                "serial.socket: socket output",
            ),
            (
                r#""console": {"mode": "Off", "iommu": true}"#,
                "console.iommu:",
            ),
        ];
        for (extra, expected) in cases {
            let json = format!(r#"{{"payload": {{"kernel": "/k"}}, {extra}}}"#);
            let message = err(&json);
            assert!(message.contains(expected), "{extra}: got {message:?}");
        }
        let message = err(r#"{"payload": {"kernel": "/k", "firmware": "/fw"}}"#);
        assert_eq!(
            message,
            "payload.firmware: firmware boot is not supported by kite yet"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert_eq!(
            err(r#"{"payload": {"kernel": "/k"}, "foo": 1}"#),
            "unknown field `foo`"
        );
        assert_eq!(
            err(
                r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "bogus": null}}"#
            ),
            "unknown field `cpus.bogus`"
        );
        assert_eq!(
            err(r#"{"payload": {"kernel": "/k", "kernal": "/x"}}"#),
            "unknown field `payload.kernal`"
        );
        assert_eq!(
            err(r#"{"payload": {"kernel": "/k"}, "rng": {"src": "/dev/urandom", "x": 1}}"#),
            "unknown field `rng.x`"
        );
        assert_eq!(
            err(
                r#"{"payload": {"kernel": "/k"}, "disks": [{"path": "/d", "readonly": false, "ro": true}]}"#
            ),
            "unknown field `disks[0].ro`"
        );
        // A CH default object with a field CH does not have is not a default.
        assert!(
            err(r#"{"payload": {"kernel": "/k"}, "debug_console": {"mode": "Off", "x": 1}}"#)
                .starts_with("debug_console:")
        );
    }

    #[test]
    fn serde_errors_are_reported() {
        assert!(err("{").starts_with("invalid VmConfig: EOF"));
        assert!(err("{}").contains("missing field `payload`"));
        assert!(
            err(r#"{"payload": {}, "cpus": {"boot_vcpus": "two", "max_vcpus": 2}}"#)
                .contains("invalid type: string \"two\"")
        );
        assert!(
            err(r#"{"payload": {"kernel": "/k"}, "memory": {}}"#).contains("missing field `size`")
        );
        assert!(
            err(r#"{"payload": {"kernel": "/k"}, "serial": {"mode": "off"}}"#)
                .contains("unknown variant `off`")
        );
        assert!(err("[1]").starts_with("invalid VmConfig:"));
        assert!(err(
            r#"{"payload": {"kernel": "/k"}, "disks": [{"path": "/d", "image_type": "vmdk"}]}"#
        )
        .contains("unknown variant `vmdk`"));
        assert!(err(
            r#"{"payload": {"kernel": "/k"}, "disks": [{"path": "/d", "readonly": "on"}]}"#
        )
        .contains("invalid type: string \"on\", expected a boolean"));
        assert!(
            err(r#"{"payload": {"kernel": "/k"}, "disks": {"path": "/d"}}"#)
                .contains("expected a sequence")
        );
    }

    #[test]
    fn validate_errors() {
        let cases = [
            (r#"{"payload": {}}"#, "payload.kernel is required"),
            (
                r#"{"payload": {"kernel": ""}}"#,
                "payload.kernel is required",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 0, "max_vcpus": 1}}"#,
                "at least 1",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 4, "max_vcpus": 2}}"#,
                "cpus.boot_vcpus (4) must not exceed cpus.max_vcpus (2)",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 64}}"#,
                "cpus: 64 vCPUs is more than kite's maximum of 32",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 4096}}"#,
                "cpus: 4096 vCPUs",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "memory": {"size": 1048576}}"#,
                "below kite's minimum of 16 MiB",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "memory": {"size": 16777217}}"#,
                "not a multiple of 4 KiB",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "serial": {"mode": "Pty"}}"#,
                "serial.mode Pty is not supported",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "serial": {"mode": "File"}}"#,
                "serial.file is required",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "serial": {"mode": "Tty", "file": "/x"}}"#,
                "serial.file is only used",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "console": {"mode": "Pty"}}"#,
                "console.mode Pty is not supported by kite yet (use Off, Null, Tty or File)",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "console": {"mode": "Socket", "socket": null}}"#,
                "console.mode Socket is not supported",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "console": {"mode": "File"}}"#,
                "console.file is required",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "console": {"mode": "Null", "file": "/x"}}"#,
                "console.file is only used",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "serial": {"mode": "Tty"}, "console": {"mode": "Tty"}}"#,
                "serial.mode and console.mode are both Tty",
            ),
        ];
        for (json, expected) in cases {
            let message = err(json);
            assert!(message.contains(expected), "{json}: got {message:?}");
        }
        let mut ok = minimal();
        ok.serial = ConsoleConfig {
            mode: ConsoleMode::File,
            file: Some("/tmp/serial.log".into()),
        };
        ok.validate().unwrap();
    }

    #[test]
    fn serializes_in_ch_shape_and_round_trips() {
        let mut config = minimal();
        config.payload.cmdline = Some("console=ttyS0".into());
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
                "memory": {"size": DEFAULT_MEMORY_SIZE},
                "payload": {"kernel": "/k", "cmdline": "console=ttyS0"},
                "rng": {"src": "/dev/urandom"},
                "serial": {"mode": "Null"},
                "console": {"mode": "Off"}
            })
        );
        let back: VmConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, config);
        // Plain serde deserialization refuses unsupported fields too.
        let bad = serde_json::from_str::<VmConfig>(r#"{"payload": {}, "fs": [{}]}"#).unwrap_err();
        assert!(bad.to_string().contains("fs: virtio-fs"));
    }

    #[test]
    fn disks_rng_and_console_parse_and_round_trip() {
        let json = r#"{
            "payload": {"kernel": "/k"},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "disks": [
                {"path": "/images/root.qcow2", "readonly": true, "direct": true,
                 "num_queues": 2, "queue_size": 256, "id": "root", "serial": "ROOT-0001",
                 "image_type": "Qcow2"},
                {"path": "/images/data.img", "readonly": null, "image_type": "Raw",
                 "backing_files": true, "lock_granularity": "Full"},
                {"path": "/images/scratch.img", "image_type": null}
            ],
            "rng": {"src": "/dev/random", "id": "entropy", "iommu": false,
                    "pci_segment": 0, "pci_device_id": null},
            "serial": {"mode": "Off"},
            "console": {"mode": "Tty", "iommu": false, "id": null}
        }"#;
        let config = parse_vm_config(json.as_bytes()).unwrap();
        assert_eq!(
            config.disks,
            [
                DiskConfig {
                    readonly: true,
                    direct: true,
                    num_queues: 2,
                    queue_size: 256,
                    id: Some("root".into()),
                    serial: Some("ROOT-0001".into()),
                    image_type: Some(ImageType::Qcow2),
                    ..DiskConfig::new("/images/root.qcow2")
                },
                DiskConfig {
                    image_type: Some(ImageType::Raw),
                    ..DiskConfig::new("/images/data.img")
                },
                DiskConfig::new("/images/scratch.img"),
            ]
        );
        assert_eq!(
            config.rng,
            RngConfig {
                src: "/dev/random".into(),
                id: Some("entropy".into())
            }
        );
        assert_eq!(config.serial.mode, ConsoleMode::Off);
        assert_eq!(config.console.mode, ConsoleMode::Tty);

        let out = serde_json::to_value(&config).unwrap();
        assert_eq!(
            out["disks"],
            serde_json::json!([
                {"path": "/images/root.qcow2", "readonly": true, "direct": true,
                 "num_queues": 2, "queue_size": 256, "id": "root", "serial": "ROOT-0001",
                 "image_type": "Qcow2"},
                {"path": "/images/data.img", "readonly": false, "direct": false,
                 "num_queues": 1, "queue_size": 128, "image_type": "Raw"},
                {"path": "/images/scratch.img", "readonly": false, "direct": false,
                 "num_queues": 1, "queue_size": 128}
            ])
        );
        assert_eq!(
            out["rng"],
            serde_json::json!({"src": "/dev/random", "id": "entropy"})
        );
        assert_eq!(out["console"], serde_json::json!({"mode": "Tty"}));
        let back = parse_vm_config(out.to_string().as_bytes()).unwrap();
        assert_eq!(back, config);

        // Console File, and an explicit `disks: null` / `rng: null`.
        let config = parse_vm_config(
            br#"{"payload": {"kernel": "/k"}, "disks": null, "rng": null, "serial": {"mode": "Tty"},
                 "console": {"mode": "File", "file": "/tmp/hvc0.log"}}"#,
        )
        .unwrap();
        assert!(config.disks.is_empty());
        assert_eq!(config.rng, RngConfig::default());
        assert_eq!(
            config.console.file.as_deref(),
            Some(Path::new("/tmp/hvc0.log"))
        );
        // `rng` without `src` gets /dev/urandom.
        let config =
            parse_vm_config(br#"{"payload": {"kernel": "/k"}, "rng": {"id": "r"}}"#).unwrap();
        assert_eq!(config.rng.src, Path::new(DEFAULT_RNG_SOURCE));
    }

    #[test]
    fn ch_default_rng_object_is_accepted() {
        let config = parse_vm_config(
            br#"{"payload": {"kernel": "/k"},
                 "rng": {"src": "/dev/urandom", "iommu": false, "pci_segment": 0}}"#,
        )
        .unwrap();
        assert_eq!(config.rng, RngConfig::default());
    }

    #[test]
    fn disk_and_device_id_errors() {
        let disk = |fields: &str| {
            err(&format!(
                r#"{{"payload": {{"kernel": "/k"}}, "disks": [{{"path": "/d", {fields}}}]}}"#
            ))
        };
        let cases = [
            (
                disk(r#""queue_size": 100"#),
                "disks[0].queue_size (100) must be a power of two from 4 to 1024",
            ),
            (disk(r#""queue_size": 0"#), "disks[0].queue_size (0)"),
            (disk(r#""queue_size": 2048"#), "disks[0].queue_size (2048)"),
            (disk(r#""queue_size": 2"#), "disks[0].queue_size (2)"),
            (
                disk(r#""queue_size": 65536"#),
                "disks[0].queue_size (65536)",
            ),
            (
                disk(r#""num_queues": 0"#),
                "disks[0].num_queues (0) must be from 1 to 16",
            ),
            (disk(r#""num_queues": 17"#), "disks[0].num_queues (17)"),
            (
                disk(r#""num_queues": 4294967296"#),
                "disks[0].num_queues (4294967296)",
            ),
            (
                disk(r#""serial": "123456789012345678901""#),
                "disks[0].serial is 21 bytes",
            ),
            (disk(r#""id": """#), "disks[0].id must not be empty"),
            (disk(r#""id": "__rng""#), "disks[0].id `__rng` is reserved"),
            (
                err(r#"{"payload": {"kernel": "/k"}, "disks": [{"readonly": true}]}"#),
                "disks[0].path is required",
            ),
            (
                err(r#"{"payload": {"kernel": "/k"}, "disks": [{"path": "/a"}, {"path": ""}]}"#),
                "disks[1].path is required",
            ),
            (
                err(r#"{"payload": {"kernel": "/k"},
                        "disks": [{"path": "/a", "id": "d"}, {"path": "/b", "id": "d"}]}"#),
                "disks[1].id `d` is already the id of another device",
            ),
            (
                err(
                    r#"{"payload": {"kernel": "/k"}, "disks": [{"path": "/a", "id": "x"}],
                        "rng": {"src": "/dev/urandom", "id": "x"}}"#,
                ),
                "rng.id `x` is already the id",
            ),
            (
                err(r#"{"payload": {"kernel": "/k"}, "rng": {"src": ""}}"#),
                "rng.src must not be empty",
            ),
        ];
        for (message, expected) in cases {
            assert!(message.contains(expected), "{expected}: got {message:?}");
        }
        // The bounds themselves are fine.
        for (n, size) in [(1, 4), (16, 1024), (4, 128)] {
            let json = format!(
                r#"{{"payload": {{"kernel": "/k"}}, "disks": [{{"path": "/d", "num_queues": {n}, "queue_size": {size}}}]}}"#
            );
            parse_vm_config(json.as_bytes()).unwrap();
        }
        // Struct-level checks catch what embedders and the CLI build.
        let mut config = minimal();
        config.disks = vec![DiskConfig {
            queue_size: 96,
            ..DiskConfig::new("/d")
        }];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::DiskQueueSize {
                index: 0,
                value: 96
            })
        ));
        config.disks[0].queue_size = 64;
        config.disks[0].num_queues = 0;
        assert!(matches!(
            config.validate(),
            Err(ConfigError::DiskNumQueues { index: 0, value: 0 })
        ));
        config.disks[0].num_queues = 1;
        config.validate().unwrap();
    }

    #[test]
    fn net_parses_with_ch_defaults_and_round_trips() {
        let config = parse_vm_config(
            br#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                 "net": [{}, {"tap": "tap7", "ip": "10.0.0.1", "mask": "255.255.0.0",
                           "mac": "12:34:56:78:9A:bc", "host_mac": "2:0:0:0:0:1", "mtu": 9000,
                           "num_queues": 4, "queue_size": 1024, "id": "lan",
                           "offload_tso": false, "offload_ufo": false, "offload_csum": true}]}"#,
        )
        .unwrap();
        assert_eq!(config.net[0], NetConfig::default());
        assert_eq!(
            config.net[1],
            NetConfig {
                tap: Some("tap7".into()),
                ip: Ipv4Addr::new(10, 0, 0, 1),
                mask: Ipv4Addr::new(255, 255, 0, 0),
                mac: Some(MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])),
                host_mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
                mtu: Some(9000),
                num_queues: 4,
                queue_size: 1024,
                id: Some("lan".into()),
                fds: None,
                offload_tso: false,
                offload_ufo: false,
                offload_csum: true,
            }
        );
        assert_eq!(config.net[1].queue_pairs(), 2);
        let out = serde_json::to_value(&config).unwrap();
        assert_eq!(
            out["net"],
            serde_json::json!([
                {"ip": "192.168.249.1", "mask": "255.255.255.0", "num_queues": 2,
                 "queue_size": 256, "offload_tso": true, "offload_ufo": true,
                 "offload_csum": true},
                {"tap": "tap7", "ip": "10.0.0.1", "mask": "255.255.0.0",
                 "mac": "12:34:56:78:9a:bc", "host_mac": "02:00:00:00:00:01", "mtu": 9000,
                 "num_queues": 4, "queue_size": 1024, "id": "lan", "offload_tso": false,
                 "offload_ufo": false, "offload_csum": true}
            ])
        );
        let back = parse_vm_config(out.to_string().as_bytes()).unwrap();
        assert_eq!(back, config);
        // No net devices: vm.info has no "net".
        assert!(serde_json::to_value(minimal())
            .unwrap()
            .get("net")
            .is_none());
    }

    #[test]
    fn ch_net_objects_with_defaults_are_accepted() {
        // What Cloud Hypervisor's vm.info gives for `--net tap=,mac=...`.
        let config = parse_vm_config(
            br#"{"payload": {"kernel": "/k"},
                 "net": [{"tap": null, "ip": null, "mask": null, "mac": "52:54:00:12:34:56",
                          "host_mac": null, "mtu": null, "iommu": false, "num_queues": 2,
                          "queue_size": 256, "vhost_user": false, "vhost_socket": null,
                          "vhost_mode": "Client", "id": "_net1", "fds": null,
                          "rate_limiter_config": null, "pci_segment": 0,
                          "offload_tso": true, "offload_ufo": true, "offload_csum": true}]}"#,
        )
        .unwrap();
        assert_eq!(
            config.net,
            [NetConfig {
                mac: Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])),
                id: Some("_net1".into()),
                ..NetConfig::default()
            }]
        );
    }

    #[test]
    fn net_errors_name_the_field() {
        let net = |fields: &str| {
            err(&format!(
                r#"{{"payload": {{"kernel": "/k"}}, "cpus": {{"boot_vcpus": 4, "max_vcpus": 4}},
                    "net": [{{{fields}}}]}}"#
            ))
        };
        let cases = [
            (
                net(r#""mac": "12:34:56:78:9a""#),
                "net[0].mac: `12:34:56:78:9a` is not a MAC address",
            ),
            (net(r#""mac": "12:34:56:78:9a:bc:de""#), "net[0].mac:"),
            (net(r#""mac": "zz:34:56:78:9a:bc""#), "net[0].mac:"),
            (net(r#""mac": "123:4:56:78:9a:bc""#), "net[0].mac:"),
            (
                net(r#""mac": "01:00:5e:00:00:01""#),
                "net[0].mac: 01:00:5e:00:00:01 is a multicast address",
            ),
            (
                net(r#""host_mac": "00:00:00:00:00:00""#),
                "net[0].host_mac: 00:00:00:00:00:00 is not a valid",
            ),
            (
                net(r#""ip": "192.168.1""#),
                "net[0].ip: `192.168.1` is not an IPv4 address",
            ),
            (
                net(r#""ip": "fd00::1""#),
                "net[0].ip: an IPv6 host address is not supported by kite yet",
            ),
            (
                net(r#""mask": "255.0.255.0""#),
                "net[0].mask: 255.0.255.0 is not a netmask",
            ),
            (net(r#""mask": "nope""#), "net[0].mask: `nope`"),
            (
                net(r#""num_queues": 3"#),
                "net[0].num_queues: 3 must be even (a receive and a transmit queue per pair), from 2 to 16",
            ),
            (net(r#""num_queues": 0"#), "net[0].num_queues: 0"),
            (net(r#""num_queues": 18"#), "net[0].num_queues: 18"),
            (
                net(r#""num_queues": 10"#),
                "net[0].num_queues: 10 queues are 5 queue pairs, more than the 4 boot vCPU(s)",
            ),
            (
                net(r#""queue_size": 100"#),
                "net[0].queue_size: 100 must be a power of two from 4 to 1024",
            ),
            (net(r#""queue_size": 2048"#), "net[0].queue_size: 2048"),
            (
                net(r#""mtu": 1000"#),
                "net[0].mtu: 1000 must be from 1280 to 65521",
            ),
            (net(r#""mtu": 70000"#), "net[0].mtu: 70000"),
            (net(r#""mtu": 65522"#), "net[0].mtu: 65522"),
            (
                net(r#""tap": "a-very-long-tap-name""#),
                "net[0].tap: TAP name `a-very-long-tap-name` is 20 bytes; interface names have at most 15",
            ),
            (net(r#""tap": """#), "net[0].tap: the TAP name is empty"),
            (
                net(r#""tap": "a/b""#),
                "net[0].tap: `a/b` is not a valid interface name",
            ),
            (
                net(r#""offload_csum": false"#),
                "net[0].offload_csum: offload_tso and offload_ufo need checksum offload",
            ),
            (
                net(r#""fds": [3]"#),
                "net[0].fds: passing TAP file descriptors in a JSON config (use --net fd=N on the command line) is not supported",
            ),
            (net(r#""iommu": true"#), "net[0].iommu: the virtual IOMMU"),
            (
                net(r#""rate_limiter_config": {"bandwidth": {"size": 1, "refill_time": 1}}"#),
                "net[0].rate_limiter_config: I/O rate limiting",
            ),
            (net(r#""pci_segment": 1"#), "net[0].pci_segment:"),
            (net(r#""vhost_mode": "Other""#), "net[0].vhost_mode:"),
            (net(r#""tapp": "x""#), "unknown field `net[0].tapp`"),
            (net(r#""id": "__net""#), "net[0].id `__net` is reserved"),
            (
                err(r#"{"payload": {"kernel": "/k"}, "disks": [{"path": "/d", "id": "x"}],
                        "net": [{"id": "x"}]}"#),
                "net[0].id `x` is already the id of another device",
            ),
            (
                err(r#"{"payload": {"kernel": "/k"}, "net": [{"tap": "t0"}, {"tap": "t0"}]}"#),
                "net[1].tap: `t0` is already the TAP of net[0]",
            ),
            (
                err(r#"{"payload": {"kernel": "/k"}, "net": {"tap": "t0"}}"#),
                "expected a sequence",
            ),
            (net(r#""mtu": "big""#), "invalid type: string \"big\""),
        ];
        for (message, expected) in cases {
            assert!(message.contains(expected), "{expected}: got {message:?}");
        }
        // Two devices may both ask for a kernel-numbered name.
        parse_vm_config(
            br#"{"payload": {"kernel": "/k"}, "net": [{"tap": "vm%d"}, {"tap": "vm%d"}]}"#,
        )
        .unwrap();
        // The bounds themselves are fine.
        parse_vm_config(
            br#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 8, "max_vcpus": 8},
                 "net": [{"num_queues": 16, "queue_size": 4, "mtu": 1280, "mask": "0.0.0.0"},
                         {"mtu": 65521, "mask": "255.255.255.255", "offload_csum": false,
                          "offload_tso": false, "offload_ufo": false}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn net_fds_are_checked() {
        let mut config = minimal();
        config.cpus = CpusConfig {
            boot_vcpus: 2,
            max_vcpus: 2,
        };
        let with = |fds: Vec<i32>, num_queues: u16, tap: Option<&str>| NetConfig {
            fds: Some(fds),
            num_queues,
            tap: tap.map(String::from),
            ..NetConfig::default()
        };
        let check = |config: &mut VmConfig, nets: Vec<NetConfig>| {
            config.net = nets;
            config.validate().map_err(|e| e.to_string())
        };
        check(&mut config, vec![with(vec![3], 2, None)]).unwrap();
        check(&mut config, vec![with(vec![3, 4], 4, None)]).unwrap();
        let cases = [
            (
                vec![with(vec![3], 4, None)],
                "net[0].fds: 1 file descriptor(s) given, but num_queues 4 needs one per queue pair (2)",
            ),
            (
                vec![with(vec![1], 2, None)],
                "net[0].fds: 1 is not a TAP file descriptor",
            ),
            (
                vec![with(vec![5, 5], 4, None)],
                "net[0].fds: 5 is given more than once",
            ),
            (
                vec![with(vec![3], 2, Some("tap0"))],
                "net[0].fds: give either a TAP name or TAP file descriptors, not both",
            ),
            (
                vec![NetConfig {
                    host_mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
                    ..with(vec![3], 2, None)
                }],
                "net[0].host_mac: applies only to a TAP kite opens by name",
            ),
            (
                vec![with(vec![3], 2, None), with(vec![4, 3], 4, None)],
                "net[1].fds: file descriptor 3 is already used by net[0]",
            ),
        ];
        for (nets, expected) in cases {
            let message = check(&mut config, nets).unwrap_err();
            assert!(message.contains(expected), "{expected}: got {message:?}");
        }
        // vm.info shows them, as Cloud Hypervisor's does.
        config.net = vec![with(vec![3], 2, None)];
        let out = serde_json::to_value(&config).unwrap();
        assert_eq!(out["net"][0]["fds"], serde_json::json!([3]));
    }

    #[test]
    fn mac_addresses() {
        let mac: MacAddr = "52:54:0:AB:cd:EF".parse().unwrap();
        assert_eq!(mac, MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(format!("{mac:?}"), "52:54:00:ab:cd:ef");
        mac.check_unicast().unwrap();
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:",
            "52-54-00-ab-cd-ef",
            "+2:54:00:ab:cd:ef",
            "52:54:00:ab:cd:1ef",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(MacAddr([3, 0, 0, 0, 0, 0]).check_unicast().is_err());
    }
}
