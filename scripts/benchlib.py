"""What the guest benchmarks (bench-block/bench.py, bench-net/bench_net.py)
share: an initramfs overlay carrying a host tool into the test guest, samples
of the VMM's per-thread CPU time, and the helpers of their console protocol
and tables."""
import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def arg_parser(modes):
    """The arguments both drivers take from their shell wrappers."""
    ap = argparse.ArgumentParser()
    for name in ("--kite", "--kernel", "--initramfs", "--cmdline", "--work"):
        ap.add_argument(name, required=True)
    ap.add_argument("--ch")
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--modes", default=modes)
    ap.add_argument("--memory", default="1G")
    return ap


def parse_args(ap):
    """Parses the arguments and makes the work and log directories.
    Returns (args, log directory, modes)."""
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    logdir = os.path.join(args.work, "logs")
    os.makedirs(logdir, exist_ok=True)
    return args, logdir, args.modes.split()


# ---------------------------------------------------------------- overlay --
def newc(entries):
    """entries: (name, mode, bytes). Returns a newc cpio archive with trailer."""
    out = bytearray()

    def add(name, mode, data, ino):
        nlink = 2 if mode & 0o040000 else 1
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
        out.extend(hdr.encode() + name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for i, (name, mode, data) in enumerate(entries):
        add(name, mode, data, 5000 + i)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def shared_libraries(binary):
    """The libraries (and loader) `ldd` lists for a host binary."""
    ldd = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    return sorted(set(re.findall(r"(/\S+)\s+\(0x", ldd)))


def overlay_initramfs(base, out, files):
    """Writes `out`: the initramfs `base` followed by an uncompressed cpio of
    `files` (guest path -> host path, each executable) and their directories;
    the kernel unpacks both. Returns the bytes of file data added."""
    dirs = set()
    for path in files:
        d = os.path.dirname(path)
        while d not in ("/", ""):
            dirs.add(d)
            d = os.path.dirname(d)
    entries = [(d.lstrip("/"), 0o040755, b"") for d in sorted(dirs)]
    total = 0
    for path, src in sorted(files.items()):
        with open(os.path.realpath(src), "rb") as f:
            data = f.read()
        total += len(data)
        entries.append((path.lstrip("/"), 0o100755, data))
    with open(base, "rb") as f:
        data = bytearray(f.read())
    data.extend(b"\0" * (-len(data) % 4))
    data.extend(newc(entries))
    with open(out + ".tmp", "wb") as f:
        f.write(data)
    os.replace(out + ".tmp", out)
    return total


# --------------------------------------------------------------------- VM --
def task_sample(pid):
    """tid -> (comm, on-CPU ns, context switches) for every thread of `pid`."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            base = f"/proc/{pid}/task/{tid}"
            with open(f"{base}/comm") as f:
                comm = f.read().strip()
            with open(f"{base}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"{base}/status") as f:
                status = f.read()
            cs = sum(int(v) for v in re.findall(r"ctxt_switches:\s+(\d+)", status))
        except (OSError, ValueError, IndexError):
            continue
        out[tid] = (comm, ns, cs)
    return out


def parse_kv(rest):
    """`k=v ...` of a console line, numbers as floats."""
    kv = {}
    for tok in rest.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            try:
                kv[k] = float(v)
            except ValueError:
                kv[k] = v
    return kv


# ------------------------------------------------------------------ table --
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec, width):
    return f"{v:{width}{spec}}" if v is not None else f"{'-':>{width}}"


# ---------------------------------------------------------------- console --
def run_guest(what, cmd, logpath, errpath, timeout, delta):
    """Runs a VMM command line whose guest speaks the benchmarks' console
    protocol, one line each:
      BENCH-BEGIN <job> / BENCH-END <job>   the VMM's threads are sampled
                                            there; delta(begin, end) -> "cpu"
      BENCH <job> k=v ...                   the job's numbers
      BENCH-FAIL <what>, BENCH-DONE         failures; the guest finished
      BENCH-ENGINE <text>, BENCH-DEV <text> facts for the report
    The console goes to `logpath` (other lines only there), stderr to
    `errpath`; the VMM is killed after `timeout` s. Returns the run: rc,
    wall, jobs, fails, info, threads (on-CPU ns per thread name), the
    process's CPU from wait4, ok; on failure the console's tail is logged."""
    t0 = time.monotonic()
    with open(errpath, "w") as err:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=err, start_new_session=True)
    lock = threading.Lock()
    last = {}  # newest sample of every thread seen, also those that exited
    finished = threading.Event()
    timed_out = threading.Event()

    def sample():
        s = task_sample(p.pid)
        with lock:
            last.update(s)
        return s

    def sampler():
        while not finished.wait(0.1):
            sample()

    def killer():
        if not finished.wait(timeout):
            log(f"{what}: timeout after {timeout} s, killing")
            timed_out.set()
            os.killpg(p.pid, signal.SIGKILL)

    threading.Thread(target=sampler, daemon=True).start()
    threading.Thread(target=killer, daemon=True).start()
    jobs, begins, lines, fails, info = {}, {}, [], [], {}
    with open(logpath, "w") as lf:
        for raw in p.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            lf.write(line + "\n")
            lines.append(line)
            m = re.match(r"(BENCH(?:-BEGIN|-END|-FAIL|-ENGINE|-DEV|-DONE)?)(?: (.*))?$", line)
            if not m:
                continue
            tag, rest = m.group(1), m.group(2) or ""
            if tag in ("BENCH-BEGIN", "BENCH-END"):
                s = sample()
                if tag == "BENCH-BEGIN":
                    begins[rest] = (time.monotonic(), s)
                elif rest in begins:
                    bt, bs = begins[rest]
                    jobs.setdefault(rest, {})["cpu"] = delta(bs, s)
                    jobs[rest]["wall"] = time.monotonic() - bt
            elif tag == "BENCH":
                name, _, kv = rest.partition(" ")
                jobs.setdefault(name, {}).update(parse_kv(kv))
            elif tag == "BENCH-FAIL":
                fails.append(rest)
            elif tag == "BENCH-DONE":
                info["done"] = True
                sample()
            else:
                info[tag[len("BENCH-"):].lower()] = rest
    _, status, ru = os.wait4(p.pid, 0)
    finished.set()
    rc = os.waitstatus_to_exitcode(status)
    threads = {}
    for comm, ns, _ in last.values():
        threads[comm] = threads.get(comm, 0) + ns
    ok = rc == 0 and info.get("done") and not fails and not timed_out.is_set()
    run = {"rc": rc, "wall": time.monotonic() - t0, "jobs": jobs, "fails": fails,
           "info": info, "log": logpath, "ok": bool(ok), "timeout": timed_out.is_set(),
           "cpu_rusage_ns": int((ru.ru_utime + ru.ru_stime) * 1e9), "threads": threads}
    if not ok:
        log(f"{what} FAILED (exit {rc}, done={info.get('done')}, fails={fails}); "
            f"last console lines ({logpath}):")
        for line in lines[-15:]:
            log("    " + line)
        with open(errpath) as f:
            tail = f.read()[-1500:]
        if tail.strip():
            log("  stderr: " + tail.replace("\n", "\n    "))
    return run
