//! kite's API layer: the Cloud Hypervisor-compatible VM configuration, the
//! internal command channel that the CLI, the HTTP server and embedders share,
//! and the HTTP/1.1 server on a Unix socket.

pub mod command;
pub mod config;
pub mod http;

pub use command::{ApiAction, ApiError, ApiReply, ApiRequest, ApiResponse, ApiSender, VmInfo, VmState, VmmPingResponse};
pub use config::VmConfig;
