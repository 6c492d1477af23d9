//! kite's API layer: the Cloud Hypervisor-compatible VM configuration, the
//! internal command channel that the CLI, the HTTP server and embedders share,
//! the HTTP/1.1 server on a Unix socket, and Cloud Hypervisor-style CLI option
//! parsers.

pub mod cli;
pub mod command;
mod compat;
pub mod config;
pub mod http;

pub use command::{
    pci_bdf, ApiAction, ApiError, ApiReply, ApiRequest, ApiResponse, ApiSender, DeviceNode,
    Resource, VmCounters, VmInfo, VmState, VmmPingResponse,
};
pub use config::{
    parse_vm_config, ConfigError, DiskConfig, MacAddr, NetConfig, RngConfig, VmConfig,
};
pub use http::{serve_http, start_http_server, HttpError};
