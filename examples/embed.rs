//! Driving kite from Rust, without HTTP: create a VM, boot it, look at it,
//! pause and resume it, and wait for the guest to power off.
//!
//! ```text
//! cargo run --example embed -- KERNEL [INITRAMFS] [CMDLINE]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use api::config::{ConsoleConfig, ConsoleMode, CpusConfig, MemoryConfig, PayloadConfig, VmConfig};
use vmm::{Vmm, VmmExit};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let kernel = args
        .next()
        .ok_or("usage: embed KERNEL [INITRAMFS] [CMDLINE]")?;
    let config = VmConfig {
        cpus: CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        },
        memory: MemoryConfig { size: 256 << 20 },
        payload: PayloadConfig {
            kernel: Some(PathBuf::from(kernel)),
            initramfs: args.next().map(PathBuf::from),
            cmdline: args.next(),
        },
        serial: ConsoleConfig {
            mode: ConsoleMode::Tty,
            file: None,
        },
        console: ConsoleConfig::console_default(),
        ..VmConfig::default()
    };

    // `true`: the VMM ends when the guest powers off.
    let vmm = Vmm::start(true)?;
    vmm.create(config)?;
    vmm.boot()?;
    eprintln!("embed: state after boot: {:?}", vmm.info()?.state);
    vmm.pause()?;
    eprintln!("embed: state after pause: {:?}", vmm.info()?.state);
    std::thread::sleep(Duration::from_millis(100));
    vmm.resume()?;
    eprintln!("embed: resumed; waiting for the guest to power off");
    match vmm.wait()? {
        VmmExit::GuestFailed(why) => Err(format!("guest failed: {why}").into()),
        exit => {
            eprintln!("embed: VMM ended: {exit:?}");
            Ok(())
        }
    }
}
