"""What the guest benchmarks (bench-block/bench.py, bench-net/bench_net.py)
share: an initramfs overlay carrying a host tool into the test guest, samples
of the VMM's per-thread CPU time, and the helpers of their console protocol
and tables."""
import os
import re
import statistics
import subprocess
import sys


def log(*a):
    print(*a, file=sys.stderr, flush=True)


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
