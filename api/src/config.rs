//! Cloud Hypervisor's `VmConfig`, as far as kite implements it. Field names and
//! JSON shapes follow `cloud-hypervisor.yaml`, so existing clients work unchanged.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default guest memory when a config gives none (Cloud Hypervisor's default).
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;

/// The whole VM configuration (`PUT /vm.create` body).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(default = "ConsoleConfig::serial_default")]
    pub serial: ConsoleConfig,
    #[serde(default = "ConsoleConfig::console_default")]
    pub console: ConsoleConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// Where a console's output goes (`ConsoleMode` in the spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

/// `SerialConfig` / `ConsoleConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl ConsoleConfig {
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
}
