//! Cloud Hypervisor's `VmConfig`, as far as kite implements it. Field names and
//! JSON shapes follow `cloud-hypervisor.yaml`, so existing clients work unchanged.
//!
//! Deserializing goes through [`crate::compat`], which accepts every field of
//! Cloud Hypervisor's schema but refuses any that asks for a feature kite lacks.
//! [`VmConfig::validate`] then checks the values kite does use. Serializing
//! produces the Cloud Hypervisor shape of the fields kite has (for `vm.info`).

use std::path::{Path, PathBuf};

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
}

/// The whole VM configuration (`PUT /vm.create` body).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    pub serial: ConsoleConfig,
    pub console: ConsoleConfig,
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
        // No virtio-console yet: only the modes that create no device.
        self.console.check("console", &[Off, Null], "Off or Null")?;
        Ok(())
    }
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

    /// kite has no virtio-console yet, so the console is off unless asked for.
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
        "rate_limit_groups": null, "disks": null, "net": [],
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
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = minimal();
        assert_eq!(config.cpus, CpusConfig::default());
        assert_eq!(config.memory.size, DEFAULT_MEMORY_SIZE);
        assert_eq!(config.serial, ConsoleConfig::serial_default());
        assert_eq!(config.console, ConsoleConfig::console_default());
    }

    #[test]
    fn unsupported_values_name_the_field() {
        let cases = [
            (
                r#""disks": [{"path": "/d.img"}]"#,
                "disks: virtio-blk is not supported",
            ),
            (r#""net": [{"tap": "tap0"}]"#, "net: virtio-net"),
            (r#""rng": {"src": "/dev/random"}"#, "rng: virtio-rng"),
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
        // A CH default object with a field CH does not have is not a default.
        assert!(
            err(r#"{"payload": {"kernel": "/k"}, "rng": {"src": "/dev/urandom", "x": 1}}"#)
                .starts_with("rng:")
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
                r#"{"payload": {"kernel": "/k"}, "console": {"mode": "Tty"}}"#,
                "console.mode Tty",
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
                "serial": {"mode": "Null"},
                "console": {"mode": "Off"}
            })
        );
        let back: VmConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, config);
        // Plain serde deserialization refuses unsupported fields too.
        let bad =
            serde_json::from_str::<VmConfig>(r#"{"payload": {}, "disks": [{}]}"#).unwrap_err();
        assert!(bad.to_string().contains("disks: virtio-blk"));
    }
}
