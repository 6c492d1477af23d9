//! The `kite` binary: boots a VM from the command line, serves the Cloud
//! Hypervisor-compatible REST API on a Unix socket, or both.

mod logger;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::cli::{
    parse_console, parse_cpus, parse_disk, parse_memory, parse_net, parse_rng, parse_serial,
};
use api::config::{
    ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig, RngConfig,
    VmConfig,
};
use clap::Parser;
use vmm::{Vmm, VmmExit};

/// How long the HTTP server may take to answer its last request at exit.
const HTTP_DRAIN_TIME: Duration = Duration::from_millis(100);

/// kite: a small, fast KVM virtual machine monitor.
#[derive(Parser, Debug)]
#[command(name = "kite", version, about)]
struct Cli {
    /// Kernel to boot: an ELF vmlinux with a PVH entry, or a bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs to load with the kernel.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// vCPUs: boot=N[,max=M].
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<CpusConfig>,
    /// Guest memory: size=<bytes>[K|M|G].
    #[arg(long, value_parser = parse_memory)]
    memory: Option<MemoryConfig>,
    /// COM1 output: tty, file=PATH, null or off.
    #[arg(long, value_parser = parse_serial, default_value = "tty")]
    serial: ConsoleConfig,
    /// virtio-console output: off, null, tty or file=PATH.
    #[arg(long, value_parser = parse_console, default_value = "off")]
    console: ConsoleConfig,
    /// virtio-blk disk (repeatable): path=FILE[,readonly=on|off][,direct=on|off][,num_queues=N][,queue_size=N][,id=ID][,serial=SERIAL][,image_type=raw|qcow2].
    #[arg(long, value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// virtio-net device over a TAP (repeatable): [tap=NAME][,ip=IPV4][,mask=NETMASK][,mac=MAC][,host_mac=MAC][,mtu=N][,num_queues=N][,queue_size=N][,id=ID][,fd=FD|fd=[FD,...]][,offload_tso=on|off][,offload_ufo=on|off][,offload_csum=on|off]. Without tap or fd, kite creates a TAP.
    #[arg(long, value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// virtio-rng entropy source: src=PATH[,id=ID] (default src=/dev/urandom).
    #[arg(long, value_parser = parse_rng)]
    rng: Option<RngConfig>,
    /// Serve the REST API on this Unix socket: PATH or path=PATH.
    #[arg(long)]
    api_socket: Option<String>,
    /// Write the log here instead of stderr.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// More log output (repeat for more).
    #[arg(short, action = clap::ArgAction::Count)]
    v: u8,
}

impl Cli {
    fn api_socket_path(&self) -> Option<PathBuf> {
        self.api_socket
            .as_deref()
            .map(|s| PathBuf::from(s.strip_prefix("path=").unwrap_or(s)))
    }

    /// The VM the command line describes, if any.
    fn vm_config(&self) -> Result<Option<VmConfig>, String> {
        let Some(kernel) = self.kernel.clone() else {
            let vm_options = self.initramfs.is_some()
                || self.cmdline.is_some()
                || self.cpus.is_some()
                || self.memory.is_some()
                || !self.disk.is_empty()
                || !self.net.is_empty()
                || self.rng.is_some();
            return if vm_options {
                Err("--kernel is required to boot a VM".into())
            } else {
                Ok(None)
            };
        };
        let config = VmConfig {
            cpus: self.cpus.clone().unwrap_or_default(),
            memory: self.memory.clone().unwrap_or_default(),
            payload: PayloadConfig {
                kernel: Some(kernel),
                initramfs: self.initramfs.clone(),
                cmdline: self.cmdline.clone(),
            },
            disks: self.disk.clone(),
            net: self.net.clone(),
            rng: self.rng.clone().unwrap_or_default(),
            serial: self.serial.clone(),
            console: self.console.clone(),
        };
        config.validate().map_err(|e| e.to_string())?;
        Ok(Some(config))
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let config = cli.vm_config()?;
    let socket = cli.api_socket_path();
    if config.is_none() && socket.is_none() {
        return Err(
            "nothing to do: give --kernel to boot a VM or --api-socket to serve the API".into(),
        );
    }
    let vmm = Vmm::start(socket.is_none()).map_err(|e| e.to_string())?;
    let http = match &socket {
        Some(path) => match api::http::start_http_server(path, vmm.sender()) {
            Ok(handle) => Some(handle),
            Err(e) => {
                let _ = vmm.stop();
                return Err(e.to_string());
            }
        },
        None => None,
    };
    if let Some(config) = config {
        if let Err(e) = vmm.create(config).and_then(|()| vmm.boot()) {
            let _ = vmm.stop();
            return Err(e.to_string());
        }
    }
    let exit = vmm.wait().map_err(|e| e.to_string())?;
    if let Some(http) = http {
        // After vmm.shutdown the server still has to send its 204; give it a moment.
        let deadline = Instant::now() + HTTP_DRAIN_TIME;
        while !http.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if let Some(path) = &socket {
        let _ = std::fs::remove_file(path);
    }
    match exit {
        VmmExit::Shutdown | VmmExit::GuestPoweredOff => Ok(()),
        VmmExit::GuestFailed(why) => Err(format!("guest failed: {why}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = match cli.log_file.as_ref().map(std::fs::File::create).transpose() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("kite: cannot open log file: {e}");
            return ExitCode::FAILURE;
        }
    };
    logger::init(cli.v, log_file);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kite: {e}");
            ExitCode::FAILURE
        }
    }
}
