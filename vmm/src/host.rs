//! What the host can give a VM, checked before anything is allocated so that
//! an impossible request is a clear client error, not an OOM kill later.

use api::config::VmConfig;

/// Host RAM plus swap, in bytes.
fn host_memory() -> Option<u64> {
    // SAFETY: sysinfo fills the plain-data struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    let unit = u64::from(info.mem_unit.max(1));
    Some((info.totalram as u64 + info.totalswap as u64) * unit)
}

/// Refuses a guest larger than all of the host's memory.
pub fn check_fits(config: &VmConfig) -> Result<(), String> {
    let want = config.memory.size;
    match host_memory() {
        Some(have) if want > have => Err(format!(
            "memory size {want} bytes is more than the host's {have} bytes of RAM and swap"
        )),
        _ => Ok(()),
    }
}
