//! Parsers for Cloud Hypervisor's command-line option syntax, so `kite` takes
//! the same `--cpus`, `--memory`, `--serial` and `--console` values as
//! `cloud-hypervisor`. They fit clap's `value_parser`: each returns the config
//! struct or a message naming the bad part (clap prefixes the flag name).
//! Only syntax is checked here; [`crate::VmConfig::validate`] checks ranges.

use std::path::PathBuf;

use crate::config::{ConsoleConfig, ConsoleMode, CpusConfig, MemoryConfig, DEFAULT_MEMORY_SIZE};

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

/// `--serial off|null|tty|file=PATH`.
pub fn parse_serial(value: &str) -> Result<ConsoleConfig, String> {
    parse_console_mode(value)
}

/// `--console off|null|tty|file=PATH`. The syntax is Cloud Hypervisor's;
/// validation refuses the modes that need virtio-console until kite has it.
pub fn parse_console(value: &str) -> Result<ConsoleConfig, String> {
    parse_console_mode(value)
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
    let expected = keys.join(", ");
    if value.is_empty() {
        return Err(format!("empty value (expected {expected})"));
    }
    let mut seen: Vec<(&str, &str)> = Vec::with_capacity(keys.len());
    for part in value.split(',') {
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
    }
}
