//! Parsers for Cloud Hypervisor's command-line option syntax, so `kite` takes
//! the same `--cpus`, `--memory`, `--disk`, `--net`, `--rng`, `--serial` and
//! `--console` values as `cloud-hypervisor`. They fit clap's `value_parser`: each returns the config
//! struct or a message naming the bad part (clap prefixes the flag name).
//! Only syntax is checked here; [`crate::VmConfig::validate`] checks ranges.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use crate::config::{
    ConsoleConfig, ConsoleMode, CpusConfig, DiskConfig, ImageType, MacAddr, MemoryConfig,
    NetConfig, RngConfig, DEFAULT_MEMORY_SIZE,
};

/// `--cpus boot=N[,max=M]`. `boot` defaults to 1 and `max` to `boot`, as in
/// Cloud Hypervisor.
pub fn parse_cpus(value: &str) -> Result<CpusConfig, String> {
    let mut boot = None;
    let mut max = None;
    for (key, val) in options(value, &["boot", "max"])? {
        let count = val
            .parse::<u8>()
            .map_err(|_| format!("`{key}={val}`: expected a vCPU count"))?;
        match key {
            "boot" => boot = Some(count),
            _ => max = Some(count),
        }
    }
    let boot_vcpus = boot.unwrap_or(1);
    Ok(CpusConfig {
        boot_vcpus,
        max_vcpus: max.unwrap_or(boot_vcpus),
    })
}

/// `--memory size=SIZE`, SIZE in bytes with an optional K, M or G suffix
/// (powers of 1024). Without `size`, Cloud Hypervisor's 512 MiB.
pub fn parse_memory(value: &str) -> Result<MemoryConfig, String> {
    let mut size = DEFAULT_MEMORY_SIZE;
    for (_, val) in options(value, &["size"])? {
        size = parse_size(val).map_err(|e| format!("`size={val}`: {e}"))?;
    }
    Ok(MemoryConfig { size })
}

/// A byte count with an optional K, M or G suffix (powers of 1024), as Cloud
/// Hypervisor's `ByteSized`.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let (digits, shift) = match value.as_bytes().last() {
        Some(b'K' | b'k') => (&value[..value.len() - 1], 10),
        Some(b'M' | b'm') => (&value[..value.len() - 1], 20),
        Some(b'G' | b'g') => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{value}` is not a size (e.g. 512M, 1G, 1048576)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{value}` is too large"))
}

/// Cloud Hypervisor's `--disk` keys that kite does not implement, with what
/// they ask for.
const DISK_UNSUPPORTED: &[(&str, &str)] = &[
    ("iommu", "the virtual IOMMU"),
    ("vhost_user", "vhost-user"),
    ("socket", "vhost-user"),
    ("bw_size", "I/O rate limiting"),
    ("bw_one_time_burst", "I/O rate limiting"),
    ("bw_refill_time", "I/O rate limiting"),
    ("ops_size", "I/O rate limiting"),
    ("ops_one_time_burst", "I/O rate limiting"),
    ("ops_refill_time", "I/O rate limiting"),
    ("rate_limit_group", "I/O rate limiting"),
    ("pci_segment", "choosing the PCI segment"),
    ("pci_device_id", "choosing the PCI slot"),
    ("queue_affinity", "virtqueue CPU affinity"),
];

/// `--disk path=FILE[,readonly=on|off][,direct=on|off][,num_queues=N]
/// [,queue_size=N][,id=ID][,serial=SERIAL][,image_type=raw|qcow2]`.
/// Booleans take on/off or true/false; the defaults are Cloud Hypervisor's.
/// Values cannot contain commas.
///
/// As in a JSON config, `backing_files=on|off` and
/// `lock_granularity=byte-range|full` are accepted and change nothing (kite
/// always opens qcow2 backing files read-only and locks whole files), and
/// `sparse=on` is accepted. Other Cloud Hypervisor keys are refused as
/// unsupported, anything else as unknown.
pub fn parse_disk(value: &str) -> Result<DiskConfig, String> {
    const KEYS: &[&str] = &[
        "path",
        "readonly",
        "direct",
        "num_queues",
        "queue_size",
        "id",
        "serial",
        "image_type",
        "backing_files",
        "sparse",
        "lock_granularity",
    ];
    if let Some((key, feature)) = value.split(',').find_map(|part| {
        let key = part.split_once('=').map_or(part, |(k, _)| k);
        DISK_UNSUPPORTED.iter().find(|(k, _)| *k == key)
    }) {
        return Err(format!("`{key}`: {feature} is not supported by kite yet"));
    }
    let mut disk = DiskConfig::new("");
    for (key, val) in options(value, KEYS)? {
        match key {
            "path" if val.is_empty() => return Err("`path=`: the path is empty".into()),
            "path" => disk.path = PathBuf::from(val),
            "readonly" => disk.readonly = toggle(key, val)?,
            "direct" => disk.direct = toggle(key, val)?,
            "num_queues" => disk.num_queues = number(key, val, "a queue count")?,
            "queue_size" => disk.queue_size = number(key, val, "a queue size")?,
            "id" => disk.id = Some(val.to_string()),
            "serial" => disk.serial = Some(val.to_string()),
            "backing_files" => {
                toggle(key, val)?;
            }
            "sparse" => {
                if !toggle(key, val)? {
                    return Err(format!(
                        "`sparse={val}`: disabling sparse images is not supported by kite yet"
                    ));
                }
            }
            "lock_granularity" => {
                if !matches!(val, "byte-range" | "full") {
                    return Err(format!(
                        "`lock_granularity={val}`: expected byte-range or full"
                    ));
                }
            }
            "image_type" => {
                disk.image_type = Some(match val.to_ascii_lowercase().as_str() {
                    "raw" => ImageType::Raw,
                    "qcow2" => ImageType::Qcow2,
                    "vmdk" | "vhd" | "vhdx" => {
                        return Err(format!(
                            "`image_type={val}`: this format is not supported by kite yet (expected raw or qcow2)"
                        ))
                    }
                    _ => return Err(format!("`image_type={val}`: expected raw or qcow2")),
                })
            }
            _ => unreachable!("options() returns only KEYS"),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err("path is required (path=FILE)".into());
    }
    Ok(disk)
}

/// Cloud Hypervisor's `--net` keys that kite does not implement, with what
/// they ask for.
const NET_UNSUPPORTED: &[(&str, &str)] = &[
    ("iommu", "the virtual IOMMU"),
    ("vhost_user", "vhost-user"),
    ("socket", "vhost-user"),
    ("vhost_mode", "vhost-user"),
    ("bw_size", "I/O rate limiting"),
    ("bw_one_time_burst", "I/O rate limiting"),
    ("bw_refill_time", "I/O rate limiting"),
    ("ops_size", "I/O rate limiting"),
    ("ops_one_time_burst", "I/O rate limiting"),
    ("ops_refill_time", "I/O rate limiting"),
    ("pci_segment", "choosing the PCI segment"),
    ("pci_device_id", "choosing the PCI slot"),
];

/// `--net [tap=NAME][,ip=IPV4][,mask=NETMASK][,mac=MAC][,host_mac=MAC]
/// [,mtu=N][,num_queues=N][,queue_size=N][,id=ID][,fd=FD|fd=[FD,FD...]]
/// [,offload_tso=on|off][,offload_ufo=on|off][,offload_csum=on|off]`, as
/// Cloud Hypervisor's. Every key is optional (`--net ""` is not accepted;
/// use e.g. `--net id=net0`): without `tap` or `fd` kite creates a TAP.
/// `fd` takes one inherited TAP descriptor per queue pair; without
/// `num_queues`, the count of descriptors sets it. MACs are written
/// `12:34:56:78:9a:bc`. Booleans take on/off or true/false. Ranges and
/// combinations are checked by [`crate::VmConfig::validate`].
pub fn parse_net(value: &str) -> Result<NetConfig, String> {
    const KEYS: &[&str] = &[
        "tap",
        "ip",
        "mask",
        "mac",
        "host_mac",
        "mtu",
        "num_queues",
        "queue_size",
        "id",
        "fd",
        "offload_tso",
        "offload_ufo",
        "offload_csum",
    ];
    let parts = split_bracketed(value)?;
    if let Some((key, feature)) = parts.iter().find_map(|part| {
        let key = part.split_once('=').map_or(*part, |(k, _)| k);
        NET_UNSUPPORTED.iter().find(|(k, _)| *k == key)
    }) {
        return Err(format!("`{key}`: {feature} is not supported by kite yet"));
    }
    let mut net = NetConfig::default();
    let mut num_queues = None;
    for (key, val) in options_of(&parts, KEYS)? {
        match key {
            "tap" if val.is_empty() => return Err("`tap=`: the TAP name is empty".into()),
            "tap" => net.tap = Some(val.to_string()),
            "ip" => net.ip = ipv4(key, val)?,
            "mask" => net.mask = ipv4(key, val)?,
            "mac" => net.mac = Some(mac(key, val)?),
            "host_mac" => net.host_mac = Some(mac(key, val)?),
            "mtu" => net.mtu = Some(number(key, val, "an MTU")?),
            "num_queues" => num_queues = Some(number(key, val, "a queue count")?),
            "queue_size" => net.queue_size = number(key, val, "a queue size")?,
            "id" => net.id = Some(val.to_string()),
            "fd" => net.fds = Some(fd_list(val)?),
            "offload_tso" => net.offload_tso = toggle(key, val)?,
            "offload_ufo" => net.offload_ufo = toggle(key, val)?,
            "offload_csum" => net.offload_csum = toggle(key, val)?,
            _ => unreachable!("options_of() returns only KEYS"),
        }
    }
    net.num_queues = match (num_queues, &net.fds) {
        (Some(n), _) => n,
        // One descriptor per pair; a count that does not fit is refused
        // by validate as a mismatch.
        (None, Some(fds)) => u16::try_from(fds.len() * 2).unwrap_or(u16::MAX),
        (None, None) => net.num_queues,
    };
    Ok(net)
}

/// An IPv4 address for `--net` (IPv6 parses, to be refused by name).
fn ipv4(key: &str, val: &str) -> Result<Ipv4Addr, String> {
    match val.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => Ok(ip),
        Ok(IpAddr::V6(_)) => Err(format!(
            "`{key}={val}`: IPv6 host addresses are not supported by kite yet"
        )),
        Err(_) => Err(format!("`{key}={val}`: expected an IPv4 address")),
    }
}

fn mac(key: &str, val: &str) -> Result<MacAddr, String> {
    val.parse().map_err(|e| format!("`{key}={val}`: {e}"))
}

/// `N` or `[N,N,...]`: file descriptor numbers.
fn fd_list(val: &str) -> Result<Vec<i32>, String> {
    let inner = match val.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')
            .ok_or_else(|| format!("`fd={val}`: missing `]`"))?,
        None => val,
    };
    inner
        .split(',')
        .map(|fd| {
            fd.trim()
                .parse::<i32>()
                .ok()
                .filter(|fd| *fd >= 0)
                .ok_or_else(|| {
                    format!("`fd={val}`: expected a file descriptor number or a list [N,N,...]")
                })
        })
        .collect()
}

/// Splits `k=v,k=[a,b],...` at the commas outside brackets.
fn split_bracketed(value: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in value.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("`{value}`: `]` without `[`"))?
            }
            ',' if depth == 0 => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("`{value}`: `[` without `]`"));
    }
    parts.push(&value[start..]);
    Ok(parts)
}

/// `--rng src=PATH[,id=ID]`; `src` defaults to /dev/urandom.
pub fn parse_rng(value: &str) -> Result<RngConfig, String> {
    let mut rng = RngConfig::default();
    for (key, val) in options(value, &["src", "id"])? {
        match key {
            "src" if val.is_empty() => return Err("`src=`: the path is empty".into()),
            "src" => rng.src = PathBuf::from(val),
            _ => rng.id = Some(val.to_string()),
        }
    }
    Ok(rng)
}

/// `--serial off|null|tty|file=PATH`.
pub fn parse_serial(value: &str) -> Result<ConsoleConfig, String> {
    parse_console_mode(value)
}

/// `--console off|null|tty|file=PATH`, for the virtio-console.
pub fn parse_console(value: &str) -> Result<ConsoleConfig, String> {
    parse_console_mode(value)
}

/// A boolean as Cloud Hypervisor's `Toggle`: on/off or true/false.
fn toggle(key: &str, val: &str) -> Result<bool, String> {
    match val.to_ascii_lowercase().as_str() {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("`{key}={val}`: expected on, off, true or false")),
    }
}

/// A decimal `u16`.
fn number(key: &str, val: &str, what: &str) -> Result<u16, String> {
    val.parse()
        .map_err(|_| format!("`{key}={val}`: expected {what}"))
}

fn parse_console_mode(value: &str) -> Result<ConsoleConfig, String> {
    const EXPECTED: &str = "expected off, null, tty or file=PATH";
    // The whole rest is the path, so paths may contain commas.
    if let Some((key, path)) = value.split_once('=') {
        return match key {
            "file" if !path.is_empty() => Ok(ConsoleConfig {
                mode: ConsoleMode::File,
                file: Some(PathBuf::from(path)),
            }),
            "file" => Err(format!("`{value}`: the file path is empty")),
            "socket" => Err(format!(
                "`{value}`: socket output is not supported by kite yet ({EXPECTED})"
            )),
            _ => Err(format!("unknown option `{key}` ({EXPECTED})")),
        };
    }
    let mode = match value {
        "off" => ConsoleMode::Off,
        "null" => ConsoleMode::Null,
        "tty" => ConsoleMode::Tty,
        "pty" => return Err(format!("`pty` is not supported by kite yet ({EXPECTED})")),
        "file" => return Err(format!("`file` needs a path: file=PATH ({EXPECTED})")),
        "" => return Err(format!("empty value ({EXPECTED})")),
        _ => return Err(format!("unknown mode `{value}` ({EXPECTED})")),
    };
    Ok(ConsoleConfig { mode, file: None })
}

/// Splits `k=v,k=v`, refusing keys outside `keys`, repeated keys and parts
/// without `=`.
fn options<'a>(value: &'a str, keys: &[&'static str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    let parts: Vec<&str> = value.split(',').collect();
    options_of(&parts, keys)
}

/// [`options`] on a value already split into `k=v` parts.
fn options_of<'a>(
    parts: &[&'a str],
    keys: &[&'static str],
) -> Result<Vec<(&'a str, &'a str)>, String> {
    let expected = keys.join(", ");
    if matches!(parts, [""]) {
        return Err(format!("empty value (expected {expected})"));
    }
    let mut seen: Vec<(&str, &str)> = Vec::with_capacity(keys.len());
    for &part in parts {
        let (key, val) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not key=value (expected {expected})"))?;
        if !keys.contains(&key) {
            return Err(format!("unknown key `{key}` (expected {expected})"));
        }
        if seen.iter().any(|(k, _)| *k == key) {
            return Err(format!("`{key}` is given more than once"));
        }
        seen.push((key, val));
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus() {
        let cpus = |boot_vcpus, max_vcpus| CpusConfig {
            boot_vcpus,
            max_vcpus,
        };
        assert_eq!(parse_cpus("boot=2"), Ok(cpus(2, 2)));
        assert_eq!(parse_cpus("boot=2,max=4"), Ok(cpus(2, 4)));
        assert_eq!(parse_cpus("max=4,boot=1"), Ok(cpus(1, 4)));
        assert_eq!(parse_cpus("max=4"), Ok(cpus(1, 4)));
        assert!(parse_cpus("boot=x").unwrap_err().contains("`boot=x`"));
        assert!(parse_cpus("boot=999").unwrap_err().contains("`boot=999`"));
        assert!(parse_cpus("boot=1,foo=2")
            .unwrap_err()
            .contains("unknown key `foo`"));
        assert!(parse_cpus("boot=1,boot=2")
            .unwrap_err()
            .contains("more than once"));
        assert!(parse_cpus("2")
            .unwrap_err()
            .contains("`2` is not key=value"));
        assert!(parse_cpus("").unwrap_err().contains("empty"));
        assert!(parse_cpus("boot=1,")
            .unwrap_err()
            .contains("`` is not key=value"));
    }

    #[test]
    fn memory_and_sizes() {
        assert_eq!(parse_memory("size=512M").unwrap().size, 512 << 20);
        assert_eq!(parse_memory("size=1G").unwrap().size, 1 << 30);
        assert_eq!(parse_memory("size=64K").unwrap().size, 64 << 10);
        assert_eq!(parse_memory("size=1048576").unwrap().size, 1 << 20);
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_memory("size=12T").unwrap_err().contains("`size=12T`"));
        assert!(parse_memory("size=").unwrap_err().contains("is not a size"));
        assert!(parse_memory("size=99999999999G")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_memory("shared=on")
            .unwrap_err()
            .contains("unknown key `shared`"));
        assert!(parse_memory("size=-1M").is_err());
    }

    #[test]
    fn serial_and_console() {
        let mode = |s| parse_serial(s).map(|c| c.mode);
        assert_eq!(mode("off"), Ok(ConsoleMode::Off));
        assert_eq!(mode("null"), Ok(ConsoleMode::Null));
        assert_eq!(mode("tty"), Ok(ConsoleMode::Tty));
        assert_eq!(
            parse_console("file=/tmp/a,b.log"),
            Ok(ConsoleConfig {
                mode: ConsoleMode::File,
                file: Some("/tmp/a,b.log".into())
            })
        );
        assert!(parse_serial("pty")
            .unwrap_err()
            .contains("`pty` is not supported"));
        assert!(parse_serial("socket=/s")
            .unwrap_err()
            .contains("socket output"));
        assert!(parse_serial("file=").unwrap_err().contains("empty"));
        assert!(parse_serial("file").unwrap_err().contains("needs a path"));
        assert!(parse_serial("loud")
            .unwrap_err()
            .contains("unknown mode `loud`"));
        assert!(parse_console("path=/x")
            .unwrap_err()
            .contains("unknown option `path`"));
        assert!(parse_console("").unwrap_err().contains("empty"));
        // The virtio-console takes the same modes as the serial port.
        let console = |s| parse_console(s).map(|c| c.mode);
        assert_eq!(console("tty"), Ok(ConsoleMode::Tty));
        assert_eq!(console("null"), Ok(ConsoleMode::Null));
        assert_eq!(console("off"), Ok(ConsoleMode::Off));
        assert!(parse_console("pty")
            .unwrap_err()
            .contains("`pty` is not supported"));
    }

    #[test]
    fn disk() {
        assert_eq!(
            parse_disk("path=/x.img,readonly=on,direct=off,num_queues=2,queue_size=256,id=disk0,serial=abc"),
            Ok(DiskConfig {
                readonly: true,
                direct: false,
                num_queues: 2,
                queue_size: 256,
                id: Some("disk0".into()),
                serial: Some("abc".into()),
                ..DiskConfig::new("/x.img")
            })
        );
        assert_eq!(parse_disk("path=/x.img"), Ok(DiskConfig::new("/x.img")));
        let disk = parse_disk("readonly=TRUE,direct=true,path=/y,image_type=QCOW2").unwrap();
        assert!(disk.readonly && disk.direct);
        assert_eq!(disk.image_type, Some(ImageType::Qcow2));
        assert_eq!(
            parse_disk("path=/y,image_type=raw").unwrap().image_type,
            Some(ImageType::Raw)
        );
        assert!(!parse_disk("path=/y,readonly=false").unwrap().readonly);
        // Accepted and without effect, as in JSON.
        assert_eq!(
            parse_disk("path=/y,backing_files=on,sparse=on,lock_granularity=full"),
            Ok(DiskConfig::new("/y"))
        );
        // Range checks are validate's; the parser takes any u16.
        assert_eq!(
            parse_disk("path=/y,queue_size=100").unwrap().queue_size,
            100
        );

        let error = |s| parse_disk(s).unwrap_err();
        assert!(error("path=/y,bogus=1").contains("unknown key `bogus`"));
        assert!(error("path=/y,iommu=on").contains("`iommu`: the virtual IOMMU is not supported"));
        assert!(error("path=/y,vhost_user=on,socket=/s").contains("`vhost_user`: vhost-user"));
        assert!(error("path=/y,sparse=off").contains("disabling sparse images"));
        assert!(error("path=/y,readonly=yes")
            .contains("`readonly=yes`: expected on, off, true or false"));
        assert!(error("path=/y,num_queues=x").contains("`num_queues=x`: expected a queue count"));
        assert!(error("path=/y,queue_size=70000").contains("`queue_size=70000`"));
        assert!(error("path=/y,image_type=vhdx").contains("not supported by kite yet"));
        assert!(error("path=/y,image_type=iso").contains("expected raw or qcow2"));
        assert!(error("path=/y,lock_granularity=some").contains("expected byte-range or full"));
        assert!(error("readonly=on").contains("path is required"));
        assert!(error("path=").contains("the path is empty"));
        assert!(error("path=/a,path=/b").contains("more than once"));
        assert!(error("/x.img").contains("`/x.img` is not key=value"));
        assert!(error("").contains("empty"));
    }

    #[test]
    fn rng() {
        assert_eq!(parse_rng("src=/dev/urandom"), Ok(RngConfig::default()));
        assert_eq!(
            parse_rng("src=/dev/hwrng,id=rng0"),
            Ok(RngConfig {
                src: "/dev/hwrng".into(),
                id: Some("rng0".into())
            })
        );
        assert_eq!(
            parse_rng("id=r").unwrap().src,
            PathBuf::from("/dev/urandom")
        );
        assert!(parse_rng("src=").unwrap_err().contains("empty"));
        assert!(parse_rng("source=/dev/random")
            .unwrap_err()
            .contains("unknown key `source`"));
        assert!(parse_rng("/dev/random")
            .unwrap_err()
            .contains("not key=value"));
    }

    #[test]
    fn net() {
        assert_eq!(
            parse_net("id=net0").unwrap(),
            NetConfig {
                id: Some("net0".into()),
                ..NetConfig::default()
            }
        );
        assert_eq!(
            parse_net(
                "tap=tap0,mac=12:34:56:78:9a:bc,host_mac=02:00:00:00:00:01,ip=10.1.2.1,mask=255.255.255.252,mtu=9000,num_queues=4,queue_size=512,id=lan,offload_tso=off,offload_ufo=false,offload_csum=ON"
            ),
            Ok(NetConfig {
                tap: Some("tap0".into()),
                ip: "10.1.2.1".parse().unwrap(),
                mask: "255.255.255.252".parse().unwrap(),
                mac: Some(MacAddr([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc])),
                host_mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
                mtu: Some(9000),
                num_queues: 4,
                queue_size: 512,
                id: Some("lan".into()),
                fds: None,
                offload_tso: false,
                offload_ufo: false,
                offload_csum: true,
            })
        );
        // One descriptor, or a list; the list sets num_queues unless given.
        let net = parse_net("fd=3").unwrap();
        assert_eq!((net.fds, net.num_queues), (Some(vec![3]), 2));
        let net = parse_net("fd=[3,4,5],mac=52:54:00:00:00:01").unwrap();
        assert_eq!((net.fds, net.num_queues), (Some(vec![3, 4, 5]), 6));
        assert_eq!(parse_net("num_queues=2,fd=[3,4]").unwrap().num_queues, 2);
        // Range checks are validate's.
        assert_eq!(parse_net("num_queues=3").unwrap().num_queues, 3);
        assert_eq!(
            parse_net("tap=kite%d").unwrap().tap.as_deref(),
            Some("kite%d")
        );

        let error = |s| parse_net(s).unwrap_err();
        assert!(error("mac=12:34").contains("`mac=12:34`: `12:34` is not a MAC address"));
        assert!(error("host_mac=x").contains("`host_mac=x`"));
        assert!(error("ip=300.1.1.1").contains("`ip=300.1.1.1`: expected an IPv4 address"));
        assert!(error("ip=::1").contains("IPv6 host addresses are not supported"));
        assert!(error("mask=x").contains("`mask=x`"));
        assert!(error("mtu=big").contains("`mtu=big`: expected an MTU"));
        assert!(error("num_queues=-2").contains("`num_queues=-2`"));
        assert!(error("queue_size=70000").contains("`queue_size=70000`"));
        assert!(error("offload_tso=maybe").contains("expected on, off, true or false"));
        assert!(error("fd=x").contains("`fd=x`: expected a file descriptor number"));
        assert!(error("fd=[3,x]").contains("`fd=[3,x]`"));
        assert!(error("fd=-1").contains("`fd=-1`"));
        assert!(error("fd=[3,4").contains("`[` without `]`"));
        assert!(error("fd=3]").contains("`]` without `[`"));
        assert!(error("tap=").contains("the TAP name is empty"));
        assert!(error("vhost_user=on,socket=/s")
            .contains("`vhost_user`: vhost-user is not supported by kite yet"));
        assert!(error("tap=t,iommu=on").contains("`iommu`: the virtual IOMMU"));
        assert!(error("bw_size=10").contains("I/O rate limiting"));
        assert!(error("pci_segment=1").contains("choosing the PCI segment"));
        assert!(error("tap=a,tap=b").contains("more than once"));
        assert!(error("foo=1").contains("unknown key `foo`"));
        assert!(error("tap0").contains("`tap0` is not key=value"));
        assert!(error("").contains("empty"));
    }
}
