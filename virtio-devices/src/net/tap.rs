//! TAP interfaces: the host side of a virtio-net device.
//!
//! A [`Tap`] is one file descriptor of `/dev/net/tun` attached to a TAP
//! interface: one queue of it when the interface is multi-queue
//! (`IFF_MULTI_QUEUE`), which kite uses whenever a device has more than one
//! queue pair, one descriptor per pair. Every descriptor is non-blocking
//! and carries frames with a virtio-net header in front
//! (`IFF_VNET_HDR`, header size [`VNET_HDR_LEN`]), so the header the guest
//! writes is handed to the kernel as it is, and the kernel's comes back the
//! same way.
//!
//! # Where the TAP comes from (Cloud Hypervisor's semantics)
//!
//! * [`Tap::open_or_create`] with the name of an interface that exists
//!   attaches to it as it is: its addresses are left alone (the host may
//!   have bridged it) and only the host MAC and MTU asked for are applied;
//!   it is brought up. The interface must be a TAP whose multi-queue setting
//!   matches the queue pairs asked for.
//! * With a name that does not exist, or none, it creates the interface
//!   (named by the kernel from `kite%d` without a name), gives its host side
//!   the IPv4 address and netmask, the MAC and MTU asked for, and brings it
//!   up. Such a TAP is not persistent: it goes away with the last
//!   descriptor, i.e. with the VM.
//! * [`Tap::from_fds`] takes descriptors the VMM inherited (e.g. from
//!   libvirt) and uses duplicates of them as they are, checking only that
//!   each is a TAP with a virtio-net header; the originals stay open, so a VM
//!   built again from the same configuration can use them again.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::{c_int, c_short, c_ulong};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// The virtio-net header on every frame: `struct virtio_net_hdr_mrg_rxbuf`,
/// the header of virtio 1.x whatever the features.
pub const VNET_HDR_LEN: usize = 12;

/// Longest interface name (IFNAMSIZ less the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// The name template of TAPs kite creates without a name.
pub const DEFAULT_NAME_TEMPLATE: &str = "kite%d";

const TUN_PATH: &str = "/dev/net/tun";

/// ioctl numbers: `linux/if_tun.h` and `linux/sockios.h`.
mod ioctls {
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

    const TUNTAP: u32 = b'T' as u32;
    ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
    ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
    ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, ::std::os::raw::c_uint);
    ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);
    ioctl_iow_nr!(TUNSETQUEUE, TUNTAP, 217, ::std::os::raw::c_int);

    pub const SIOCGIFFLAGS: ::std::os::raw::c_ulong = 0x8913;
    pub const SIOCSIFFLAGS: ::std::os::raw::c_ulong = 0x8914;
    pub const SIOCSIFADDR: ::std::os::raw::c_ulong = 0x8916;
    pub const SIOCSIFNETMASK: ::std::os::raw::c_ulong = 0x891c;
    pub const SIOCSIFMTU: ::std::os::raw::c_ulong = 0x8922;
    pub const SIOCSIFHWADDR: ::std::os::raw::c_ulong = 0x8924;
}

/// Offload bits of TUNSETOFFLOAD (`linux/if_tun.h`).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_UFO: u32 = 0x10;

/// Why a TAP cannot be used. Every message names the TAP (or the
/// descriptor) and, where the cause is a common one, says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name `{0}` is {len} bytes; interface names have at most {MAX_NAME_LEN}", len = .0.len())]
    NameTooLong(String),
    #[error("TAP name `{0}` is not a valid interface name")]
    BadName(String),
    #[error("TAP `{tap}`: cannot open {TUN_PATH}: {source}{hint}")]
    OpenTun {
        tap: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error("TAP `{tap}`: cannot {action}: {source}{hint}")]
    Setup {
        tap: String,
        action: &'static str,
        source: io::Error,
        hint: &'static str,
    },
    #[error("TAP file descriptor {fd}: {reason}")]
    BadFd { fd: RawFd, reason: String },
    #[error("a TAP device needs at least one queue pair")]
    NoQueues,
}

/// The host side of a TAP kite creates: what [`Tap::open_or_create`] sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// IPv4 address and netmask; only set on a TAP kite creates.
    pub ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    /// The interface's MAC; the kernel's random one when `None`.
    pub mac: Option<[u8; 6]>,
    /// The interface's MTU; the kernel's default (1500) when `None`.
    pub mtu: Option<u16>,
}

/// One queue (file descriptor) of a TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    multi_queue: bool,
    /// Whether this queue is attached (IFF_ATTACH_QUEUE) to the interface.
    attached: Mutex<bool>,
}

/// A zeroed `struct ifreq` naming `name`.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a C struct of integers, arrays and a union of them
    // (and a pointer, for which null is fine); all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes().take(MAX_NAME_LEN)) {
        *dst = src as libc::c_char;
    }
    ifr
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check_name(name: &str) -> Result<(), TapError> {
    if name.len() > MAX_NAME_LEN {
        return Err(TapError::NameTooLong(name.to_string()));
    }
    if name.is_empty() || name.contains(['/', ':', '\0']) || name.contains(char::is_whitespace) {
        return Err(TapError::BadName(name.to_string()));
    }
    Ok(())
}

/// Whether an interface of this name exists in the VMM's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: cname is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
}

/// Hints for the usual reasons an ioctl on a TAP fails.
fn hint(err: &io::Error, creating: bool) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) if creating => {
            " (creating a TAP needs CAP_NET_ADMIN; without it, use a persistent TAP owned by kite's user, e.g. `ip tuntap add NAME mode tap multi_queue user USER vnet_hdr`)"
        }
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (the TAP belongs to another user or group, or kite lacks CAP_NET_ADMIN)"
        }
        Some(libc::EBUSY) => " (another process already holds this single-queue TAP)",
        Some(libc::EINVAL) => {
            " (the interface is not a TAP, or its multi-queue or vnet_hdr setting does not match: a TAP for one queue pair must be single-queue, one for several must be multi_queue)"
        }
        _ => "",
    }
}

impl Tap {
    /// Opens the TAP `name` (attaching to it as it is if it exists, creating
    /// it otherwise) or, without a name, creates one named from
    /// [`DEFAULT_NAME_TEMPLATE`]; returns one queue per queue pair. A TAP
    /// this call creates gets `host.ip`/`host.netmask`; `host.mac` and
    /// `host.mtu`, when given, are set either way, and the interface is
    /// brought up.
    pub fn open_or_create(
        name: Option<&str>,
        host: &HostConfig,
        queue_pairs: u16,
    ) -> Result<Vec<Tap>, TapError> {
        if queue_pairs == 0 {
            return Err(TapError::NoQueues);
        }
        if let Some(name) = name {
            check_name(name)?;
        }
        let template = name.unwrap_or(DEFAULT_NAME_TEMPLATE);
        let existed = !template.contains('%') && interface_exists(template);
        let multi_queue = queue_pairs > 1;
        let first = Tap::open_named(template, multi_queue, !existed)?;
        let name = first.name.clone();
        let mut taps = vec![first];
        for _ in 1..queue_pairs {
            taps.push(Tap::open_named(&name, multi_queue, false)?);
        }
        let tap = &taps[0];
        let socket = tap.control_socket()?;
        if existed {
            log::info!("TAP {name} exists; using it as it is (its addresses are not changed)");
        } else {
            tap.set_ipv4(
                &socket,
                ioctls::SIOCSIFADDR,
                host.ip,
                "set its IPv4 address",
            )?;
            tap.set_ipv4(
                &socket,
                ioctls::SIOCSIFNETMASK,
                host.netmask,
                "set its netmask",
            )?;
        }
        if let Some(mac) = host.mac {
            tap.set_mac(&socket, mac)?;
        }
        if let Some(mtu) = host.mtu {
            tap.set_mtu_with(&socket, mtu)?;
        }
        tap.bring_up(&socket)?;
        log::info!(
            "TAP {name}: {} {queue_pairs} queue(s){}",
            if existed {
                "attached to"
            } else {
                "created with"
            },
            if existed {
                String::new()
            } else {
                format!(", host side {}/{}", host.ip, host.netmask)
            }
        );
        Ok(taps)
    }

    /// Uses TAP descriptors the VMM inherited, one per queue pair, as they
    /// are (no TUNSETIFF). Each is duplicated: `fds` stay open and owned by
    /// the caller. `mtu`, when given, is set on the interface.
    pub fn from_fds(fds: &[RawFd], mtu: Option<u16>) -> Result<Vec<Tap>, TapError> {
        if fds.is_empty() {
            return Err(TapError::NoQueues);
        }
        let multi_queue = fds.len() > 1;
        let taps = fds
            .iter()
            .map(|&fd| Tap::from_fd(fd, multi_queue))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(other) = taps.iter().find(|t| t.name != taps[0].name) {
            return Err(TapError::BadFd {
                fd: other.file.as_raw_fd(),
                reason: format!(
                    "belongs to TAP {} while the first one belongs to {}; all of a device's descriptors must be queues of one TAP",
                    other.name, taps[0].name
                ),
            });
        }
        if let Some(mtu) = mtu {
            let socket = taps[0].control_socket()?;
            taps[0].set_mtu_with(&socket, mtu)?;
        }
        log::info!(
            "TAP {}: using {} inherited descriptor(s)",
            taps[0].name,
            taps.len()
        );
        Ok(taps)
    }

    fn from_fd(fd: RawFd, multi_queue: bool) -> Result<Tap, TapError> {
        let bad = |reason: String| TapError::BadFd { fd, reason };
        if fd < 0 {
            return Err(bad("not a file descriptor".into()));
        }
        // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; on success
        // it returns a new descriptor that nothing else owns.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(bad(format!(
                "cannot use it: {} (is it open in kite's process?)",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: dup is a fresh descriptor owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(dup) });
        let mut ifr = ifreq("");
        // SAFETY: TUNGETIFF writes a struct ifreq, which ifr is, and reads
        // nothing else.
        let ret = unsafe { ioctl_with_mut_ref(&file, ioctls::TUNGETIFF(), &mut ifr) };
        if ret < 0 {
            return Err(bad(format!(
                "not a TAP attached to an interface: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: TUNGETIFF filled in ifr_flags.
        let flags = c_int::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff;
        let name = ifreq_name(&ifr);
        let missing = |flag: c_int| flags & flag == 0;
        if missing(libc::IFF_TAP) {
            return Err(bad(format!("{name} is a TUN (IP) device, not a TAP")));
        }
        if missing(libc::IFF_NO_PI) || missing(libc::IFF_VNET_HDR) {
            return Err(bad(format!(
                "{name} was opened without IFF_NO_PI and IFF_VNET_HDR, which kite needs"
            )));
        }
        if multi_queue && missing(libc::IFF_MULTI_QUEUE) {
            return Err(bad(format!(
                "{name} is single-queue but several descriptors were given"
            )));
        }
        set_nonblocking(&file).map_err(|e| bad(format!("cannot make it non-blocking: {e}")))?;
        let tap = Tap {
            file,
            name,
            multi_queue: flags & libc::IFF_MULTI_QUEUE != 0,
            attached: Mutex::new(true),
        };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Opens /dev/net/tun and attaches it to `name` (a template with `%d`
    /// creates an interface).
    fn open_named(name: &str, multi_queue: bool, creating: bool) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun {
                tap: name.to_string(),
                hint: match source.kind() {
                    io::ErrorKind::NotFound => {
                        " (the host has no TUN/TAP driver: load the tun module, or create the device node)"
                    }
                    io::ErrorKind::PermissionDenied => " (kite's user may not open it)",
                    _ => "",
                },
                source,
            })?;
        let mut ifr = ifreq(name);
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        ifr.ifr_ifru.ifru_flags = flags as c_short;
        // SAFETY: TUNSETIFF reads a struct ifreq and writes the interface's
        // name back into it; ifr is one and lives across the call.
        let ret = unsafe { ioctl_with_mut_ref(&file, ioctls::TUNSETIFF(), &mut ifr) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            return Err(TapError::Setup {
                tap: name.to_string(),
                action: if creating {
                    "create it"
                } else {
                    "attach to it"
                },
                hint: hint(&source, creating),
                source,
            });
        }
        let tap = Tap {
            file,
            name: ifreq_name(&ifr),
            multi_queue,
            attached: Mutex::new(true),
        };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// The interface's name, e.g. `kite0`.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn fail(&self, action: &'static str, creating: bool) -> TapError {
        let source = io::Error::last_os_error();
        TapError::Setup {
            tap: self.name.clone(),
            action,
            hint: hint(&source, creating),
            source,
        }
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len = VNET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which len is.
        let ret = unsafe { ioctl_with_ref(&self.file, ioctls::TUNSETVNETHDRSZ(), &len) };
        if ret < 0 {
            return Err(self.fail("set its virtio-net header size", false));
        }
        Ok(())
    }

    /// Sets the offloads the kernel may use on frames it hands to the guest
    /// (`TUN_F_*`); they must be ones the guest negotiated. The setting is
    /// the interface's, so one queue's descriptor is enough.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no
        // memory of ours.
        let ret =
            unsafe { ioctl_with_val(&self.file, ioctls::TUNSETOFFLOAD(), c_ulong::from(flags)) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Attaches this queue to the interface or detaches it (a detached
    /// queue gets no frames; the kernel spreads them over the others). Only
    /// multi-queue TAPs have queues to detach; for others this does nothing.
    pub fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        let mut ifr = ifreq("");
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        ifr.ifr_ifru.ifru_flags = flag as c_short;
        // SAFETY: TUNSETQUEUE reads a struct ifreq, which ifr is.
        let ret = unsafe { ioctl_with_ref(&self.file, ioctls::TUNSETQUEUE(), &ifr) };
        // EINVAL: the queue is already so (the kernel refuses to attach an
        // attached queue or detach a detached one). Always asking keeps this
        // right for inherited descriptors whose state kite did not set.
        if ret < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
        *attached = enabled;
        Ok(())
    }

    /// Whether this queue is attached (see [`Tap::set_queue_enabled`]).
    pub fn queue_enabled(&self) -> bool {
        *self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An AF_INET socket for the interface ioctls.
    fn control_socket(&self) -> Result<OwnedFd, TapError> {
        // SAFETY: socket has no memory-safety preconditions.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(self.fail("open a socket to configure it", false));
        }
        // SAFETY: fd is a fresh descriptor owned by nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn set_ipv4(
        &self,
        socket: &OwnedFd,
        request: c_ulong,
        addr: Ipv4Addr,
        action: &'static str,
    ) -> Result<(), TapError> {
        let mut ifr = ifreq(&self.name);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(addr).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr are both 16-byte plain C structs;
        // this is how the kernel reads the address (as a sockaddr_in).
        ifr.ifr_ifru.ifru_addr =
            unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) };
        // SAFETY: SIOCSIFADDR and SIOCSIFNETMASK read a struct ifreq, which
        // ifr is.
        let ret = unsafe { ioctl_with_ref(socket, request, &ifr) };
        if ret < 0 {
            return Err(self.fail(action, true));
        }
        Ok(())
    }

    fn set_mac(&self, socket: &OwnedFd, mac: [u8; 6]) -> Result<(), TapError> {
        let mut ifr = ifreq(&self.name);
        // SAFETY: sockaddr is a plain C struct; all zeroes is a valid value.
        let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
        addr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in addr.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_hwaddr = addr;
        // SAFETY: SIOCSIFHWADDR reads a struct ifreq, which ifr is.
        let ret = unsafe { ioctl_with_ref(socket, ioctls::SIOCSIFHWADDR, &ifr) };
        if ret < 0 {
            return Err(self.fail("set its MAC address", false));
        }
        Ok(())
    }

    fn set_mtu_with(&self, socket: &OwnedFd, mtu: u16) -> Result<(), TapError> {
        let mut ifr = ifreq(&self.name);
        ifr.ifr_ifru.ifru_mtu = c_int::from(mtu);
        // SAFETY: SIOCSIFMTU reads a struct ifreq, which ifr is.
        let ret = unsafe { ioctl_with_ref(socket, ioctls::SIOCSIFMTU, &ifr) };
        if ret < 0 {
            return Err(self.fail("set its MTU", false));
        }
        Ok(())
    }

    fn bring_up(&self, socket: &OwnedFd) -> Result<(), TapError> {
        let mut ifr = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS reads the name from, and writes the flags
        // into, a struct ifreq, which ifr is.
        let ret = unsafe { ioctl_with_mut_ref(socket, ioctls::SIOCGIFFLAGS, &mut ifr) };
        if ret < 0 {
            return Err(self.fail("read its flags", false));
        }
        // SAFETY: SIOCGIFFLAGS filled in ifr_flags.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as c_short;
        // SAFETY: SIOCSIFFLAGS reads a struct ifreq, which ifr is.
        let ret = unsafe { ioctl_with_ref(socket, ioctls::SIOCSIFFLAGS, &ifr) };
        if ret < 0 {
            return Err(self.fail("bring it up", false));
        }
        Ok(())
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own touch no memory.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// What the device needs of a TAP queue. [`Tap`] is the real one; tests use
/// sockets.
pub trait TapIo: Send + Sync + 'static {
    /// Reads one frame (virtio-net header first) without blocking.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (virtio-net header first) without blocking.
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize>;
    /// The descriptor to poll for readability.
    fn poll_fd(&self) -> RawFd;
    /// See [`Tap::set_offload`].
    fn set_offload(&self, flags: u32) -> io::Result<()>;
    /// See [`Tap::set_queue_enabled`].
    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()>;
    /// See [`Tap::queue_enabled`].
    fn queue_enabled(&self) -> bool;
    /// For logs.
    fn name(&self) -> &str;
}

impl TapIo for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }

    fn poll_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }

    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        Tap::set_queue_enabled(self, enabled)
    }

    fn queue_enabled(&self) -> bool {
        Tap::queue_enabled(self)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        let host = HostConfig {
            ip: Ipv4Addr::new(192, 168, 249, 1),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            mac: None,
            mtu: None,
        };
        let err = Tap::open_or_create(Some("a-very-long-tap-name"), &host, 1).unwrap_err();
        assert!(matches!(err, TapError::NameTooLong(_)));
        assert!(err.to_string().contains("a-very-long-tap-name"));
        assert!(err.to_string().contains("at most 15"));
        for bad in ["", "a/b", "a b", "a:b"] {
            assert!(matches!(
                Tap::open_or_create(Some(bad), &host, 1),
                Err(TapError::BadName(_))
            ));
        }
        assert!(matches!(
            Tap::open_or_create(None, &host, 0),
            Err(TapError::NoQueues)
        ));
    }

    #[test]
    fn ifreq_names_round_trip() {
        let ifr = ifreq("kite7");
        assert_eq!(ifreq_name(&ifr), "kite7");
        // Too long names are cut to fit with their NUL.
        let ifr = ifreq("0123456789abcdefgh");
        assert_eq!(ifreq_name(&ifr), "0123456789abcde");
    }

    #[test]
    fn descriptors_that_are_not_taps_are_refused() {
        assert!(matches!(Tap::from_fds(&[], None), Err(TapError::NoQueues)));
        let err = Tap::from_fds(&[-1], None).unwrap_err();
        assert!(err.to_string().contains("file descriptor -1"), "{err}");
        // A descriptor number that is not open.
        let err = Tap::from_fds(&[1_000_000], None).unwrap_err();
        assert!(err.to_string().contains("1000000"), "{err}");
        // An open file that is not a TAP.
        let file = File::open("/dev/null").unwrap();
        let err = Tap::from_fds(&[file.as_raw_fd()], None).unwrap_err();
        assert!(err.to_string().contains("not a TAP"), "{err}");
        // The caller's descriptor is still open.
        // SAFETY: F_GETFD on any number touches no memory.
        assert!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) } >= 0);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        assert_eq!(ioctls::TUNSETIFF(), 0x4004_54ca);
        assert_eq!(ioctls::TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(ioctls::TUNGETIFF(), 0x8004_54d2);
        assert_eq!(ioctls::TUNSETVNETHDRSZ(), 0x4004_54d8);
        assert_eq!(ioctls::TUNSETQUEUE(), 0x4004_54d9);
    }
}
