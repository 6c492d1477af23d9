//! kite's REST API: HTTP/1.1 on a Unix socket, wire-compatible with Cloud
//! Hypervisor's (`/api/v1/...`, JSON bodies, errors as a JSON array of
//! strings, as CH's `error_response` sends them).
//!
//! One thread serves one request at a time. The API is a control plane with
//! a client or two, and serving sequentially keeps VM state changes strictly
//! ordered. A keep-alive connection that goes quiet is parked, still open,
//! while the thread serves whichever client (new or parked) has a request,
//! so clients that keep a pool of connections can use any of them; a client
//! that stalls in mid-request while another waits loses its turn (408).
//!
//! Per request the server does one read (usually), one channel round trip to
//! the control loop and one write, reusing its buffers: no thread and no
//! buffer allocation per request. `vmm.ping` skips the round trip after the
//! control loop's first answer: the answer never changes (version, pid,
//! features), Cloud Hypervisor defines ping as a check of the API server's
//! availability, and the hop to the control loop costs more than the rest of
//! the request (two thread wake-ups).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use serde::Serialize;

use crate::command::{ApiAction, ApiError, ApiResponse, ApiSender};
use crate::config::parse_vm_config;

/// Where every endpoint lives, as in Cloud Hypervisor.
pub const API_ROOT: &str = "/api/v1";
/// Largest request body accepted (a `vm.create` config is a few KiB).
pub const MAX_BODY: usize = 1 << 20;
/// Largest request line plus headers accepted.
pub const MAX_HEAD: usize = 16 << 10;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 32;
/// How long a client may take to send the rest of a started request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle keep-alive connection stays open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection keeps the server between two requests before it is
/// parked, so a client sending requests back to back is served at once.
const GRACE_MS: i32 = 20;
/// Idle connections kept open at most; beyond that the longest idle closes.
const MAX_PARKED: usize = 32;
/// How long a client may stall in mid-request while another one waits.
const STALL_GRACE_MS: i32 = 100;
const READ_CHUNK: usize = 4096;

/// Why the server could not start. Socket errors name the path.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("API socket {}: another process is serving on it", .0.display())]
    InUse(PathBuf),
    #[error("API socket {}: the path exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("API socket {}: cannot remove the stale socket: {error}", .path.display())]
    RemoveStale { path: PathBuf, error: io::Error },
    #[error("API socket {}: cannot bind: {error}", .path.display())]
    Bind { path: PathBuf, error: io::Error },
    #[error("HTTP server: cannot spawn the kite-http thread: {0}")]
    Spawn(io::Error),
}

/// One endpoint: the method it takes and its path below [`API_ROOT`].
#[derive(Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    endpoint: Endpoint,
}

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmDelete,
    VmPowerButton,
    VmInfo,
    VmCounters,
}

const fn route(method: &'static str, path: &'static str, endpoint: Endpoint) -> Route {
    Route {
        method,
        path,
        endpoint,
    }
}

/// Everything kite serves; `openapi/kite.yaml` documents exactly these.
pub const ROUTES: &[Route] = &[
    route("GET", "/vmm.ping", Endpoint::VmmPing),
    route("PUT", "/vmm.shutdown", Endpoint::VmmShutdown),
    route("PUT", "/vm.create", Endpoint::VmCreate),
    route("PUT", "/vm.boot", Endpoint::VmBoot),
    route("PUT", "/vm.pause", Endpoint::VmPause),
    route("PUT", "/vm.resume", Endpoint::VmResume),
    route("PUT", "/vm.shutdown", Endpoint::VmShutdown),
    route("PUT", "/vm.reboot", Endpoint::VmReboot),
    route("PUT", "/vm.delete", Endpoint::VmDelete),
    route("PUT", "/vm.power-button", Endpoint::VmPowerButton),
    route("GET", "/vm.info", Endpoint::VmInfo),
    route("GET", "/vm.counters", Endpoint::VmCounters),
];

/// Binds the API socket at `path` and serves it on a thread named
/// "kite-http". A socket file left by a dead process is replaced; one that a
/// live process answers on is not. The thread ends, removing the socket, once
/// `vmm.shutdown` succeeds or the control loop is gone.
pub fn start_http_server(path: &Path, sender: ApiSender) -> Result<JoinHandle<()>, HttpError> {
    remove_stale_socket(path)?;
    // Bind under a temporary name and rename: the socket file appears only
    // once it is listening, so a client that sees it can connect at once.
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.tmp", std::process::id()));
    let staging = std::path::PathBuf::from(staging);
    let bind_err = |error| HttpError::Bind {
        path: path.to_path_buf(),
        error,
    };
    let _ = fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(bind_err)?;
    if let Err(e) = fs::rename(&staging, path) {
        let _ = fs::remove_file(&staging);
        return Err(bind_err(e));
    }
    let server = Server::new(listener, sender);
    let socket = path.to_path_buf();
    let handle = thread::Builder::new()
        .name("kite-http".into())
        .spawn(move || {
            server.run();
            match fs::remove_file(&socket) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    warn!("API socket {}: cannot remove: {e}", socket.display())
                }
                _ => {}
            }
        })
        .map_err(|e| {
            let _ = fs::remove_file(path);
            HttpError::Spawn(e)
        })?;
    info!("API server listening on {}", path.display());
    Ok(handle)
}

/// Serves `listener` on the calling thread until `vmm.shutdown` succeeds or
/// the control loop is gone. For embedders that bind the socket themselves.
pub fn serve_http(listener: UnixListener, sender: ApiSender) {
    Server::new(listener, sender).run();
}

fn remove_stale_socket(path: &Path) -> Result<(), HttpError> {
    let owned = || path.to_path_buf();
    let bind = |error| HttpError::Bind {
        path: owned(),
        error,
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(bind(e)),
        Ok(meta) if !meta.file_type().is_socket() => Err(HttpError::NotASocket(owned())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(HttpError::InUse(owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!("API socket {}: removing stale socket", path.display());
                fs::remove_file(path).map_err(|error| HttpError::RemoveStale {
                    path: owned(),
                    error,
                })
            }
            Err(e) => Err(bind(e)),
        },
    }
}

/// Whether the server goes on after a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// An idle keep-alive connection, waiting for its next request.
struct Parked {
    stream: UnixStream,
    since: Instant,
}

/// Where other clients wait while one is served: the listener and the
/// parked connections.
#[derive(Clone, Copy)]
struct Others<'a> {
    listener: RawFd,
    parked: &'a [Parked],
}

impl<'a> Others<'a> {
    fn of(listener: &UnixListener, parked: &'a [Parked]) -> Self {
        Others {
            listener: listener.as_raw_fd(),
            parked,
        }
    }

    fn fds(self) -> impl Iterator<Item = RawFd> + 'a {
        let parked = self.parked.iter().map(|p| p.stream.as_raw_fd());
        std::iter::once(self.listener).chain(parked)
    }
}

/// A poll set waiting for input on each of `fds`.
fn pollfds(fds: impl Iterator<Item = RawFd>) -> Vec<libc::pollfd> {
    fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    })
    .collect()
}

struct Server {
    listener: UnixListener,
    parked: Vec<Parked>,
    sender: ApiSender,
    /// Received bytes not yet consumed (may hold a pipelined next request).
    buf: Vec<u8>,
    /// Response body scratch.
    body: Vec<u8>,
    /// The response as written.
    out: Vec<u8>,
    /// The control loop's first `vmm.ping` answer, serialized.
    ping: Option<Vec<u8>>,
}

impl Server {
    fn new(listener: UnixListener, sender: ApiSender) -> Server {
        Server {
            listener,
            parked: Vec::new(),
            sender,
            buf: Vec::with_capacity(READ_CHUNK),
            body: Vec::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(READ_CHUNK),
            ping: None,
        }
    }

    fn run(mut self) {
        loop {
            let Some(stream) = self.next_connection() else {
                continue;
            };
            // A bug must cost one connection, not the API.
            let served = panic::catch_unwind(AssertUnwindSafe(|| self.serve(stream)));
            match served {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break,
                Err(_) => error!("API server: connection handler panicked; connection dropped"),
            }
        }
        info!("API server stopped");
    }

    /// Waits for a connection with something to say: a parked one (first:
    /// they were here before) or a new one. Closes parked connections that
    /// stayed idle too long.
    fn next_connection(&mut self) -> Option<UnixStream> {
        let now = Instant::now();
        self.parked
            .retain(|p| now.duration_since(p.since) < IDLE_TIMEOUT);
        let timeout = match self.parked.first() {
            Some(oldest) => {
                let left = IDLE_TIMEOUT.saturating_sub(now.duration_since(oldest.since));
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
            None => -1,
        };
        let mut fds = pollfds(Others::of(&self.listener, &self.parked).fds());
        // SAFETY: `fds` is a valid array of pollfds that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                warn!("API server: poll failed: {e}");
                thread::sleep(Duration::from_millis(10));
            }
            return None;
        }
        if n == 0 {
            // Parked connections timed out: closed next round.
            return None;
        }
        if let Some(i) = fds[1..].iter().position(|f| f.revents != 0) {
            return Some(self.parked.remove(i).stream);
        }
        match self.listener.accept() {
            Ok((stream, _)) => Some(stream),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => {
                // E.g. out of file descriptors: back off, don't spin.
                warn!("API server: accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
                None
            }
        }
    }

    /// Keeps an idle keep-alive connection open for its next request.
    fn park(&mut self, stream: UnixStream) {
        if self.parked.len() == MAX_PARKED {
            debug!("API server: too many idle connections; closing the longest idle");
            self.parked.remove(0);
        }
        self.parked.push(Parked {
            stream,
            since: Instant::now(),
        });
    }

    fn serve(&mut self, stream: UnixStream) -> Flow {
        self.buf.clear();
        if self.buf.capacity() > 64 << 10 {
            // Don't keep a large body's buffer for the process's lifetime.
            self.buf = Vec::with_capacity(READ_CHUNK);
        }
        self.serve_requests(stream)
    }

    fn serve_requests(&mut self, mut stream: UnixStream) -> Flow {
        let mut first = true;
        loop {
            // Between requests, a connection that stays quiet is parked (not
            // before the first: a new client may not have written yet).
            if !first && self.buf.is_empty() && !request_within_grace(&stream) {
                self.park(stream);
                return Flow::Continue;
            }
            first = false;
            let head = match self.read_head(&mut stream) {
                Ok(Some(head)) => head,
                Ok(None) => return Flow::Continue,
                Err(failure) => {
                    self.refuse(&mut stream, &failure);
                    return Flow::Continue;
                }
            };
            let start = Instant::now();
            let total = head.len + head.content_length;
            if head.expect_continue && self.buf.len() < total {
                let _ = send_all(&stream, b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            if !self.read_to(&mut stream, total) {
                return Flow::Continue;
            }
            let outcome = self.dispatch(&head, total);
            let flow = outcome.flow;
            let keep_alive = head.keep_alive && flow == Flow::Continue;
            let written = send_all(&stream, &self.out);
            outcome.log(&head, start);
            if let Err(e) = written {
                debug!("API server: cannot write the response: {e}");
                return flow;
            }
            self.buf.drain(..total);
            if !keep_alive {
                return flow;
            }
        }
    }

    fn read_head(&mut self, stream: &mut UnixStream) -> Result<Option<Head>, Failure> {
        loop {
            if !self.buf.is_empty() {
                if let Some(head) = parse_head(&self.buf)? {
                    return Ok(Some(head));
                }
            }
            let others = Others::of(&self.listener, &self.parked);
            match fill(stream, others, &mut self.buf, READ_CHUNK) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(Failure::bad("the connection closed in mid-request")),
                Ok(_) => {}
                Err(e) if self.buf.is_empty() => {
                    debug!("API server: connection dropped while idle: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(read_failure(&e)),
            }
        }
    }

    /// Reads until `buf` holds `total` bytes; false if that fails (after
    /// telling the client why, if it can still listen).
    fn read_to(&mut self, stream: &mut UnixStream, total: usize) -> bool {
        while self.buf.len() < total {
            let missing = total - self.buf.len();
            let others = Others::of(&self.listener, &self.parked);
            match fill(stream, others, &mut self.buf, missing) {
                Ok(0) => {
                    debug!("API server: connection closed in mid-body");
                    return false;
                }
                Ok(_) => {}
                Err(e) => {
                    self.refuse(stream, &read_failure(&e));
                    return false;
                }
            }
        }
        true
    }

    /// Handles a complete request in `buf[..total]`, leaving the response in
    /// `out`.
    fn dispatch(&mut self, head: &Head, total: usize) -> Outcome {
        let close = !head.keep_alive;
        let route = match &head.target {
            Target::Route(route) => *route,
            Target::Miss {
                status,
                message,
                allow,
                ..
            } => {
                let head = ResponseHead::new(*status, close).allow(*allow);
                write_error(&mut self.out, &mut self.body, head, message);
                return Outcome::error(*status, message.clone());
            }
        };
        if let (Endpoint::VmmPing, Some(ping)) = (route.endpoint, &self.ping) {
            write_head(&mut self.out, ResponseHead::new(200, close), ping.len());
            self.out.extend_from_slice(ping);
            return Outcome::ok(200, Flow::Continue);
        }
        let body = &self.buf[head.len..total];
        let action = match route_action(route.endpoint, body) {
            Ok(action) => action,
            Err(message) => {
                let head = ResponseHead::new(400, close);
                write_error(&mut self.out, &mut self.body, head, &message);
                return Outcome::error(400, message);
            }
        };
        let shutdown = matches!(action, ApiAction::VmmShutdown);
        let reply = self.sender.send(action);
        let flow = match &reply {
            Ok(_) if shutdown => Flow::Stop,
            Err(ApiError::VmmGone) => Flow::Stop,
            _ => Flow::Continue,
        };
        let close = close || flow == Flow::Stop;
        let (out, scratch) = (&mut self.out, &mut self.body);
        let status = match reply {
            Ok(ApiResponse::Empty) => {
                write_head(out, ResponseHead::new(204, close), 0);
                204
            }
            Ok(ApiResponse::Ping(ping)) => {
                let status = write_json(out, scratch, close, &ping);
                if status == 200 {
                    self.ping = Some(scratch.clone());
                }
                status
            }
            Ok(ApiResponse::Info(info)) => write_json(out, scratch, close, &info),
            Ok(ApiResponse::Counters(c)) => write_json(out, scratch, close, &c),
            Err(e) => {
                let message = e.to_string();
                let head = ResponseHead::new(e.status(), close);
                write_error(out, scratch, head, &message);
                return Outcome {
                    status: e.status(),
                    flow,
                    error: Some(message),
                };
            }
        };
        Outcome::ok(status, flow)
    }

    /// Refuses a request the connection cannot recover from, then the caller
    /// closes it. Best effort: the client may be gone.
    fn refuse(&mut self, stream: &mut UnixStream, failure: &Failure) {
        warn!(
            "API request refused -> {}: {}",
            failure.status, failure.message
        );
        let head = ResponseHead::new(failure.status, true);
        write_error(&mut self.out, &mut self.body, head, &failure.message);
        if let Err(e) = send_all(stream, &self.out) {
            debug!("API server: cannot write the error response: {e}");
        }
    }
}

/// The action a request asks for, or why its body is refused.
fn route_action(endpoint: Endpoint, body: &[u8]) -> Result<ApiAction, String> {
    Ok(match endpoint {
        Endpoint::VmmPing => ApiAction::VmmPing,
        Endpoint::VmmShutdown => ApiAction::VmmShutdown,
        Endpoint::VmCreate if body.is_empty() => {
            return Err("vm.create needs a VmConfig JSON body".into())
        }
        Endpoint::VmCreate => {
            ApiAction::VmCreate(Box::new(parse_vm_config(body).map_err(|e| e.to_string())?))
        }
        Endpoint::VmBoot => ApiAction::VmBoot,
        Endpoint::VmPause => ApiAction::VmPause,
        Endpoint::VmResume => ApiAction::VmResume,
        Endpoint::VmShutdown => ApiAction::VmShutdown,
        Endpoint::VmReboot => ApiAction::VmReboot,
        Endpoint::VmDelete => ApiAction::VmDelete,
        Endpoint::VmPowerButton => ApiAction::VmPowerButton,
        Endpoint::VmInfo => ApiAction::VmInfo,
        Endpoint::VmCounters => ApiAction::VmCounters,
    })
}

/// Reads once (up to `want` bytes, at least a chunk) onto the end of `buf`.
fn fill(
    stream: &mut UnixStream,
    others: Others,
    buf: &mut Vec<u8>,
    want: usize,
) -> io::Result<usize> {
    let old = buf.len();
    buf.resize(old + want.clamp(READ_CHUNK, MAX_BODY), 0);
    // Usually the data is there: one non-blocking read. Otherwise wait.
    let mut waited = false;
    let result = loop {
        let space = &mut buf[old..];
        // SAFETY: `space` is valid, writable memory of the given length.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                space.as_mut_ptr().cast(),
                space.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            break Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock if !waited => {
                if let Err(e) = wait_readable(stream, others) {
                    break Err(e);
                }
                waited = true;
            }
            io::ErrorKind::WouldBlock => waited = false,
            _ => break Err(e),
        }
    };
    buf.truncate(old + *result.as_ref().unwrap_or(&0));
    result
}

/// Writes all of `bytes`, waiting at most [`WRITE_TIMEOUT`] for a client
/// that does not read its responses. (Timeouts are kept here and in
/// [`wait_readable`] rather than set on each socket: two syscalls less per
/// connection.)
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + WRITE_TIMEOUT;
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid, readable memory of the given length.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            bytes = &bytes[n as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                let mut fd = libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                let timeout = left.as_millis().clamp(1, i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd that outlives the call.
                unsafe { libc::poll(&mut fd, 1, timeout) };
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `stream` has data, at most [`READ_TIMEOUT`]. The server
/// serves one request at a time, so a client that stalls for longer than
/// [`STALL_GRACE_MS`] while another one is waiting on one of `others` (the
/// listener, parked connections) loses its turn (a `TimedOut` error,
/// answered with 408) instead of blocking the API.
fn wait_readable(stream: &UnixStream, others: Others) -> io::Result<()> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut fds = pollfds(std::iter::once(stream.as_raw_fd()).chain(others.fds()));
    // First every fd; once another client waits, this one only gets the
    // grace period.
    let mut watched = fds.len();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut timeout = left.as_millis().min(i32::MAX as u128) as i32;
        if watched == 1 {
            timeout = timeout.min(STALL_GRACE_MS);
        }
        // SAFETY: `fds` holds at least `watched` valid pollfds and outlives
        // the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), watched as libc::nfds_t, timeout) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Can't tell: let the read (with its own timeout) decide.
            return Ok(());
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
        if n == 0 || watched == 1 {
            return Err(io::ErrorKind::TimedOut.into());
        }
        watched = 1;
    }
}

/// Whether the next request on a keep-alive connection starts within
/// [`GRACE_MS`] (or the client hangs up, which the read then sees).
fn request_within_grace(stream: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd that outlives the call.
        let n = unsafe { libc::poll(&mut fd, 1, GRACE_MS) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return n != 0;
    }
}

fn read_failure(e: &io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure {
            status: 408,
            message: format!(
                "the request was not complete within {} s, or stalled while other clients waited",
                READ_TIMEOUT.as_secs()
            ),
        },
        _ => Failure::bad(format!("cannot read the request: {e}")),
    }
}

/// A request that cannot be served and ends the connection.
#[derive(Debug)]
struct Failure {
    status: u16,
    message: String,
}

impl Failure {
    fn bad(message: impl Into<String>) -> Failure {
        Failure {
            status: 400,
            message: message.into(),
        }
    }
}

/// What a parsed request head asks for.
#[derive(Debug)]
struct Head {
    /// Bytes of request line plus headers.
    len: usize,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
    /// Static so the head outlives the buffer it was parsed from.
    method: &'static str,
    target: Target,
}

#[derive(Debug)]
enum Target {
    Route(&'static Route),
    /// 404 or 405.
    Miss {
        status: u16,
        message: String,
        /// For 405: the method the path takes.
        allow: Option<&'static str>,
        /// The request's path, for the log.
        path: String,
    },
}

/// How a request went, for the caller and the log.
struct Outcome {
    status: u16,
    flow: Flow,
    /// The message sent with an error status.
    error: Option<String>,
}

impl Outcome {
    fn ok(status: u16, flow: Flow) -> Outcome {
        Outcome {
            status,
            flow,
            error: None,
        }
    }

    fn error(status: u16, message: String) -> Outcome {
        Outcome {
            status,
            flow: Flow::Continue,
            error: Some(message),
        }
    }

    /// One line per request: debug when it succeeded, warn when it did not.
    fn log(&self, head: &Head, start: Instant) {
        let (root, path) = match &head.target {
            Target::Route(route) => (API_ROOT, route.path),
            Target::Miss { path, .. } => ("", path.as_str()),
        };
        let (method, status) = (head.method, self.status);
        let micros = start.elapsed().as_micros();
        match &self.error {
            None => debug!("API {method} {root}{path} -> {status} in {micros} us"),
            Some(e) => warn!("API {method} {root}{path} -> {status} in {micros} us: {e}"),
        }
    }
}

/// Parses a request head from the start of `buf`. `Ok(None)`: incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(_) => {
            return Err(Failure::bad(format!(
                "the request line and headers exceed {MAX_HEAD} bytes"
            )))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Failure::bad(format!(
                "the request has more than {MAX_HEADERS} header fields"
            )))
        }
        Err(e) => return Err(Failure::bad(format!("malformed HTTP request: {e}"))),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Failure::bad("malformed HTTP request line"));
    };

    let mut content_length: Option<usize> = None;
    let mut keep_alive = version >= 1;
    let mut expect_continue = false;
    for header in req.headers.iter() {
        let name = header.name;
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| Failure::bad(format!("invalid Content-Length `{value}`")))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(Failure::bad("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Failure {
                status: 411,
                message: format!(
                    "Transfer-Encoding `{value}` is not supported; send the body with Content-Length"
                ),
            });
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Err(Failure {
            status: 413,
            message: format!(
                "the request body ({content_length} bytes) exceeds the limit of {MAX_BODY} bytes"
            ),
        });
    }

    let (method, target) = find_route(method, target);
    Ok(Some(Head {
        len,
        content_length,
        keep_alive,
        expect_continue,
        method,
        target,
    }))
}

/// Maps a request line to a route, or to a 404/405 naming what was wrong.
fn find_route(method: &str, target: &str) -> (&'static str, Target) {
    // Origin form `/api/v1/vm.info?x`, or absolute form `http://host/api/...`.
    let path = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let mut allow = None;
    if let Some(rest) = path.strip_prefix(API_ROOT) {
        for route in ROUTES.iter().filter(|r| r.path == rest) {
            if route.method == method {
                return (route.method, Target::Route(route));
            }
            allow = Some(route.method);
        }
    }
    let static_method = ["GET", "PUT"]
        .into_iter()
        .find(|m| *m == method)
        .unwrap_or("other");
    let (status, message) = match allow {
        Some(allow) => (
            405,
            format!("method {method} is not allowed on {path}; use {allow}"),
        ),
        None => (404, format!("no such endpoint: {path}")),
    };
    let miss = Target::Miss {
        status,
        message,
        allow,
        path: path.to_string(),
    };
    (static_method, miss)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// What goes in a response's header block besides the body length.
#[derive(Clone, Copy)]
struct ResponseHead<'a> {
    status: u16,
    /// Announce that the server closes the connection after this response.
    close: bool,
    /// For 405: the method the path takes.
    allow: Option<&'a str>,
}

impl<'a> ResponseHead<'a> {
    fn new(status: u16, close: bool) -> Self {
        ResponseHead {
            status,
            close,
            allow: None,
        }
    }

    fn allow(self, allow: Option<&'a str>) -> Self {
        ResponseHead { allow, ..self }
    }
}

/// Status line and headers, replacing `out`. A 204 carries neither body nor
/// body headers (RFC 9110 §8.6).
fn write_head(out: &mut Vec<u8>, head: ResponseHead, body_len: usize) {
    let status = head.status;
    out.clear();
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nServer: kite\r\n",
        reason(status)
    );
    if status != 204 {
        let _ = write!(
            out,
            "Content-Type: application/json\r\nContent-Length: {body_len}\r\n"
        );
    }
    if let Some(allow) = head.allow {
        let _ = write!(out, "Allow: {allow}\r\n");
    }
    if head.close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A 200 response with `value` as its JSON body.
fn write_json<T: Serialize>(out: &mut Vec<u8>, body: &mut Vec<u8>, close: bool, value: &T) -> u16 {
    body.clear();
    match serde_json::to_writer(&mut *body, value) {
        Ok(()) => {
            write_head(out, ResponseHead::new(200, close), body.len());
            out.extend_from_slice(body);
            200
        }
        Err(e) => {
            let message = format!("cannot serialize the response: {e}");
            error!("API server: {message}");
            write_error(out, body, ResponseHead::new(500, close), &message);
            500
        }
    }
}

/// An error response: Cloud Hypervisor's body shape, a JSON array of strings.
fn write_error(out: &mut Vec<u8>, body: &mut Vec<u8>, head: ResponseHead, message: &str) {
    body.clear();
    if serde_json::to_writer(&mut *body, &[message]).is_err() {
        body.clear();
        body.extend_from_slice(b"[]");
    }
    write_head(out, head, body.len());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::sync::Arc;

    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::command::{ApiRequest, VmInfo, VmState, VmmPingResponse};
    use crate::config::VmConfig;

    const CONFIG: &str = r#"{"payload": {"kernel": "/k"}, "disks": []}"#;

    /// A server on a temp socket, answered by a fake control loop that
    /// reports every config it receives on `created`.
    struct TestServer {
        _dir: TempDir,
        path: PathBuf,
        handle: JoinHandle<()>,
        created: mpsc::Receiver<VmConfig>,
        /// How many pings reached the control loop.
        pings: Arc<AtomicUsize>,
    }

    fn start() -> TestServer {
        let dir = TempDir::new_with_prefix("/tmp/kite-http-").unwrap();
        let path = dir.as_path().join("api.sock");
        let (sender, requests) = ApiSender::channel(Arc::new(EventFd::new(0).unwrap()));
        let (created_tx, created) = mpsc::channel();
        let pings = Arc::new(AtomicUsize::new(0));
        let counter = pings.clone();
        thread::spawn(move || fake_vmm(requests, created_tx, counter));
        let handle = start_http_server(&path, sender).unwrap();
        TestServer {
            _dir: dir,
            path,
            handle,
            created,
            pings,
        }
    }

    fn fake_vmm(
        requests: crossbeam_channel::Receiver<ApiRequest>,
        created: mpsc::Sender<VmConfig>,
        pings: Arc<AtomicUsize>,
    ) {
        let mut vm: Option<(VmConfig, VmState)> = None;
        for ApiRequest { action, reply } in requests {
            if let ApiAction::VmmPing = action {
                pings.fetch_add(1, Ordering::SeqCst);
            }
            let answer = match action {
                ApiAction::VmmPing => Ok(ApiResponse::Ping(VmmPingResponse {
                    build_version: "test".into(),
                    version: "0.1.0".into(),
                    pid: 42,
                    features: vec![],
                })),
                ApiAction::VmCreate(_) if vm.is_some() => Err(ApiError::VmAlreadyCreated),
                ApiAction::VmCreate(config) => {
                    let _ = created.send((*config).clone());
                    vm = Some((*config, VmState::Created));
                    Ok(ApiResponse::Empty)
                }
                ApiAction::VmInfo => match &vm {
                    Some((config, state)) => Ok(ApiResponse::Info(Box::new(VmInfo {
                        config: config.clone(),
                        state: *state,
                        memory_actual_size: config.memory.size,
                        device_tree: Default::default(),
                    }))),
                    None => Err(ApiError::VmNotCreated),
                },
                ApiAction::VmPause => Err(ApiError::InvalidState {
                    action: "pause",
                    state: VmState::Created,
                }),
                ApiAction::VmCounters => Ok(ApiResponse::Counters(Default::default())),
                ApiAction::VmmShutdown => {
                    let _ = reply.send(Ok(ApiResponse::Empty));
                    return;
                }
                _ if vm.is_none() => Err(ApiError::VmNotCreated),
                _ => Ok(ApiResponse::Empty),
            };
            let _ = reply.send(answer);
        }
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        /// The message of a CH-style error body.
        fn error(&self) -> String {
            let messages: Vec<String> = serde_json::from_slice(&self.body).unwrap();
            assert_eq!(messages.len(), 1);
            messages.into_iter().next().unwrap()
        }
    }

    fn connect(server: &TestServer) -> UnixStream {
        let stream = UnixStream::connect(&server.path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    /// Reads one response; the stream may hold more.
    fn read_reply(stream: &mut UnixStream, pending: &mut Vec<u8>) -> Reply {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = response.parse(pending).unwrap() {
                let headers: Vec<(String, String)> = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let status = response.code.unwrap();
                let body_len: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, v)| v.parse().unwrap());
                while pending.len() < len + body_len {
                    read_some(stream, pending);
                }
                let body = pending[len..len + body_len].to_vec();
                pending.drain(..len + body_len);
                return Reply {
                    status,
                    headers,
                    body,
                };
            }
            read_some(stream, pending);
        }
    }

    fn read_some(stream: &mut UnixStream, pending: &mut Vec<u8>) {
        let mut chunk = [0; 4096];
        let n = stream.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "connection closed; got {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&chunk[..n]);
    }

    fn send(stream: &mut UnixStream, raw: &[u8]) -> Reply {
        stream.write_all(raw).unwrap();
        read_reply(stream, &mut Vec::new())
    }

    /// One request on a fresh connection.
    fn call(server: &TestServer, raw: &[u8]) -> Reply {
        send(&mut connect(server), raw)
    }

    fn put(path: &str, body: &str) -> Vec<u8> {
        format!(
            "PUT /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes()
    }

    /// The server answers a fresh ping: nothing earlier broke it.
    fn assert_alive(server: &TestServer) {
        assert_eq!(call(server, &get("vmm.ping")).status, 200);
    }

    /// The server closed the connection after its response.
    fn assert_closed(stream: &mut UnixStream) {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "unexpected bytes: {rest:?}");
    }

    #[test]
    fn ping() {
        let server = start();
        let reply = call(&server, &get("vmm.ping"));
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("Content-Type"), Some("application/json"));
        assert_eq!(reply.header("Server"), Some("kite"));
        let ping: VmmPingResponse = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!((ping.version.as_str(), ping.pid), ("0.1.0", 42));

        // Later pings are answered from the first, without the control loop.
        let mut stream = connect(&server);
        for _ in 0..3 {
            let again = send(&mut stream, &get("vmm.ping"));
            assert_eq!((again.status, &again.body), (200, &reply.body));
        }
        let close = b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n";
        let closing = send(&mut stream, close);
        assert_eq!(closing.header("Connection"), Some("close"));
        assert_eq!(closing.body, reply.body);
        assert_closed(&mut stream);
        assert_eq!(server.pings.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn unknown_path_is_404() {
        let server = start();
        for path in ["/api/v1/vm.nope", "/api/v2/vmm.ping", "/", "/api/v1/"] {
            let reply = call(&server, format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes());
            assert_eq!(reply.status, 404, "{path}");
            assert_eq!(reply.error(), format!("no such endpoint: {path}"));
        }
        assert_alive(&server);
    }

    #[test]
    fn wrong_method_is_405() {
        let server = start();
        let reply = call(&server, &get("vm.boot"));
        assert_eq!(reply.status, 405);
        assert_eq!(reply.header("Allow"), Some("PUT"));
        assert_eq!(
            reply.error(),
            "method GET is not allowed on /api/v1/vm.boot; use PUT"
        );
        let reply = call(&server, &put("vmm.ping", ""));
        assert_eq!((reply.status, reply.header("Allow")), (405, Some("GET")));
        let reply = call(&server, b"DELETE /api/v1/vm.info HTTP/1.1\r\n\r\n");
        assert_eq!(reply.status, 405);
        assert_alive(&server);
    }

    #[test]
    fn create_and_info() {
        let server = start();
        let mut stream = connect(&server);
        let reply = send(&mut stream, &put("vm.create", CONFIG));
        assert_eq!(reply.status, 204);
        assert_eq!(reply.header("Content-Length"), None);
        assert!(reply.body.is_empty());
        let config = server.created.recv().unwrap();
        assert_eq!(config.payload.kernel.as_deref(), Some(Path::new("/k")));

        let reply = send(&mut stream, &get("vm.info"));
        assert_eq!(reply.status, 200);
        let info: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(info["state"], "Created");
        assert_eq!(info["config"]["payload"]["kernel"], "/k");
        assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1);

        let reply = send(&mut stream, &put("vm.create", CONFIG));
        assert_eq!(reply.status, 409);
        assert!(reply.error().contains("already created"));
        let reply = send(&mut stream, &get("vm.counters"));
        assert_eq!((reply.status, reply.body.as_slice()), (200, &b"{}"[..]));
    }

    #[test]
    fn api_errors_use_their_status() {
        let server = start();
        let reply = call(&server, &put("vm.boot", ""));
        assert_eq!(reply.status, 404);
        assert_eq!(reply.error(), "the VM is not created");
        let reply = call(&server, &put("vm.pause", ""));
        assert_eq!(reply.status, 405);
        assert_eq!(reply.error(), "cannot pause a VM that is Created");
    }

    #[test]
    fn bad_config_is_400() {
        let server = start();
        let cases = [
            ("{", "invalid VmConfig: EOF while parsing"),
            (r#"{"payload": {"kernel": 3}}"#, "invalid type: integer `3`"),
            ("{}", "missing field `payload`"),
            (
                r#"{"payload": {"kernel": "/k"}, "net": [{"tap": "tap0", "vhost_user": true}]}"#,
                "net[0].vhost_user: vhost-user is not supported by kite yet",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "disks": [{"path": "/d", "queue_size": 100}]}"#,
                "disks[0].queue_size (100) must be a power of two",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "serial": {"mode": "Tty"}, "console": {"mode": "Tty"}}"#,
                "only one device can own the terminal",
            ),
            (
                r#"{"payload": {"kernel": "/k"}, "x": 1}"#,
                "unknown field `x`",
            ),
            (r#"{"payload": {}}"#, "payload.kernel is required"),
            ("", "vm.create needs a VmConfig JSON body"),
        ];
        for (body, expected) in cases {
            let reply = call(&server, &put("vm.create", body));
            assert_eq!(reply.status, 400, "{body}");
            assert!(
                reply.error().contains(expected),
                "{body}: {:?}",
                reply.error()
            );
            assert_alive(&server);
        }
        assert!(server.created.try_recv().is_err());
    }

    #[test]
    fn oversized_body_is_413() {
        let server = start();
        let mut stream = connect(&server);
        let head = format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let reply = send(&mut stream, head.as_bytes());
        assert_eq!(reply.status, 413);
        assert!(reply.error().contains("exceeds the limit of 1048576 bytes"));
        assert_eq!(reply.header("Connection"), Some("close"));
        assert_closed(&mut stream);
        assert_alive(&server);

        // Exactly the limit is read in full (and then refused as JSON).
        let body = " ".repeat(MAX_BODY);
        let reply = call(&server, &put("vm.create", &body));
        assert_eq!(reply.status, 400);
        assert_alive(&server);
    }

    #[test]
    fn malformed_http_is_400() {
        let server = start();
        let cases: [&[u8]; 6] = [
            b"\x00\x01\x02\xff garbage\r\n\r\n",
            b"GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n",
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nbad header\r\n\r\n",
            b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: +1\r\n\r\nx",
            b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
        ];
        for raw in cases {
            let mut stream = connect(&server);
            let reply = send(&mut stream, raw);
            assert_eq!(reply.status, 400, "{:?}", String::from_utf8_lossy(raw));
            assert!(!reply.error().is_empty());
            assert_closed(&mut stream);
            assert_alive(&server);
        }

        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let reply = call(
            &server,
            format!("GET /api/v1/vmm.ping HTTP/1.1\r\n{many}\r\n").as_bytes(),
        );
        assert_eq!(reply.status, 400);
        assert_eq!(reply.error(), "the request has more than 32 header fields");

        let huge = format!(
            "GET /api/v1/vmm.ping HTTP/1.1\r\nX: {}\r\n\r\n",
            "y".repeat(MAX_HEAD)
        );
        let reply = call(&server, huge.as_bytes());
        assert_eq!(reply.status, 400);
        assert!(reply.error().contains("exceed 16384 bytes"));

        let chunked =
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(call(&server, chunked).status, 411);

        // A client that gives up in mid-request gets told, and nothing breaks.
        let mut stream = connect(&server);
        stream.write_all(b"GET /api/v1/vmm.pi").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let reply = read_reply(&mut stream, &mut Vec::new());
        assert_eq!(reply.status, 400);
        assert_eq!(reply.error(), "the connection closed in mid-request");
        assert_alive(&server);
    }

    #[test]
    fn keep_alive_and_pipelining() {
        let server = start();
        let mut stream = connect(&server);
        let first = send(&mut stream, &get("vmm.ping"));
        assert_eq!((first.status, first.header("Connection")), (200, None));
        assert_eq!(send(&mut stream, &put("vm.create", CONFIG)).status, 204);
        assert_eq!(send(&mut stream, &get("vm.nope")).status, 404);
        assert_eq!(send(&mut stream, &put("vm.create", "{")).status, 400);
        assert_eq!(send(&mut stream, &get("vmm.ping")).status, 200);

        // Three requests in one write, answered in order.
        let mut batch = get("vmm.ping");
        batch.extend(put("vm.boot", ""));
        batch.extend(get("vm.info"));
        stream.write_all(&batch).unwrap();
        let mut pending = Vec::new();
        let statuses: Vec<u16> = (0..3)
            .map(|_| read_reply(&mut stream, &mut pending).status)
            .collect();
        assert_eq!(statuses, [200, 204, 200]);

        // `Connection: close` ends it.
        let reply = send(
            &mut stream,
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(
            (reply.status, reply.header("Connection")),
            (200, Some("close"))
        );
        assert_closed(&mut stream);

        // HTTP/1.0 closes unless asked to keep alive.
        let mut stream = connect(&server);
        assert_eq!(
            send(&mut stream, b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n").status,
            200
        );
        assert_closed(&mut stream);
        let mut stream = connect(&server);
        let keep = b"GET /api/v1/vmm.ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(send(&mut stream, keep).status, 200);
        assert_eq!(send(&mut stream, keep).status, 200);
    }

    #[test]
    fn request_forms() {
        let server = start();
        let forms: [&[u8]; 3] = [
            b"GET /api/v1/vmm.ping?verbose=1 HTTP/1.1\r\n\r\n",
            b"GET http://localhost/api/v1/vmm.ping HTTP/1.1\r\n\r\n",
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        ];
        for raw in forms {
            assert_eq!(
                call(&server, raw).status,
                200,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // curl sends `Expect: 100-continue` for bodies over 1 KiB and waits.
        let mut stream = connect(&server);
        let body = format!(
            r#"{{"payload": {{"kernel": "/k", "cmdline": "{}"}}}}"#,
            "x".repeat(2000)
        );
        let head = format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut pending = Vec::new();
        assert_eq!(read_reply(&mut stream, &mut pending).status, 100);
        stream.write_all(body.as_bytes()).unwrap();
        assert_eq!(read_reply(&mut stream, &mut pending).status, 204);
    }

    #[test]
    fn idle_connections_stay_open_and_usable() {
        let server = start();
        let mut a = connect(&server);
        let mut b = connect(&server);
        // Interleaved, as a client with a pool of connections sends them.
        for round in 0..3 {
            for (name, stream) in [("a", &mut a), ("b", &mut b)] {
                let started = Instant::now();
                assert_eq!(send(stream, &get("vmm.ping")).status, 200, "{name} {round}");
                // An idle connection never holds up another for long.
                assert!(started.elapsed() < Duration::from_secs(2), "{name} {round}");
            }
            assert_alive(&server);
        }
    }

    #[test]
    fn too_many_idle_connections_close_the_longest_idle() {
        let server = start();
        let mut streams: Vec<UnixStream> = (0..=MAX_PARKED).map(|_| connect(&server)).collect();
        for stream in &mut streams {
            assert_eq!(send(stream, &get("vmm.ping")).status, 200);
            // Let it be parked before the next one comes.
            std::thread::sleep(Duration::from_millis(GRACE_MS as u64 * 2));
        }
        assert_alive(&server);
        assert_closed(&mut streams[0]);
        let last = streams.last_mut().unwrap();
        assert_eq!(send(last, &get("vmm.ping")).status, 200);
    }

    #[test]
    fn stalled_request_gives_way() {
        let server = start();
        let mut stalled = connect(&server);
        stalled
            .write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            .unwrap();
        // The half-sent request must not hold up another client for the
        // whole read timeout.
        let started = Instant::now();
        assert_alive(&server);
        assert!(started.elapsed() < Duration::from_secs(2));
        let mut pending = Vec::new();
        assert_eq!(read_reply(&mut stalled, &mut pending).status, 408);
    }

    #[test]
    fn socket_path_handling() {
        let server = start();
        let (sender, _requests) = ApiSender::channel(Arc::new(EventFd::new(0).unwrap()));
        let err = start_http_server(&server.path, sender.clone()).unwrap_err();
        assert!(matches!(err, HttpError::InUse(_)));
        assert!(err.to_string().contains(server.path.to_str().unwrap()));

        let dir = TempDir::new_with_prefix("/tmp/kite-http-").unwrap();
        let stale = dir.as_path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        start_http_server(&stale, sender.clone()).unwrap();

        let file = dir.as_path().join("file");
        fs::write(&file, b"precious").unwrap();
        let err = start_http_server(&file, sender.clone()).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(fs::read(&file).unwrap(), b"precious");

        let missing = dir.as_path().join("no/such/dir/api.sock");
        let err = start_http_server(&missing, sender).unwrap_err();
        assert!(
            err.to_string()
                .contains("no/such/dir/api.sock: cannot bind"),
            "{err}"
        );
    }

    #[test]
    fn vmm_shutdown_stops_the_server() {
        let server = start();
        let reply = call(&server, &put("vmm.shutdown", ""));
        assert_eq!(
            (reply.status, reply.header("Connection")),
            (204, Some("close"))
        );
        server.handle.join().unwrap();
        assert!(!server.path.exists());
    }

    #[test]
    fn control_loop_gone_is_503() {
        let dir = TempDir::new_with_prefix("/tmp/kite-http-").unwrap();
        let path = dir.as_path().join("api.sock");
        let (sender, requests) = ApiSender::channel(Arc::new(EventFd::new(0).unwrap()));
        drop(requests);
        let handle = start_http_server(&path, sender).unwrap();
        let mut stream = UnixStream::connect(&path).unwrap();
        let reply = send(&mut stream, &get("vmm.ping"));
        assert_eq!(reply.status, 503);
        assert_eq!(reply.error(), "the VMM is shutting down");
        handle.join().unwrap();
    }

    /// Not a benchmark, a tripwire: catches accidental sleeps or per-request
    /// threads. The real budget (p50 well under 50 us) is for release builds.
    #[test]
    fn ping_latency() {
        let server = start();
        let mut stream = connect(&server);
        let request = get("vmm.ping");
        let mut pending = Vec::new();
        let mut samples: Vec<Duration> = (0..2000)
            .map(|_| {
                let started = Instant::now();
                stream.write_all(&request).unwrap();
                assert_eq!(read_reply(&mut stream, &mut pending).status, 200);
                started.elapsed()
            })
            .collect();
        samples.sort();
        let p50 = samples[samples.len() / 2];
        eprintln!(
            "ping p50 {p50:?}, p99 {:?}",
            samples[samples.len() * 99 / 100]
        );
        assert!(p50 < Duration::from_millis(5), "p50 {p50:?}");
    }

    /// `openapi/kite.yaml` documents exactly the routes served.
    #[test]
    fn openapi_matches_routes() {
        let yaml_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/kite.yaml");
        let yaml = fs::read_to_string(&yaml_path).unwrap();
        let documented = openapi_operations(&yaml);
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.path.to_string(), r.method.to_string()))
            .collect();
        assert_eq!(documented, served);
        let root = format!("url: http://localhost{API_ROOT}");
        assert!(yaml
            .lines()
            .any(|l| l.trim().trim_start_matches("- ") == root));
    }

    /// (path, METHOD) pairs under `paths:`, by indentation: paths at two
    /// spaces, operations at four.
    fn openapi_operations(yaml: &str) -> BTreeSet<(String, String)> {
        const METHODS: [&str; 8] = [
            "get", "put", "post", "delete", "patch", "head", "options", "trace",
        ];
        let mut operations = BTreeSet::new();
        let mut in_paths = false;
        let mut path = None;
        for line in yaml.lines() {
            let indent = line.len() - line.trim_start().len();
            let key = line.trim().strip_suffix(':');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            if indent == 0 {
                in_paths = line == "paths:";
                continue;
            }
            match (in_paths, indent, key) {
                (true, 2, Some(p)) => path = Some(p.trim_matches('"').to_string()),
                (true, 4, Some(m)) if METHODS.contains(&m) => {
                    let path = path.clone().expect("operation outside a path");
                    operations.insert((path, m.to_uppercase()));
                }
                _ => {}
            }
        }
        operations
    }
}
