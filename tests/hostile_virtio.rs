//! A hostile virtio-blk driver: `tests/guests/virtio_hostile.c` (see its
//! header for every case) finds kite's virtio-blk function on the PCI bus,
//! sets it up by itself and sends malformed requests: descriptor loops,
//! buffers outside guest RAM, wrong directions and lengths, sectors beyond
//! the disk, unknown types, bad indirect tables, a runaway available index,
//! bad queue setups and BAR moves. It reports each completion on the serial
//! port; this file checks the VMM's answers and the disk image afterwards.
//!
//! The VMM must stay up (the guest powers off by itself, kite exits 0), answer
//! its API throughout, give each request the right status (or none, where
//! the request has no usable status byte), and write nothing to the disk
//! except the guest's valid writes: sector 1 ("KITE-GOOD-WRITE") and
//! sector 2 ("KITE-FINAL-WRITE"); every other byte keeps the fill byte.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Generous: CI machines may be loaded (a run takes about 5 s here).
const T: Duration = Duration::from_secs(90);
const SECTOR: usize = 512;
const DISK_SIZE: usize = 1 << 20;
const FILL: u8 = 0x5a;
/// virtio_hostile.c puts buffers just below the end of a 128 MiB RAM.
const MEM_MIB: u64 = 128;

const GOOD_TAG: &str = "KITE-GOOD-WRITE";
const FINAL_TAG: &str = "KITE-FINAL-WRITE";
/// What case b-loop-self asks to write to sector 4 with a looping chain.
const LOOP_TAG: &str = "KITE-LOOP-WRITE";
const LOOP_SECTOR: usize = 4;
/// Far below the guest's 3000 repeated offences (see log flood, m-overlap).
const MAX_WARNINGS: usize = 200;

/// How a request ended, as the guest saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// In the used ring: the status byte (255: never written) and used length.
    Done { status: u8, len: u32 },
    /// Not in the used ring within the guest's spin (~1 s).
    NoCompletion,
}

/// What the VMM may answer to one request.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// Status OK with this used length.
    Ok(u32),
    /// Status IOERR, used length 1 (no data written to the guest).
    IoErr,
    /// Status UNSUPP, used length 1.
    Unsupp,
    /// No usable status byte: the request is returned with used length 0 and
    /// the status untouched, or not returned at all.
    NoStatus,
    /// IOERR or no status: a malformed request.
    Rejected,
    /// OK (a zero-length transfer) or IOERR.
    OkOrIoErr,
    /// Nothing may come back (nothing valid was made available, or the
    /// device is not active).
    NoCompletion,
    /// Anything but a crash (a protocol violation with no defined answer).
    Any,
}

impl Want {
    fn accepts(self, got: Outcome) -> bool {
        use Outcome::*;
        // Returned without the status byte written (it is preset to 255).
        const UNTOUCHED: Outcome = Done {
            status: 255,
            len: 0,
        };
        let no_status = got == NoCompletion || got == UNTOUCHED;
        let ioerr = got == Done { status: 1, len: 1 };
        match self {
            Want::Ok(len) => got == Done { status: 0, len },
            Want::IoErr => ioerr,
            Want::Unsupp => got == Done { status: 2, len: 1 },
            Want::NoStatus => no_status,
            Want::Rejected => ioerr || no_status,
            Want::OkOrIoErr => ioerr || got == Done { status: 0, len: 1 },
            Want::NoCompletion => got == NoCompletion,
            Want::Any => true,
        }
    }
}

/// Every request the guest sends, in order, and the acceptable answers.
const EXPECTED: &[(&str, Want)] = &[
    // a: valid requests.
    ("a-write", Want::Ok(1)),
    ("a-read", Want::Ok(513)),
    ("a-getid", Want::Ok(21)),
    ("a-flush", Want::Ok(1)),
    ("a-read-last", Want::Ok(513)),
    // b: descriptor loops (b-loop-self is in LOOPED).
    ("b-loop", Want::NoStatus),
    ("b-loop-status", Want::Rejected),
    ("b-next-oob", Want::NoStatus),
    // c: buffers outside guest RAM.
    ("c-out-hole", Want::IoErr),
    ("c-out-high", Want::IoErr),
    ("c-out-wrap", Want::IoErr),
    ("c-out-edge", Want::IoErr),
    ("c-in-bar", Want::IoErr),
    ("c-in-hole", Want::IoErr),
    ("c-hdr-hole", Want::IoErr),
    ("c-status-hole", Want::NoStatus),
    // d: wrong directions.
    ("d-status-readable", Want::NoStatus),
    ("d-in-data-readable", Want::OkOrIoErr),
    ("d-out-data-writable", Want::OkOrIoErr),
    ("d-hdr-writable", Want::IoErr),
    // e: wrong lengths.
    ("e-hdr-8", Want::IoErr),
    ("e-hdr-8-only", Want::IoErr),
    ("e-out-100", Want::IoErr),
    ("e-in-100", Want::IoErr),
    ("e-out-max", Want::Rejected),
    ("e-in-max", Want::Rejected),
    ("e-out-2g", Want::IoErr),
    ("e-out-0", Want::OkOrIoErr),
    // f: sectors outside the disk.
    ("f-write-cap", Want::IoErr),
    ("f-write-straddle", Want::IoErr),
    ("f-write-ovf", Want::IoErr),
    ("f-write-ovf2", Want::IoErr),
    ("f-read-cap", Want::IoErr),
    ("f-read-ovf", Want::IoErr),
    // g: request types (discard / write-zeroes not negotiated).
    ("g-type-55", Want::Unsupp),
    ("g-type-ffffffff", Want::Unsupp),
    ("g-write-zeroes", Want::Unsupp),
    ("g-discard", Want::Unsupp),
    // h: indirect descriptors, INDIRECT_DESC not negotiated.
    ("h-ind-hole", Want::NoStatus),
    ("h-ind-len40", Want::NoStatus),
    ("h-ind-unneg-valid", Want::Any),
    // i: available ring abuse; the queue must keep working.
    ("i-avail-jump", Want::NoCompletion),
    ("i-after-jump", Want::Ok(513)),
    ("i-head-oob", Want::NoStatus),
    ("i-after-oob", Want::Ok(513)),
    // h2: indirect descriptors, negotiated (h2-ind-loop is in LOOPED).
    ("h2-ind-hole", Want::NoStatus),
    ("h2-ind-len40", Want::NoStatus),
    ("h2-ind-valid", Want::Ok(513)),
    ("h2-ind-len0", Want::NoStatus),
    ("h2-ind-huge", Want::NoStatus),
    ("h2-ind-nested", Want::NoStatus),
    ("h2-ind-data-hole", Want::IoErr),
    // k: requests to a device that did not activate.
    ("k-inactive", Want::NoCompletion),
    ("k-no-features-ok", Want::NoCompletion),
    // j: after a reset, valid again.
    ("j-write", Want::Ok(1)),
    ("j-read", Want::Ok(513)),
    ("j-read-good", Want::Ok(513)),
    // l: queue registers written while running are ignored.
    ("l-frozen", Want::Ok(513)),
    // m: the BAR moved around with decoding on.
    ("m-move", Want::Ok(513)),
    ("m-overlap", Want::Ok(513)),
    ("m-restored", Want::Ok(513)),
];

/// Chains that never end: b-loop-self (header, data, then a status
/// descriptor whose NEXT is itself: an OUT of "KITE-LOOP-WRITE" to sector 4)
/// and h2-ind-loop (an indirect table whose last entry points back to the
/// first). A driver must not make them (virtio 1.x: "loops in the descriptor
/// chain are forbidden"); a device should reject them rather than run the
/// part it walked before giving up. Checked strictly by
/// `looped_descriptor_chains_are_rejected`; the other tests only require the
/// VMM to survive them.
const LOOPED: &[&str] = &["b-loop-self", "h2-ind-loop"];

/// Guest-side buffer checks that must all print OK.
const CHECKS: &[&str] = &[
    "a-read",
    "a-read-last",
    "c-in-bar",
    "d-in-data-readable",
    "d-out-data-writable",
    "e-in-100",
    "f-read-cap",
    "f-read-ovf",
    "i-after-jump",
    "i-after-oob",
    "h2-ind-valid",
    "j-read",
    "j-read-good",
    "l-frozen",
    "m-move",
    "m-overlap-refused",
    "m-overlap",
    "m-sizing",
    "m-restored",
];

/// Progress lines the guest must print.
const PROGRESS: &[&str] = &[
    "kite-guest: ring 3 (CPL 3, IOPL 3)",
    "VIRTIO-HOSTILE start",
    "VIRTIO-BLK slot ",
    "CAPACITY 0x800",
    "FLOOD done",
    "PHASE a",
    "PHASE b",
    "PHASE c",
    "PHASE d",
    "PHASE e",
    "PHASE f",
    "PHASE g",
    "PHASE h",
    "PHASE i",
    "PHASE h2",
    "PHASE k",
    "RESET status=0x0",
    "PHASE j",
    // Queue 0 as set up, whatever was written while DRIVER_OK was set.
    "L queue0 desc=0x200000 size=16 enable=1 bogus-queue-size=0",
    "PHASE l",
    "PHASE m",
    "HOSTILE-DONE",
];

/// The guest's report, parsed.
struct Report {
    text: String,
    requests: BTreeMap<String, Vec<Outcome>>,
    /// SETUP name -> device status after it (None: FEATURES_OK refused).
    setups: BTreeMap<String, (Option<u8>, u8)>,
    checks: BTreeMap<String, Vec<bool>>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn hex(s: &str) -> u8 {
    u8::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

fn parse(text: &str) -> Report {
    let mut r = Report {
        text: text.to_string(),
        requests: BTreeMap::new(),
        setups: BTreeMap::new(),
        checks: BTreeMap::new(),
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["REQ", name, ..] => {
                let status = field(line, "status").unwrap().parse().unwrap();
                let len = field(line, "len").unwrap().parse().unwrap();
                let id = field(line, "id");
                assert!(id.is_none(), "used id is not the head submitted: {line}");
                r.requests
                    .entry(name.to_string())
                    .or_default()
                    .push(Outcome::Done { status, len });
            }
            ["NO-COMPLETION", name] => r
                .requests
                .entry(name.to_string())
                .or_default()
                .push(Outcome::NoCompletion),
            ["SETUP", name, "features-refused", status] => {
                let s = hex(status.strip_prefix("status=").unwrap());
                r.setups.insert(name.to_string(), (None, s));
            }
            ["SETUP", name, ..] => {
                let s = hex(field(line, "status").unwrap());
                r.setups.insert(name.to_string(), (Some(s), s));
            }
            ["CHECK", name, verdict] => r
                .checks
                .entry(name.to_string())
                .or_default()
                .push(*verdict == "OK"),
            _ => {}
        }
    }
    r
}

impl Report {
    fn outcome(&self, name: &str) -> Outcome {
        let got = self.requests.get(name).map(Vec::as_slice).unwrap_or(&[]);
        assert_eq!(
            got.len(),
            1,
            "request {name} reported {} times:\n{}",
            got.len(),
            self.text
        );
        got[0]
    }

    /// Everything but the looped chains.
    fn check(&self) {
        for line in PROGRESS {
            assert!(
                self.text.contains(line),
                "no {line:?} in the guest's output:\n{}",
                self.text
            );
        }
        let mut wrong = Vec::new();
        for (name, want) in EXPECTED {
            let got = self.outcome(name);
            if !want.accepts(got) {
                wrong.push(format!("{name}: wanted {want:?}, got {got:?}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "wrong answers:\n  {}\nguest output:\n{}",
            wrong.join("\n  "),
            self.text
        );
        for name in LOOPED {
            self.outcome(name);
        }
        // Completions the guest found only after giving up on a request:
        // the device returned something late or that was never submitted.
        assert!(
            !self.text.contains("RESYNC"),
            "late or unexpected completions:\n{}",
            self.text
        );
        for name in self.requests.keys() {
            assert!(
                EXPECTED.iter().any(|(n, _)| n == name) || LOOPED.contains(&name.as_str()),
                "request {name} is not known to this test"
            );
        }
        for name in CHECKS {
            assert_eq!(
                self.checks.get(*name).map(Vec::as_slice),
                Some(&[true][..]),
                "CHECK {name}:\n{}",
                self.text
            );
        }
        assert!(
            self.checks.values().flatten().all(|ok| *ok),
            "a CHECK failed:\n{}",
            self.text
        );
        self.check_setups();
    }

    fn check_setups(&self) {
        let setup = |name: &str| {
            *self
                .setups
                .get(name)
                .unwrap_or_else(|| panic!("no SETUP {name}:\n{}", self.text))
        };
        // Good setups: ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK.
        for name in ["main", "indirect", "final"] {
            assert_eq!(setup(name), (Some(0x0f), 0x0f), "SETUP {name}");
        }
        // Bad queues: DRIVER_OK must not bring the device up.
        for name in [
            "k-qsize-7",
            "k-qsize-8000",
            "k-qsize-0",
            "k-desc-hole",
            "k-used-edge",
        ] {
            let (_, status) = setup(name);
            assert!(
                status & 0x40 != 0 || status & 0x04 == 0,
                "SETUP {name}: status {status:#x}: neither DEVICE_NEEDS_RESET nor DRIVER_OK refused"
            );
        }
        // Bad features: FEATURES_OK must not stick.
        for name in ["k-no-version1", "k-unknown-feature"] {
            assert_eq!(
                setup(name).0,
                None,
                "SETUP {name}: FEATURES_OK accepted:\n{}",
                self.text
            );
        }
        setup("k-no-features-ok");
    }
}

fn tagged_sector(tag: &str) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR];
    s[..tag.len()].copy_from_slice(tag.as_bytes());
    s
}

fn make_disk(dir: &TempDir) -> PathBuf {
    let path = dir.path("disk.raw");
    fs::write(&path, vec![FILL; DISK_SIZE]).unwrap();
    path
}

/// The disk holds the two valid writes and the fill byte everywhere else;
/// sector 4 may hold the looped chain's write if `allow_loop_write`.
#[track_caller]
fn check_disk(path: &Path, allow_loop_write: bool) {
    let disk = fs::read(path).unwrap();
    assert_eq!(disk.len(), DISK_SIZE, "the disk image changed size");
    let blank = vec![FILL; SECTOR];
    let mut wrong = Vec::new();
    for (i, sector) in disk.chunks(SECTOR).enumerate() {
        let ok = match i {
            1 => sector == tagged_sector(GOOD_TAG),
            2 => sector == tagged_sector(FINAL_TAG),
            LOOP_SECTOR if allow_loop_write => sector == blank || sector == tagged_sector(LOOP_TAG),
            _ => sector == blank,
        };
        if !ok {
            let start = String::from_utf8_lossy(&sector[..32]).to_string();
            wrong.push(format!("sector {i} starts {start:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "the disk image holds unexpected data:\n  {}",
        wrong.join("\n  ")
    );
}

/// Runs the guest with `kite --kernel ... --disk ...`; returns the parsed
/// report, stderr and the disk's path (in `dir`).
fn run_cli(dir: &TempDir) -> (Report, String, PathBuf) {
    let disk = make_disk(dir);
    let kernel = test_guest("virtio_hostile");
    let disk_arg = format!("path={}", disk.display());
    let memory = format!("size={MEM_MIB}M");
    let start = Instant::now();
    let out = run_kite(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--disk",
            &disk_arg,
            "--serial",
            "tty",
            "--memory",
            &memory,
        ],
        T,
    );
    let so = String::from_utf8_lossy(&out.stdout).to_string();
    let se = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.signal().is_none(),
        "kite hung and was killed after {T:?}; stdout:\n{so}\nstderr:\n{se}"
    );
    assert!(
        out.status.success(),
        "kite exited with {}; stdout:\n{so}\nstderr:\n{se}",
        out.status
    );
    assert!(!se.contains("panicked"), "kite panicked:\n{se}");
    eprintln!("virtio_hostile: {:?}", start.elapsed());
    (parse(&so), se, disk)
}

#[test]
fn hostile_virtio_blk_via_cli() {
    let dir = TempDir::new("hostile-virtio");
    let (report, stderr, disk) = run_cli(&dir);
    report.check();
    check_disk(&disk, true);
    // The guest repeats three things a device warns about 1000 times each
    // (FAILED, refused features, a refused BAR move): the log must not
    // grow with them.
    let warnings = stderr.lines().filter(|l| l.contains(" WARN ")).count();
    assert!(
        warnings < MAX_WARNINGS,
        "{warnings} warnings logged; a guest can flood the host's log:\n{}",
        stderr.lines().take(40).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn looped_descriptor_chains_are_rejected() {
    let dir = TempDir::new("hostile-virtio-loop");
    let (report, _, disk) = run_cli(&dir);
    let wrong: Vec<String> = LOOPED
        .iter()
        .map(|name| (name, report.outcome(name)))
        .filter(|(_, got)| !Want::Rejected.accepts(*got))
        .map(|(name, got)| format!("{name}: wanted IOERR or no status, got {got:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "looped chains run:\n  {}",
        wrong.join("\n  ")
    );
    check_disk(&disk, false);
}

/// GETs `endpoint`, which must answer 200 with JSON.
#[track_caller]
fn get_json(kite: &Kite, endpoint: &str) -> Value {
    let (code, body) = kite.api("GET", endpoint, None);
    assert_eq!(code, 200, "GET {endpoint}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {endpoint}: {e}: {body}"))
}

#[test]
fn hostile_virtio_blk_via_api() {
    let mut kite = Kite::start_api(&[]);
    let disk = make_disk(&kite.dir);
    let serial = kite.dir.path("serial.log");
    let config = vm_config(&test_guest("virtio_hostile"), None, "", 1, MEM_MIB, &serial);
    let mut config: Value = serde_json::from_str(&config).unwrap();
    config["disks"] = serde_json::json!([{ "path": disk, "id": "hostile" }]);
    kite.put_ok("vm.create", Some(&config.to_string()));
    kite.put_ok("vm.boot", None);

    // The API answers while the guest attacks the device.
    let start = Instant::now();
    let mut polls = 0;
    let mut slowest = Duration::ZERO;
    let mut counters = Value::Null;
    loop {
        let t = Instant::now();
        let (code, body) = kite.api("GET", "vmm.ping", None);
        assert_eq!(code, 200, "vmm.ping: {body}");
        let info = get_json(&kite, "vm.info");
        let state = info["state"].as_str().unwrap_or_default().to_string();
        let c = get_json(&kite, "vm.counters");
        if c.get("hostile").is_some() {
            counters = c;
        }
        slowest = slowest.max(t.elapsed());
        polls += 1;
        if state == "Shutdown" {
            break;
        }
        assert_eq!(state, "Running", "vm.info: {info}");
        assert!(
            start.elapsed() < T,
            "the guest did not finish within {T:?}; serial:\n{}\nlog:\n{}",
            fs::read_to_string(&serial).unwrap_or_default(),
            kite.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        slowest < Duration::from_secs(2),
        "an API round took {slowest:?}"
    );

    // Powered off by the guest: Shutdown, and the VMM still serves.
    let text = fs::read_to_string(&serial).unwrap();
    assert!(
        text.contains("HOSTILE-DONE"),
        "the VM stopped before the guest finished; serial:\n{text}\nlog:\n{}",
        kite.log()
    );
    kite.wait_state("Shutdown", T);
    let (code, body) = kite.api("GET", "vmm.ping", None);
    assert_eq!(code, 200, "vmm.ping after shutdown: {body}");
    let info = get_json(&kite, "vm.info");
    assert_eq!(info["state"], "Shutdown", "{info}");
    get_json(&kite, "vm.counters");

    let report = parse(&text);
    report.check();
    check_disk(&disk, true);

    // The disk's counters as last seen while it ran (they go with the VM):
    // errors were counted, and no more data was written than the valid
    // writes (and the looped chain's sector) carry.
    let c = &counters["hostile"];
    let count = |name: &str| {
        c[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in {counters}"))
    };
    assert!(count("errors") > 0, "counters: {counters}");
    assert!(
        count("write_bytes") <= 3 * SECTOR as u64,
        "counters: {counters}"
    );

    let log = kite.log();
    assert!(!log.contains("panicked"), "kite panicked:\n{log}");
    let (code, body) = kite.api("PUT", "vmm.shutdown", None);
    assert_eq!(code, 204, "vmm.shutdown: {body}");
    let status = kite.wait_exit(T).expect("kite did not exit");
    assert!(status.success(), "kite exited with {status}");
    eprintln!("virtio_hostile via API: {polls} API rounds, slowest {slowest:?}");
}
