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
    pub device_tree: BTreeMap<String, serde_json::Value>,
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
