//! The one internal command type. The CLI, the HTTP thread and embedders all
//! send an [`ApiRequest`] over a channel and wake the control loop with an
//! EventFd; the control loop answers on the request's own reply channel.

use std::collections::BTreeMap;
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;

/// What a client asks the VMM to do.
#[derive(Debug)]
pub enum ApiAction {
    VmmPing,
    VmmShutdown,
    VmCreate(Box<VmConfig>),
    VmBoot,
    VmInfo,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmDelete,
    VmPowerButton,
    VmCounters,
}

/// Lifecycle state of the VM, named as in Cloud Hypervisor's `VmInfo.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Body of `GET /vmm.ping`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

/// Body of `GET /vm.info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmConfig,
    pub state: VmState,
    pub memory_actual_size: u64,
    /// The VM's devices, keyed by device id (the same ids as `vm.counters`).
    pub device_tree: BTreeMap<String, DeviceNode>,
}

/// One device of `VmInfo.device_tree`, in Cloud Hypervisor's shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    pub id: String,
    #[serde(default)]
    pub resources: Vec<Resource>,
    /// Ids of the devices below this one.
    #[serde(default)]
    pub children: Vec<String>,
    /// The PCI address, as [`pci_bdf`] formats it; omitted for non-PCI
    /// devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bdf: Option<String>,
}

/// A resource a device uses, serialized as Cloud Hypervisor's `Resource` enum
/// (e.g. `{"PciBar": {"index": 0, ...}}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resource {
    /// I/O port range.
    PioAddressRange { base: u16, size: u16 },
    /// MMIO range.
    MmioAddressRange { base: u64, size: u64 },
    /// A PCI BAR as programmed.
    PciBar {
        index: usize,
        base: u64,
        size: u64,
        type_: PciBarType,
        prefetchable: bool,
    },
    /// Legacy (INTx / ISA) interrupt line.
    LegacyIrq(u32),
    /// A block of message-signalled interrupts.
    MsiIrq {
        ty: MsiIrqType,
        base: u32,
        size: u32,
    },
}

/// Kind of a PCI BAR (Cloud Hypervisor's `PciBarType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PciBarType {
    Io,
    Mmio32,
    Mmio64,
}

/// Kind of message-signalled interrupt (Cloud Hypervisor's `MsiIrqType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MsiIrqType {
    PciMsi,
    PciMsix,
    GenericMsi,
}

/// Formats a PCI address as Cloud Hypervisor does: `0000:00:03.0`
/// (segment:bus:device.function, hexadecimal).
pub fn pci_bdf(segment: u16, bus: u8, device: u8, function: u8) -> String {
    format!("{segment:04x}:{bus:02x}:{device:02x}.{function:x}")
}

impl DeviceNode {
    /// A device on PCI segment 0, bus 0, at `device`.0, with no resources
    /// or children listed.
    pub fn pci(id: impl Into<String>, device: u8) -> Self {
        DeviceNode {
            id: id.into(),
            pci_bdf: Some(pci_bdf(0, 0, device, 0)),
            ..DeviceNode::default()
        }
    }
}

/// Per-device counters, as `GET /vm.counters` returns them.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// A successful answer.
#[derive(Debug)]
pub enum ApiResponse {
    /// 204 No Content.
    Empty,
    Ping(VmmPingResponse),
    Info(Box<VmInfo>),
    Counters(VmCounters),
}

/// Why a request failed. Each variant maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request itself is wrong (bad config, bad JSON, ...).
    #[error("{0}")]
    BadRequest(String),
    /// 404: the VM has not been created.
    #[error("the VM is not created")]
    VmNotCreated,
    /// 409: `vm.create` while a VM already exists.
    #[error("a VM is already created; delete it first")]
    VmAlreadyCreated,
    /// 405: the action does not fit the VM's current state.
    #[error("cannot {action} a VM that is {state}")]
    InvalidState {
        action: &'static str,
        state: VmState,
    },
    /// 500: the VMM failed while doing what was asked.
    #[error("{0}")]
    Internal(String),
    /// The control loop is gone (the VMM is shutting down).
    #[error("the VMM is shutting down")]
    VmmGone,
}

impl ApiError {
    /// The HTTP status code for this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::VmNotCreated => 404,
            ApiError::InvalidState { .. } => 405,
            ApiError::VmAlreadyCreated => 409,
            ApiError::Internal(_) => 500,
            ApiError::VmmGone => 503,
        }
    }
}

pub type ApiReply = Result<ApiResponse, ApiError>;

/// One request to the control loop, with the channel for its answer.
pub struct ApiRequest {
    pub action: ApiAction,
    pub reply: Sender<ApiReply>,
}

/// The sending side of the command channel; cheap to clone.
#[derive(Clone)]
pub struct ApiSender {
    tx: Sender<ApiRequest>,
    wake: Arc<EventFd>,
}

impl ApiSender {
    /// Makes the channel. The control loop keeps the receiver and polls `wake`.
    pub fn channel(wake: Arc<EventFd>) -> (ApiSender, Receiver<ApiRequest>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (ApiSender { tx, wake }, rx)
    }

    /// Sends `action` and waits for the control loop's answer.
    pub fn send(&self, action: ApiAction) -> ApiReply {
        let (reply, answer) = bounded(1);
        self.tx
            .send(ApiRequest { action, reply })
            .map_err(|_| ApiError::VmmGone)?;
        self.wake.write(1).map_err(|_| ApiError::VmmGone)?;
        answer.recv().map_err(|_| ApiError::VmmGone)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_node_serializes_in_ch_shape() {
        assert_eq!(pci_bdf(0, 0, 3, 0), "0000:00:03.0");
        assert_eq!(pci_bdf(1, 0x1f, 0x1a, 7), "0001:1f:1a.7");
        let mut node = DeviceNode::pci("_disk0", 4);
        node.resources.push(Resource::PciBar {
            index: 0,
            base: 0xe000_0000,
            size: 0x8_0000,
            type_: PciBarType::Mmio32,
            prefetchable: false,
        });
        node.resources.push(Resource::MsiIrq {
            ty: MsiIrqType::PciMsix,
            base: 0,
            size: 2,
        });
        let json = serde_json::to_value(&node).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "_disk0",
                "resources": [
                    {"PciBar": {"index": 0, "base": 0xe000_0000u64, "size": 0x8_0000,
                                "type_": "Mmio32", "prefetchable": false}},
                    {"MsiIrq": {"ty": "PciMsix", "base": 0, "size": 2}}
                ],
                "children": [],
                "pci_bdf": "0000:00:04.0"
            })
        );
        assert_eq!(serde_json::from_value::<DeviceNode>(json).unwrap(), node);
        // Not on PCI: no pci_bdf key at all.
        let node = DeviceNode {
            id: "__serial".into(),
            resources: vec![Resource::PioAddressRange {
                base: 0x3f8,
                size: 8,
            }],
            ..DeviceNode::default()
        };
        let json = serde_json::to_value(&node).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": "__serial", "resources": [{"PioAddressRange": {"base": 1016, "size": 8}}], "children": []})
        );
    }
}
