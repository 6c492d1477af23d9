//! Cloud Hypervisor's full `VmConfig` schema as it arrives on the wire.
//!
//! CH clients (ch-remote, the SDKs, configs saved from CH's own `vm.info`)
//! often send every field of CH's `VmConfig`, filled in with defaults. kite
//! accepts any field of CH's schema as long as its value asks for nothing kite
//! lacks — absent, `null`, an empty list, or CH's default — and otherwise
//! refuses the config naming the field, so a config is never half-applied in
//! silence. Fields CH does not know are refused as unknown.
//!
//! Each wire struct has the fields kite uses, typed, and collects the rest in
//! `rest`; a table per struct lists CH's other fields and what "unset" means
//! for each.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{
    check_net_mtu, check_net_num_queues, check_net_queue_size, check_num_queues, check_queue_size,
    ConfigError, ConsoleConfig, ConsoleMode, CpusConfig, DiskConfig, ImageType, MacAddr,
    MemoryConfig, NetConfig, PayloadConfig, RngConfig, VmConfig, DEFAULT_DISK_NUM_QUEUES,
    DEFAULT_DISK_QUEUE_SIZE, DEFAULT_NET_IP, DEFAULT_NET_MASK, DEFAULT_NET_NUM_QUEUES,
    DEFAULT_NET_QUEUE_SIZE, DEFAULT_RNG_SOURCE,
};

/// Fields of a CH struct that kite does not model.
type Rest = BTreeMap<String, Value>;

// The `rename`s make serde's messages say "expected struct CpusConfig".

#[derive(Deserialize)]
#[serde(rename = "VmConfig")]
pub(crate) struct VmConfigWire {
    cpus: Option<CpusWire>,
    memory: Option<MemoryWire>,
    payload: PayloadWire,
    disks: Option<Vec<DiskWire>>,
    net: Option<Vec<NetWire>>,
    rng: Option<RngWire>,
    serial: Option<ConsoleWire>,
    console: Option<ConsoleWire>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize)]
#[serde(rename = "CpusConfig")]
struct CpusWire {
    boot_vcpus: u32,
    max_vcpus: u32,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize)]
#[serde(rename = "MemoryConfig")]
struct MemoryWire {
    size: u64,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize)]
#[serde(rename = "PayloadConfig")]
struct PayloadWire {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    cmdline: Option<String>,
    #[serde(flatten)]
    rest: Rest,
}

/// `DiskConfig`. `null` for a field kite models means its default.
#[derive(Deserialize)]
#[serde(rename = "DiskConfig")]
struct DiskWire {
    path: Option<PathBuf>,
    readonly: Option<bool>,
    direct: Option<bool>,
    // Wider than kite's `u16`, so an out-of-range count gets kite's message.
    num_queues: Option<u64>,
    queue_size: Option<u64>,
    id: Option<String>,
    serial: Option<String>,
    image_type: Option<ImageTypeWire>,
    #[serde(flatten)]
    rest: Rest,
}

/// Cloud Hypervisor's `ImageType`, so its other formats get a message
/// naming them rather than serde's "unknown variant".
#[derive(Clone, Copy, Deserialize)]
#[serde(rename = "ImageType")]
enum ImageTypeWire {
    FlatVmdk,
    FixedVhd,
    Qcow2,
    Raw,
    Vhdx,
    Unknown,
}

/// `NetConfig`. `null` for a field kite models means its default. Addresses
/// arrive as strings so that a bad one gets a message naming the field.
#[derive(Deserialize)]
#[serde(rename = "NetConfig")]
struct NetWire {
    tap: Option<String>,
    ip: Option<String>,
    mask: Option<String>,
    mac: Option<String>,
    host_mac: Option<String>,
    mtu: Option<u64>,
    num_queues: Option<u64>,
    queue_size: Option<u64>,
    id: Option<String>,
    offload_tso: Option<bool>,
    offload_ufo: Option<bool>,
    offload_csum: Option<bool>,
    #[serde(flatten)]
    rest: Rest,
}

/// `RngConfig`. CH requires `src`; kite defaults it to /dev/urandom.
#[derive(Deserialize)]
#[serde(rename = "RngConfig")]
struct RngWire {
    src: Option<PathBuf>,
    id: Option<String>,
    #[serde(flatten)]
    rest: Rest,
}

/// `SerialConfig` and `ConsoleConfig`; they differ only in their extra fields.
#[derive(Deserialize)]
#[serde(rename = "ConsoleConfig")]
struct ConsoleWire {
    mode: ConsoleMode,
    file: Option<PathBuf>,
    #[serde(flatten)]
    rest: Rest,
}

impl VmConfigWire {
    pub(crate) fn into_config(self) -> Result<VmConfig, ConfigError> {
        check("", &self.rest, VM_CONFIG)?;
        Ok(VmConfig {
            cpus: self
                .cpus
                .map_or(Ok(CpusConfig::default()), CpusWire::into_config)?,
            memory: self
                .memory
                .map_or(Ok(MemoryConfig::default()), MemoryWire::into_config)?,
            payload: self.payload.into_config()?,
            disks: self
                .disks
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(index, disk)| disk.into_config(index))
                .collect::<Result<_, _>>()?,
            net: self
                .net
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(index, net)| net.into_config(index))
                .collect::<Result<_, _>>()?,
            rng: self
                .rng
                .map_or(Ok(RngConfig::default()), RngWire::into_config)?,
            serial: match self.serial {
                Some(serial) => serial.into_config("serial", SERIAL)?,
                None => ConsoleConfig::serial_default(),
            },
            console: match self.console {
                Some(console) => console.into_config("console", CONSOLE)?,
                None => ConsoleConfig::console_default(),
            },
        })
    }
}

impl CpusWire {
    fn into_config(self) -> Result<CpusConfig, ConfigError> {
        check("cpus", &self.rest, CPUS)?;
        let count = |n: u32| u8::try_from(n).map_err(|_| ConfigError::TooManyVcpus(n));
        Ok(CpusConfig {
            boot_vcpus: count(self.boot_vcpus)?,
            max_vcpus: count(self.max_vcpus)?,
        })
    }
}

impl MemoryWire {
    fn into_config(self) -> Result<MemoryConfig, ConfigError> {
        check("memory", &self.rest, MEMORY)?;
        Ok(MemoryConfig { size: self.size })
    }
}

impl PayloadWire {
    fn into_config(self) -> Result<PayloadConfig, ConfigError> {
        check("payload", &self.rest, PAYLOAD)?;
        Ok(PayloadConfig {
            kernel: self.kernel,
            initramfs: self.initramfs,
            cmdline: self.cmdline,
        })
    }
}

impl DiskWire {
    fn into_config(self, index: usize) -> Result<DiskConfig, ConfigError> {
        let section = format!("disks[{index}]");
        check(&section, &self.rest, DISK)?;
        let image_type = match self.image_type {
            None | Some(ImageTypeWire::Unknown) => None,
            Some(ImageTypeWire::Raw) => Some(ImageType::Raw),
            Some(ImageTypeWire::Qcow2) => Some(ImageType::Qcow2),
            Some(other) => {
                return Err(ConfigError::Unsupported {
                    field: format!("{section}.image_type"),
                    feature: match other {
                        ImageTypeWire::FlatVmdk => "the FlatVmdk image format",
                        ImageTypeWire::FixedVhd => "the FixedVhd image format",
                        _ => "the Vhdx image format",
                    },
                })
            }
        };
        Ok(DiskConfig {
            // A missing path stays empty for `validate` to name.
            path: self.path.unwrap_or_default(),
            readonly: self.readonly.unwrap_or(false),
            direct: self.direct.unwrap_or(false),
            num_queues: self
                .num_queues
                .map_or(Ok(DEFAULT_DISK_NUM_QUEUES), |n| check_num_queues(index, n))?,
            queue_size: self
                .queue_size
                .map_or(Ok(DEFAULT_DISK_QUEUE_SIZE), |n| check_queue_size(index, n))?,
            id: self.id,
            serial: self.serial,
            image_type,
        })
    }
}

impl NetWire {
    fn into_config(self, index: usize) -> Result<NetConfig, ConfigError> {
        let section = format!("net[{index}]");
        check(&section, &self.rest, NET)?;
        let bad = |field: &str, reason: String| ConfigError::Net {
            field: format!("{section}.{field}"),
            reason,
        };
        let ipv4 = |field: &str, value: Option<String>, default: Ipv4Addr| match value {
            None => Ok(default),
            Some(text) => match text.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => Ok(ip),
                Ok(IpAddr::V6(_)) => Err(ConfigError::Unsupported {
                    field: format!("{section}.{field}"),
                    feature: "an IPv6 host address",
                }),
                Err(_) => Err(bad(field, format!("`{text}` is not an IPv4 address"))),
            },
        };
        let mac = |field: &str, value: Option<String>| {
            value
                .map(|text| text.parse::<MacAddr>().map_err(|reason| bad(field, reason)))
                .transpose()
        };
        Ok(NetConfig {
            tap: self.tap,
            ip: ipv4("ip", self.ip, DEFAULT_NET_IP)?,
            mask: ipv4("mask", self.mask, DEFAULT_NET_MASK)?,
            mac: mac("mac", self.mac)?,
            host_mac: mac("host_mac", self.host_mac)?,
            mtu: self.mtu.map(|n| check_net_mtu(index, n)).transpose()?,
            num_queues: self.num_queues.map_or(Ok(DEFAULT_NET_NUM_QUEUES), |n| {
                check_net_num_queues(index, n)
            })?,
            queue_size: self.queue_size.map_or(Ok(DEFAULT_NET_QUEUE_SIZE), |n| {
                check_net_queue_size(index, n)
            })?,
            id: self.id,
            fds: None,
            offload_tso: self.offload_tso.unwrap_or(true),
            offload_ufo: self.offload_ufo.unwrap_or(true),
            offload_csum: self.offload_csum.unwrap_or(true),
        })
    }
}

impl RngWire {
    fn into_config(self) -> Result<RngConfig, ConfigError> {
        check("rng", &self.rest, RNG)?;
        Ok(RngConfig {
            src: self.src.unwrap_or_else(|| DEFAULT_RNG_SOURCE.into()),
            id: self.id,
        })
    }
}

impl ConsoleWire {
    fn into_config(
        self,
        section: &'static str,
        fields: &[Field],
    ) -> Result<ConsoleConfig, ConfigError> {
        check(section, &self.rest, fields)?;
        Ok(ConsoleConfig {
            mode: self.mode,
            file: self.file,
        })
    }
}

/// Refuses any field of `rest` that CH's schema lacks or that asks for
/// something kite does not implement.
fn check(section: &str, rest: &Rest, fields: &[Field]) -> Result<(), ConfigError> {
    for (name, value) in rest {
        let path = || match section {
            "" => name.clone(),
            _ => format!("{section}.{name}"),
        };
        match fields.iter().find(|f| f.name == name) {
            None => return Err(ConfigError::UnknownField(path())),
            Some(f) if !f.unset.accepts(value) => {
                return Err(ConfigError::Unsupported {
                    field: path(),
                    feature: f.feature,
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A CH field kite does not implement.
struct Field {
    name: &'static str,
    /// The values that ask for nothing.
    unset: Unset,
    /// Completes "<field>: <feature> is not supported by kite yet".
    feature: &'static str,
}

/// What "asks for nothing" means for a field. `null` always does.
#[derive(Clone, Copy)]
enum Unset {
    /// Only `null` (or absent).
    Null,
    /// An empty list.
    Empty,
    /// CH's default for a boolean.
    Bool(bool),
    /// Either boolean: kite behaves the same way for both.
    AnyBool,
    /// CH's default for a string or enum.
    Str(&'static str),
    /// Any of these strings (CH's default among them).
    OneOf(&'static [&'static str]),
    /// CH's default for a number.
    Int(u64),
    /// Anything: the field means nothing while its feature is off.
    Any,
    /// CH's default object: every field present is unset per this table.
    Object(&'static [Field]),
}

impl Unset {
    fn accepts(self, value: &Value) -> bool {
        value.is_null()
            || match self {
                Unset::Null => false,
                Unset::Empty => value.as_array().is_some_and(Vec::is_empty),
                Unset::Bool(b) => value.as_bool() == Some(b),
                Unset::AnyBool => value.is_boolean(),
                Unset::Str(s) => value.as_str() == Some(s),
                Unset::OneOf(strings) => value.as_str().is_some_and(|s| strings.contains(&s)),
                Unset::Int(n) => value.as_u64() == Some(n),
                Unset::Any => true,
                Unset::Object(fields) => value.as_object().is_some_and(|map| {
                    map.iter().all(|(name, v)| {
                        fields.iter().any(|f| f.name == name && f.unset.accepts(v))
                    })
                }),
            }
    }
}

const fn field(name: &'static str, unset: Unset, feature: &'static str) -> Field {
    Field {
        name,
        unset,
        feature,
    }
}

use Unset::*;

/// `VmConfig`'s fields besides cpus, memory, payload, disks, net, rng,
/// serial and console.
const VM_CONFIG: &[Field] = &[
    field("rate_limit_groups", Empty, "I/O rate limiting"),
    field("balloon", Null, "virtio-balloon"),
    field("fs", Empty, "virtio-fs"),
    field("generic_vhost_user", Empty, "generic vhost-user"),
    field("pmem", Empty, "virtio-pmem"),
    field(
        "debug_console",
        Object(DEBUG_CONSOLE_OFF),
        "the debug console",
    ),
    field("devices", Empty, "VFIO passthrough"),
    field("user_devices", Empty, "vfio-user"),
    field("vdpa", Empty, "vDPA"),
    field("vsock", Null, "virtio-vsock"),
    field("numa", Empty, "guest NUMA"),
    field("iommu", Bool(false), "the virtual IOMMU"),
    field("watchdog", Bool(false), "the watchdog device"),
    field("rtc", Null, "RTC device configuration"),
    field("pvpanic", Bool(false), "pvpanic"),
    field("pci_segments", Empty, "PCI segment configuration"),
    field("platform", Null, "platform configuration"),
    field("tpm", Null, "TPM"),
    field("landlock_enable", Bool(false), "Landlock sandboxing"),
    field("landlock_rules", Empty, "Landlock sandboxing"),
];

/// `DiskConfig`'s fields besides path, readonly, direct, num_queues,
/// queue_size, id, serial and image_type.
const DISK: &[Field] = &[
    field("iommu", Bool(false), "the virtual IOMMU"),
    field("vhost_user", Bool(false), "vhost-user"),
    field("vhost_socket", Null, "vhost-user"),
    field("rate_limit_group", Null, "I/O rate limiting"),
    field("rate_limiter_config", Null, "I/O rate limiting"),
    field("pci_segment", Int(0), "choosing the PCI segment"),
    field("pci_device_id", Null, "choosing the PCI slot"),
    field("queue_affinity", Empty, "virtqueue CPU affinity"),
    // kite always opens a qcow2 image's backing files, read-only. CH's
    // default `false` refuses images that have one; kite accepts both values
    // rather than refuse every config CH itself writes.
    field("backing_files", AnyBool, ""),
    field("sparse", Bool(true), "disabling sparse images"),
    // kite always locks the whole file (CH's `Full`). CH's default
    // `ByteRange` is for NFS servers that block snapshots of a file locked
    // whole; accepting it keeps the configs CH writes working.
    field("lock_granularity", OneOf(&["ByteRange", "Full"]), ""),
    // Not in CH's OpenAPI document, but CH's own vm.info output has them.
    // kite uses neither io_uring nor AIO, so both values mean the same.
    field("disable_io_uring", AnyBool, ""),
    field("disable_aio", AnyBool, ""),
];

/// `NetConfig`'s fields besides tap, ip, mask, mac, host_mac, mtu,
/// num_queues, queue_size, id and the offload_* switches.
const NET: &[Field] = &[
    field("iommu", Bool(false), "the virtual IOMMU"),
    field("vhost_user", Bool(false), "vhost-user"),
    field("vhost_socket", Null, "vhost-user"),
    // Means nothing without vhost_user; CH's vm.info output has "Client".
    field("vhost_mode", OneOf(&["Client", "Server"]), ""),
    field("rate_limiter_config", Null, "I/O rate limiting"),
    field("pci_segment", Int(0), "choosing the PCI segment"),
    field("pci_device_id", Null, "choosing the PCI slot"),
    // Not in CH's OpenAPI document, but in its NetConfig (and vm.info):
    // descriptors can only be inherited, so they come from the command line.
    field(
        "fds",
        Empty,
        "passing TAP file descriptors in a JSON config (use --net fd=N on the command line)",
    ),
];

/// `RngConfig`'s fields besides src and id.
const RNG: &[Field] = &[
    field("iommu", Bool(false), "the virtual IOMMU"),
    field("pci_segment", Int(0), "choosing the PCI segment"),
    field("pci_device_id", Null, "choosing the PCI slot"),
];

const DEBUG_CONSOLE_OFF: &[Field] = &[
    field("mode", Str("Off"), ""),
    field("file", Null, ""),
    field("iobase", Any, ""),
];

const CPUS: &[Field] = &[
    field("topology", Null, "CPU topology"),
    field("kvm_hyperv", Bool(false), "Hyper-V emulation"),
    field(
        "max_phys_bits",
        Int(46),
        "limiting guest physical address bits",
    ),
    field("nested", Bool(true), "disabling nested virtualization"),
    field("affinity", Empty, "vCPU affinity"),
    field("features", Object(&[field("amx", Bool(false), "")]), "AMX"),
    field(
        "core_scheduling",
        Str("Vm"),
        "choosing the core scheduling mode",
    ),
    // Not in CH's OpenAPI document, but CH's own vm.info output has it.
    field("profile", Str("Host"), "CPU profiles"),
];

const MEMORY: &[Field] = &[
    field("hotplug_size", Null, "memory hotplug"),
    field("hotplugged_size", Null, "memory hotplug"),
    field("mergeable", Bool(false), "KSM page merging"),
    field("hotplug_method", Str("Acpi"), "virtio-mem hotplug"),
    field("shared", Bool(false), "shared guest memory"),
    field("hugepages", Bool(false), "hugepage-backed memory"),
    field("hugepage_size", Null, "hugepage-backed memory"),
    field("prefault", Bool(false), "prefaulting guest memory"),
    field("reserve", Bool(false), "reserving guest memory up front"),
    field("thp", Bool(true), "disabling transparent huge pages"),
    field("zones", Empty, "memory zones"),
];

const PAYLOAD: &[Field] = &[
    field("firmware", Null, "firmware boot"),
    field("igvm", Null, "IGVM boot"),
    field("host_data", Null, "SEV-SNP host data"),
];

const SERIAL: &[Field] = &[field("socket", Null, "socket output")];

const CONSOLE: &[Field] = &[
    field("socket", Null, "socket output"),
    field("iommu", Bool(false), "the virtual IOMMU"),
    field("id", Null, "choosing the device id"),
    field("pci_segment", Int(0), "choosing the PCI segment"),
    field("pci_device_id", Null, "choosing the PCI slot"),
];
