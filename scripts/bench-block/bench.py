#!/usr/bin/env python3
"""Block-device benchmark, run by scripts/bench-block.sh (see there for the settings).

1. Host baseline: fio (io_uring, direct=1) on a fully written 1 GiB raw file.
2. The test guest (kite.exec=vda) runs guest.sh: busybox dd (the reference's
   method) and fio (direct=1; libaio if the guest kernel has AIO, else psync
   with N threads for queue depth N) against /dev/vdb = that raw file.
3. While each VMM runs, its threads' CPU time (/proc/PID/task/*/schedstat,
   on-CPU ns) is sampled every 100 ms and at each job's BEGIN/END console
   marker; the total comes from wait4()'s rusage. Per job: VMM CPU us per
   request, split into the data disk's device threads, vCPU threads (they also
   carry the guest's own CPU time) and the rest.
4. kite and Cloud Hypervisor alternate, for each data-disk mode (host page
   cache, direct=on); a table compares them with the host.
Exits 1 if any run or job failed.
"""
import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from benchlib import (  # noqa: E402
    arg_parser, fmt, log, med, overlay_initramfs, parse_args, run_guest, shared_libraries)

DISK_ID = "bdata"  # id of the data disk: kite names its threads blk<q>-bdata, CH bdata_q<q>
# (name, fio rw, block size KiB, queue depth)
FIO_JOBS = [(f"{n}-{bs}k-qd{{qd}}", rw, bs) for n, rw, bs in [
    ("randread", "randread", 4), ("randwrite", "randwrite", 4),
    ("read", "read", 128), ("write", "write", 128)]]
DD_JOBS = ["dd-read-128k", "dd-write-128k", "dd-read-4k"]
# Cloud Hypervisor v53, this guest, busybox dd, direct I/O, raw file, on a dev machine (the issue).
DD_REFERENCE_MBS = {"dd-read-128k": (180, 215), "dd-write-128k": (275, 335), "dd-read-4k": (9, 15)}
DD_REFERENCE_IOPS = {"dd-read-4k": (2300, 3800)}


def fio_jobs(qd_high):
    out = []
    for name, rw, bs in FIO_JOBS:
        for qd in (1, qd_high):
            out.append((name.format(qd=qd), rw, bs, qd))
    return out


# ---------------------------------------------------------------- overlay --
def build_initramfs(base, work):
    """Stock initramfs + an uncompressed overlay with fio, its libraries, the loader and the shim."""
    fio = shutil.which("fio")
    if not fio:
        raise SystemExit("bench-block: fio is not installed on the host")
    shim = os.path.join(work, "fio-shm.so")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", shim,
                    os.path.join(HERE, "fio-shm.c")], check=True)
    libs = shared_libraries(fio)
    files = {"/usr/bin/fio": fio, "/usr/lib/fio-shm.so": shim}
    files.update((lib, lib) for lib in libs)
    out = os.path.join(work, "initrd-fio.cpio")
    total = overlay_initramfs(base, out, files)
    ver = subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip()
    return out, ver, len(libs), total


def make_data_file(path, mib):
    """A fully written (not sparse, no unwritten extents) raw file."""
    try:
        st = os.stat(path)
        if st.st_size == mib << 20 and st.st_blocks * 512 >= st.st_size:
            return
    except FileNotFoundError:
        pass
    log(f"bench-block: writing {mib} MiB data file {path}")
    subprocess.run(["dd", "if=/dev/zero", f"of={path}.tmp", "bs=1M", f"count={mib}",
                    "oflag=direct", "conv=fsync", "status=none"], check=True)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------- host --
def host_fio(data, jobs, runtime, mib):
    engine = "io_uring"
    probe = subprocess.run(["fio", "--name=probe", f"--filename={data}", "--rw=read", "--bs=4k",
                            "--direct=1", "--ioengine=io_uring", "--size=64k",
                            "--output-format=json"], capture_output=True, text=True)
    if probe.returncode != 0:
        log("bench-block: host io_uring failed, using libaio:", probe.stderr.strip()[:200])
        engine = "libaio"
    res = {}
    for name, rw, bs, qd in jobs:
        r = subprocess.run(["fio", f"--name={name}", f"--filename={data}", f"--size={mib}m",
                            f"--rw={rw}", f"--bs={bs}k", f"--ioengine={engine}", f"--iodepth={qd}",
                            "--direct=1", f"--runtime={runtime}", "--time_based",
                            "--output-format=json"], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"bench-block: host fio {name} failed: {r.stderr.strip()[:300]}")
            continue
        j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
        res[name] = {"iops": j["read"]["iops"] + j["write"]["iops"],
                     "bw_kib": j["read"]["bw"] + j["write"]["bw"],
                     "ios": j["read"]["total_ios"] + j["write"]["total_ios"]}
        log(f"bench-block: host {name}: {res[name]['iops']:.0f} IOPS")
    return engine, res


# --------------------------------------------------------------------- VM --
def thread_class(comm):
    if re.fullmatch(r"(kite-)?vcpu\d+", comm):
        return "vcpu"
    # io_uring workers (iou-wrk-<owner tid>) do the device threads' blocking I/O;
    # the only other disk (the script) is idle while jobs run.
    if DISK_ID in comm or comm.startswith(("iou-wrk-", "iou-sqp-")):
        return "dev"
    return "other"


def delta(a, b):
    """Per-class on-CPU ns between samples a and b (threads born in between count from 0)."""
    out = {"vcpu": 0, "dev": 0, "other": 0}
    for tid, (comm, ns, _) in b.items():
        out[thread_class(comm)] += ns - a.get(tid, (comm, 0, 0))[1]
    return out


def settle_data_file(path):
    """Same start for every run: the file clean (written back) and whole in the host page cache."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fdatasync(fd)
        while os.read(fd, 8 << 20):
            pass
    finally:
        os.close(fd)


def run_vm(vmm, binary, mode, args, initrd, script_img, data, timeout, logdir):
    settle_data_file(data)
    disk = f"path={data},image_type=raw,id={DISK_ID}"
    if mode == "direct":
        disk += ",direct=on"
    cmd = [binary, "--kernel", args.kernel, "--initramfs", initrd,
           "--cmdline", args.cmdline + " kite.exec=vda", "--cpus", f"boot={args.cpus}",
           "--memory", f"size={args.memory}", "--disk", f"path={script_img}",
           "--disk", disk, "--serial", "tty", "--console", "off"]
    logpath = os.path.join(logdir, f"{vmm}-{mode}.log")
    errpath = os.path.join(logdir, f"{vmm}-{mode}.stderr")
    run = run_guest(f"bench-block: {vmm} {mode}", cmd, logpath, errpath, timeout, delta)
    run.update(vmm=vmm, mode=mode)
    return run


# ------------------------------------------------------------------ table --
def mbs(bw_kib):
    return None if bw_kib is None else bw_kib * 1024 / 1e6


def job_stats(runs, job):
    """Median over rounds of one job's numbers."""
    js = [r["jobs"].get(job, {}) for r in runs]
    js = [j for j in js if "iops" in j]
    if not js:
        return None
    st = {"iops": med([j["iops"] for j in js]), "bw_kib": med([j["bw_kib"] for j in js]),
          "engine": js[0].get("engine", "?")}
    for cls in ("vcpu", "dev", "other"):
        st[cls] = med([j["cpu"][cls] / 1000 / j["ios"] for j in js if "cpu" in j and j["ios"]])
    st["all"] = med([sum(j["cpu"].values()) / 1000 / j["ios"] for j in js if "cpu" in j and j["ios"]])
    return st


def main():
    ap = arg_parser(modes="default direct")
    ap.add_argument("--cpus", default="1")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--dd-4k-count", type=int, default=32768)
    ap.add_argument("--phases", default="dd fio")
    args, logdir, modes = parse_args(ap)
    jobs = fio_jobs(args.qd)

    initrd, fio_ver, nlibs, nbytes = build_initramfs(args.initramfs, args.work)
    log(f"bench-block: overlay: {fio_ver} + {nlibs} shared libraries ({nbytes >> 20} MiB)")
    data = os.path.join(args.work, "data.raw")
    make_data_file(data, args.size_mib)
    script = "".join([
        f"RT={args.runtime}\nPHASES='{args.phases}'\nQD_HIGH={args.qd}\n",
        f"DD_SEQ_COUNT={args.size_mib * 8}\nDD_4K_COUNT={args.dd_4k_count}\n",
        open(os.path.join(HERE, "guest.sh")).read()])
    script_img = os.path.join(args.work, "script.img")
    with open(script_img, "wb") as f:
        f.write(script.encode())
        f.truncate(64 << 10)
    assert len(script) < 64 << 10

    vmms = [("kite", args.kite)] + ([("ch", args.ch)] if args.ch else [])
    print(f"# machine: {os.cpu_count()} CPUs, {os.uname().release},"
          f"{open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].split(chr(10))[0]}")
    print(f"# guest: {os.path.basename(args.kernel)}, {args.cpus} vCPU, {args.memory} memory, "
          f"cmdline '{args.cmdline} kite.exec=vda'; {fio_ver} in an initramfs overlay")
    print(f"# data disk: {args.size_mib} MiB raw file {data} (fully written), "
          f"--disk path=...,image_type=raw,id={DISK_ID}[,direct=on]; fio {args.runtime} s per job, "
          f"{args.rounds} round(s), VMMs alternating")
    sys.stdout.flush()

    failed = False
    log("bench-block: host fio baseline")
    # + sequential 4 KiB QD1, the host counterpart of busybox dd's 4 KiB reads
    host_jobs = jobs + [("read-4k-qd1", "read", 4, 1)]
    host_engine, host = host_fio(data, host_jobs, args.runtime, args.size_mib)
    if len(host) != len(host_jobs):
        failed = True
    runs = []
    n_jobs = (len(jobs) if "fio" in args.phases else 0) + (3 if "dd" in args.phases else 0)
    timeout = n_jobs * (args.runtime + 15) + 120
    for rnd in range(args.rounds):
        for mode in modes:
            for vmm, binary in vmms:
                log(f"bench-block: round {rnd + 1}/{args.rounds}: {vmm}, data disk {mode}")
                r = run_vm(vmm, binary, mode, args, initrd, script_img, data, timeout, logdir)
                failed |= not r["ok"]
                runs.append(r)

    engines = sorted({r["info"].get("engine", "?") for r in runs})
    guest_engine = ",".join(engines)
    print()
    print(f"# guest fio engine: {guest_engine}"
          + (f" (guest kernel has no AIO: qd{args.qd} = {args.qd} threads doing synchronous "
             f"O_DIRECT pread/pwrite, --thread --group_reporting)" if "psync" in engines else ""))
    print(f"# host baseline: fio {host_engine}, direct=1, iodepth 1/{args.qd}, one job, same file")
    print("# MB/s = 10^6 bytes/s. us/req = VMM process on-CPU time (schedstat) during the job / "
          "requests the guest completed;")
    print("#   all = every VMM thread, dev = the data disk's device threads (+ io_uring workers), "
          "vcpu = vCPU threads (include the guest's own CPU time)")
    print("# before each run the data file is written back and read whole into the host page cache")
    for mode in modes:
        mruns = {v: [r for r in runs if r["vmm"] == v and r["mode"] == mode] for v, _ in vmms}
        cache = "direct=on (host O_DIRECT)" if mode == "direct" else "default (host page cache)"
        for title, names in (("fio", [j[0] for j in jobs]), ("busybox dd", DD_JOBS)):
            if not any(n in r["jobs"] for rs in mruns.values() for r in rs for n in names):
                continue
            print()
            print(f"## {title}, data disk {cache}")
            if title != "fio":
                print(f"#  (host columns: fio {host_engine} sequential QD1 reads/writes of the same block size)")
            hdr = (f"{'job':<17}{'kite IOPS':>10}{'MB/s':>8}{'CH IOPS':>10}{'MB/s':>8}"
                   f"{'host IOPS':>10}{'MB/s':>8}{'kite/host':>10}{'kite/CH':>8}"
                   f" | kite us/req: all   dev  vcpu | CH us/req: all   dev  vcpu")
            print(hdr)
            for name in names:
                k = job_stats(mruns["kite"], name)
                c = job_stats(mruns.get("ch", []), name)
                h = host.get(name)
                if name.startswith("dd-"):
                    h = host.get({"dd-read-128k": "read-128k-qd1", "dd-write-128k": "write-128k-qd1",
                                  "dd-read-4k": "read-4k-qd1"}.get(name))
                row = f"{name:<17}"
                for s in (k, c, h):
                    row += fmt(s and s["iops"], ".0f", 10) + fmt(s and mbs(s["bw_kib"]), ".1f", 8)
                row += fmt(k and h and k["iops"] / h["iops"], ".2f", 10)
                row += fmt(k and c and k["iops"] / c["iops"], ".2f", 8)
                for s in (k, c):
                    row += " | " + " " * 8 + fmt(s and s["all"], ".1f", 7) + fmt(s and s["dev"], ".1f", 6) \
                        + fmt(s and s["vcpu"], ".1f", 6)
                print(row)

    # whole runs: VMM CPU (rusage) / all requests of the run
    print()
    print("## whole runs (boot to exit): VMM CPU from wait4 rusage / all requests the guest completed")
    print(f"{'run':<16}{'ok':>4}{'wall s':>8}{'CPU s':>8}{'requests':>10}{'us/req':>8}"
          f"{'dev us/req':>11}  threads (on-CPU ms)")
    for r in runs:
        ios = sum(j.get("ios", 0) for j in r["jobs"].values())
        dev_ns = sum(ns for comm, ns in r["threads"].items() if thread_class(comm) == "dev")
        thr = ", ".join(f"{c}={ns / 1e6:.0f}" for c, ns in
                        sorted(r["threads"].items(), key=lambda x: -x[1])[:6])
        print(f"{r['vmm'] + ' ' + r['mode']:<16}{'yes' if r['ok'] else 'NO':>4}{r['wall']:8.1f}"
              f"{r['cpu_rusage_ns'] / 1e9:8.2f}{ios:10.0f}"
              f"{(r['cpu_rusage_ns'] / 1000 / ios) if ios else float('nan'):8.1f}"
              f"{(dev_ns / 1000 / ios) if ios else float('nan'):11.1f}  {thr}")

    # goals from the issue
    print()
    print("## goals (kite)")
    for mode in modes:
        kr = [r for r in runs if r["vmm"] == "kite" and r["mode"] == mode]
        cr = [r for r in runs if r["vmm"] == "ch" and r["mode"] == mode]
        for name in DD_JOBS:
            k, c = job_stats(kr, name), job_stats(cr, name)
            if not k:
                continue
            lo, hi = DD_REFERENCE_MBS[name]
            v = mbs(k["bw_kib"])
            verdict = "beats" if v > hi else ("within" if v >= lo else "BELOW")
            extra = ""
            if name in DD_REFERENCE_IOPS:
                extra = f" ({k['iops']:.0f} IOPS vs {DD_REFERENCE_IOPS[name][0]}-{DD_REFERENCE_IOPS[name][1]})"
            ch = f"; CH here {mbs(c['bw_kib']):.1f} MB/s" if c else ""
            print(f"{mode:<8} {name:<14} {v:8.1f} MB/s{extra} vs reference {lo}-{hi} MB/s: "
                  f"{verdict} reference range{ch}")
        k = job_stats(kr, f"randread-4k-qd{args.qd}")
        h = host.get(f"randread-4k-qd{args.qd}")
        if k and h:
            ratio = k["iops"] / h["iops"]
            print(f"{mode:<8} randread-4k-qd{args.qd} {k['iops']:.0f} IOPS = {ratio * 100:.0f} % of host "
                  f"{host_engine} {h['iops']:.0f} IOPS: {'met' if ratio >= 0.8 else 'NOT met'} (goal 80 %)")
    print(f"# console logs: {logdir}")
    if failed:
        print("# FAILED: see the messages above (stderr)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
