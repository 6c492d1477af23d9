#!/usr/bin/env python3
"""Network benchmark, run by scripts/bench-net.sh (see there for the settings).

1. Every VM run gets a network namespace of its own (deleted afterwards); the
   VMM runs in it with `ip netns exec` and creates the TAP there (host side
   10.201.1.1/24, guest 10.201.1.2). One-off iperf3 servers (JSON logs) and a
   small Python server for busybox nc listen in the namespace.
2. The test guest (kite.exec=vda, iperf3 from the host in an initramfs
   overlay) runs guest.sh: iperf3 guest->host, iperf3 -R host->guest (T s
   each, PARALLEL streams), then busybox nc NC_MIB MiB each way (the
   reference's method, timed in the guest).
3. "1q" runs: 1 vCPU, one queue pair, 1 stream. "2q" runs: 2 vCPUs,
   num_queues=4 (two pairs), iperf3 -P 2.
4. While a job runs, the VMM's threads' CPU time (/proc/PID/task/*/schedstat)
   and context switches are sampled at its BEGIN/END console markers: CPU
   seconds per GB (10^9 bytes of TCP payload), split into the net device's
   threads, vCPU threads (they carry the guest's own CPU time too) and the
   rest. The guest reports its eth0 interrupts and packet counts per job.
5. kite and Cloud Hypervisor alternate; the physical limit beside them is
   the same iperf3 over a veth pair between two namespaces.
Exits 1 if any run or job failed.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from benchlib import (  # noqa: E402
    arg_parser, fmt, log, med, overlay_initramfs, parse_args, run_guest, shared_libraries)
NET_ID = "bnet"  # id of the NIC: kite names its threads net<q>-bnet, CH bnet_qp<q>
HOST_IP, GUEST_IP, PREFIX = "10.201.1.1", "10.201.1.2", 24
PORTS = {"IPERF_TX_PORT": 5201, "IPERF_RX_PORT": 5202, "NC_SINK_PORT": 6001,
         "NC_SOURCE_PORT": 6002}
# Cloud Hypervisor v53, this guest, busybox nc, 8 MiB (the issue): seconds.
NC_REFERENCE_S = {"nc-tx": 4.0, "nc-rx": 2.0}
JOBS = ["iperf-tx", "iperf-rx", "nc-tx", "nc-rx"]
JOB_TITLES = {"iperf-tx": "guest->host", "iperf-rx": "host->guest",
              "nc-tx": "guest->host", "nc-rx": "host->guest"}


# ---------------------------------------------------------------- overlay --
def build_initramfs(base, work):
    """Stock initramfs + an uncompressed overlay with iperf3, its libraries and the loader."""
    iperf = shutil.which("iperf3")
    if not iperf:
        raise SystemExit("bench-net: iperf3 is not installed on the host")
    libs = shared_libraries(iperf)
    files = {"/usr/bin/iperf3": iperf}
    files.update((lib, lib) for lib in libs)
    out = os.path.join(work, "initrd-iperf3.cpio")
    total = overlay_initramfs(base, out, files)
    ver = subprocess.run([iperf, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return out, ver.strip(), len(libs), total


# ------------------------------------------------------------- namespaces --
class Netns:
    n = 0

    def __init__(self):
        Netns.n += 1
        self.name = f"kite-bench-{os.getpid()}-{Netns.n}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run(["ip", "link", "set", "lo", "up"])

    def cmd(self, argv):
        return ["ip", "netns", "exec", self.name] + list(argv)

    def run(self, argv, **kw):
        return subprocess.run(self.cmd(argv), check=True, **kw)

    def popen(self, argv, **kw):
        return subprocess.Popen(self.cmd(argv), **kw)

    def delete(self):
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL)


def kill(p):
    if p.poll() is None:
        p.kill()
    p.wait()


NC_HELPER = r"""
import os, socket, sys, threading
mib, sink_port, source_port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(1); s.settimeout(600)
    return s
def sink(l):
    c, _ = l.accept(); n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        n += len(b)
    print("sink", n, flush=True)
def source(l):
    c, _ = l.accept(); c.sendall(os.urandom(mib << 20)); c.close()
    print("source", mib << 20, flush=True)
ts = [threading.Thread(target=sink, args=(listener(sink_port),)),
      threading.Thread(target=source, args=(listener(source_port),))]
for t in ts: t.start()
for t in ts: t.join()
"""


# ------------------------------------------------------------------- VM --
def thread_class(comm):
    if re.fullmatch(r"(kite-)?vcpu\d+", comm):
        return "vcpu"
    if NET_ID in comm:
        return "net"
    return "other"


def delta(a, b):
    """Per-class on-CPU ns between samples a and b, and the net threads' context switches."""
    out = {"vcpu": 0, "net": 0, "other": 0, "net_cs": 0}
    for tid, (comm, ns, cs) in b.items():
        old = a.get(tid, (comm, 0, 0))
        cls = thread_class(comm)
        out[cls] += ns - old[1]
        if cls == "net":
            out["net_cs"] += cs - old[2]
    return out


def iperf_result(path, reverse):
    """Bytes, seconds and bit/s of TCP payload from an iperf3 server's JSON log."""
    try:
        with open(path) as f:
            j = json.loads(f.read())
        end = j["end"]
        s = end["sum_sent"] if reverse else end["sum_received"]
        # In reverse mode the server sends; the client's received total came
        # back in the exchange of results when present.
        if reverse and end.get("sum_received", {}).get("bytes"):
            s = end["sum_received"]
        return {"bytes": s["bytes"], "secs": s["seconds"], "bps": s["bits_per_second"]}
    except (OSError, ValueError, KeyError) as e:
        log(f"bench-net: no iperf3 result in {path}: {e}")
        return None


def run_vm(vmm, binary, mode, args, initrd, script_img, logdir, timeout):
    cpus, queues = (1, 2) if mode == "1q" else (2, 4)
    ns = Netns()
    tag = f"{vmm}-{mode}"
    servers = []
    try:
        for name, port, rev in (("tx", PORTS["IPERF_TX_PORT"], False),
                                ("rx", PORTS["IPERF_RX_PORT"], True)):
            path = os.path.join(logdir, f"{tag}-iperf-{name}.json")
            if os.path.exists(path):
                os.unlink(path)
            servers.append((name, path, rev, ns.popen(
                ["iperf3", "-s", "-1", "-p", str(port), "-J", "--logfile", path],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        nc = ns.popen([sys.executable, "-c", NC_HELPER, str(args.nc_mib),
                       str(PORTS["NC_SINK_PORT"]), str(PORTS["NC_SOURCE_PORT"])],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(0.3)
        net = (f"tap=kt0,ip={HOST_IP},mask=255.255.255.0,num_queues={queues},id={NET_ID}")
        cmd = ns.cmd([binary, "--kernel", args.kernel, "--initramfs", initrd,
                      "--cmdline", args.cmdline + " kite.exec=vda", "--cpus", f"boot={cpus}",
                      "--memory", f"size={args.memory}", "--disk", f"path={script_img},readonly=on",
                      "--net", net, "--serial", "tty", "--console", "off"])
        run = console_run(vmm, mode, cmd, logdir, tag, timeout)
        for name, path, rev, p in servers:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill(p)
            res = iperf_result(path, rev)
            job = run["jobs"].setdefault(f"iperf-{name}", {})
            if res:
                job.update(res)
            elif run["ok"]:
                run["ok"] = False
        try:
            nc_out, _ = nc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            kill(nc)
            nc_out = ""
        for line in nc_out.split("\n"):
            parts = line.split()
            if len(parts) == 2:
                job = run["jobs"].setdefault("nc-tx" if parts[0] == "sink" else "nc-rx", {})
                job["bytes"] = int(parts[1])
        return run
    finally:
        for *_, p in servers:
            kill(p)
        ns.delete()


def console_run(vmm, mode, cmd, logdir, tag, timeout):
    # `ip netns exec` execs the VMM: the process run_guest starts is the VMM.
    logpath = os.path.join(logdir, f"{tag}.log")
    errpath = os.path.join(logdir, f"{tag}.stderr")
    run = run_guest(f"bench-net: {tag}", cmd, logpath, errpath, timeout, delta)
    run.update(vmm=vmm, mode=mode)
    return run


# ------------------------------------------------------------------ veth --
def veth_iperf(runtime, parallel, reverse):
    """iperf3 over a veth pair between two fresh namespaces: bit/s of payload."""
    a, b = Netns(), Netns()
    srv = None
    try:
        subprocess.run(["ip", "link", "add", "kbva", "netns", a.name, "type", "veth",
                        "peer", "name", "kbvb", "netns", b.name], check=True)
        a.run(["ip", "addr", "add", "10.201.9.1/24", "dev", "kbva"])
        b.run(["ip", "addr", "add", "10.201.9.2/24", "dev", "kbvb"])
        a.run(["ip", "link", "set", "kbva", "up"])
        b.run(["ip", "link", "set", "kbvb", "up"])
        srv = b.popen(["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        argv = ["iperf3", "-c", "10.201.9.2", "-p", "5201", "-t", str(runtime), "-P",
                str(parallel), "-J"] + (["-R"] if reverse else [])
        out = a.run(argv, capture_output=True, text=True, timeout=runtime + 30).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"]
    except (subprocess.SubprocessError, ValueError, KeyError) as e:
        log(f"bench-net: veth iperf3 (-P {parallel}{' -R' if reverse else ''}) failed: {e}")
        return None
    finally:
        if srv:
            kill(srv)
        a.delete()
        b.delete()


# ------------------------------------------------------------------ table --
def job_stats(runs, job):
    """Median over rounds of one job's numbers."""
    js = [r["jobs"].get(job, {}) for r in runs]
    js = [j for j in js if j.get("bytes") and "cpu" in j]
    if not js:
        return None

    def per_gb(j, key):
        return j["cpu"][key] / 1e9 / (j["bytes"] / 1e9)

    st = {
        "gbps": med([j.get("bps", j["bytes"] * 8 / j["secs"]) / 1e9 if j.get("secs") else None
                     for j in js]),
        "secs": med([j.get("secs") for j in js]),
        "all": med([sum(j["cpu"][k] for k in ("vcpu", "net", "other")) / 1e9 / (j["bytes"] / 1e9)
                    for j in js]),
        "net": med([per_gb(j, "net") for j in js]),
        "vcpu": med([per_gb(j, "vcpu") for j in js]),
        "irq_in_mb": med([j.get("irq_in", 0) / (j["bytes"] / 1e6) for j in js]),
        "irq_out_mb": med([j.get("irq_out", 0) / (j["bytes"] / 1e6) for j in js]),
        "cs_mb": med([j["cpu"]["net_cs"] / (j["bytes"] / 1e6) for j in js]),
    }
    # Average frame the guest sent/received in the data direction.
    key = "tx" if job.endswith("-tx") else "rx"
    st["frame"] = med([j[f"{key}_bytes"] / j[f"{key}_pkts"] for j in js
                       if j.get(f"{key}_pkts")])
    return st


def main():
    ap = arg_parser(modes="1q 2q")
    ap.add_argument("--nc-mib", type=int, default=8)
    args, logdir, modes = parse_args(ap)

    initrd, iperf_ver, nlibs, nbytes = build_initramfs(args.initramfs, args.work)
    log(f"bench-net: overlay: {iperf_ver} + {nlibs} shared libraries ({nbytes >> 10} KiB)")
    vmms = [("kite", args.kite)] + ([("ch", args.ch)] if args.ch else [])
    script_imgs = {}
    for mode in modes:
        settings = dict(PORTS, HOST_IP=HOST_IP, GUEST_IP=GUEST_IP, PREFIX=PREFIX, T=args.runtime,
                        PARALLEL=1 if mode == "1q" else 2,
                        NC_MIB=args.nc_mib if mode == "1q" else 0)
        script = "".join(f"{k}={v}\n" for k, v in settings.items())
        with open(os.path.join(HERE, "guest.sh")) as f:
            script += f.read()
        assert len(script) < 64 << 10
        path = os.path.join(args.work, f"script-{mode}.img")
        with open(path, "wb") as f:
            f.write(script.encode())
            f.truncate(64 << 10)
        script_imgs[mode] = path

    print(f"# machine: {os.cpu_count()} CPUs, {os.uname().release},"
          f"{open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].split(chr(10))[0]}")
    print(f"# guest: {os.path.basename(args.kernel)}, {args.memory}, cmdline '{args.cmdline} "
          f"kite.exec=vda'; {iperf_ver} in an initramfs overlay; host side in a network namespace")
    print(f"# 1q: 1 vCPU, --net ...,num_queues=2, iperf3 1 stream; 2q: 2 vCPUs, num_queues=4, "
          f"iperf3 -P 2; iperf3 {args.runtime} s per direction; {args.rounds} round(s), VMMs alternating")

    failed = False
    runs = []
    timeout = 2 * args.runtime + 4 * args.nc_mib + 120
    for rnd in range(args.rounds):
        for mode in modes:
            for vmm, binary in vmms:
                log(f"bench-net: round {rnd + 1}/{args.rounds}: {vmm} {mode}")
                r = run_vm(vmm, binary, mode, args, initrd, script_imgs[mode], logdir, timeout)
                failed |= not r["ok"]
                runs.append(r)

    log("bench-net: veth baseline")
    veth = {}
    for mode in modes:
        p = 1 if mode == "1q" else 2
        for job, rev in (("iperf-tx", False), ("iperf-rx", True)):
            veth[(mode, job)] = veth_iperf(args.runtime, p, rev)

    print()
    print("## iperf3: Gbit/s (10^9 bit/s of TCP payload, as iperf3's server counts it); "
          "VMM CPU s per GB (10^9 bytes of payload)")
    print("#   CPU all = every VMM thread (schedstat, between the job's console markers); "
          "net = the NIC's queue threads; vcpu = vCPU threads (include the guest's own CPU)")
    print("#   veth = the same iperf3 between two namespaces over a veth pair (no VM)")
    hdr = (f"{'job':<17}{'kite':>7}{'CH':>7}{'veth':>7}{'kite/CH':>8}"
           f" | kite CPU s/GB: all   net  vcpu | CH CPU s/GB: all   net  vcpu")
    print(hdr)
    for mode in modes:
        for job in ("iperf-tx", "iperf-rx"):
            mr = {v: [r for r in runs if r["vmm"] == v and r["mode"] == mode] for v, _ in vmms}
            k, c = job_stats(mr["kite"], job), job_stats(mr.get("ch", []), job)
            vb = veth.get((mode, job))
            row = f"{mode + ' ' + JOB_TITLES[job]:<17}"
            row += fmt(k and k["gbps"], ".2f", 7) + fmt(c and c["gbps"], ".2f", 7)
            row += fmt(vb and vb / 1e9, ".2f", 7)
            row += fmt(k and c and k["gbps"] / c["gbps"], ".2f", 8)
            for s in (k, c):
                row += " | " + " " * 11 + fmt(s and s["all"], ".2f", 7) + fmt(s and s["net"], ".2f", 6) \
                    + fmt(s and s["vcpu"], ".2f", 6)
            print(row)

    print()
    print("## per MB of payload: guest interrupts on eth0 (input/output queues), context switches of "
          "the NIC's VMM threads; average frame in the data direction (guest's eth0 counters, bytes)")
    print(f"{'job':<17} | kite: irq in  out   cs/MB  frame | CH: irq in  out   cs/MB  frame")
    for mode in modes:
        for job in ("iperf-tx", "iperf-rx"):
            mr = {v: [r for r in runs if r["vmm"] == v and r["mode"] == mode] for v, _ in vmms}
            row = f"{mode + ' ' + JOB_TITLES[job]:<17}"
            for v in ("kite", "ch"):
                s = job_stats(mr.get(v, []), job)
                row += " | " + " " * (7 if v == "kite" else 5) + fmt(s and s["irq_in_mb"], ".1f", 6) \
                    + fmt(s and s["irq_out_mb"], ".1f", 5) + fmt(s and s["cs_mb"], ".1f", 8) \
                    + fmt(s and s["frame"], ".0f", 7)
            print(row)

    if args.nc_mib and "1q" in modes:
        print()
        print(f"## busybox nc, {args.nc_mib} MiB, 1 vCPU (the reference: Cloud Hypervisor v53 on a dev "
              f"machine, 8 MiB: ~4 s guest->host, ~2 s host->guest); seconds timed in the guest")
        print(f"{'job':<17}{'kite s':>8}{'MB/s':>8}{'CH s':>8}{'MB/s':>8}{'ref s':>7}"
              f" | kite CPU s/GB: all   net  vcpu | CH CPU s/GB: all   net  vcpu")
        for job in ("nc-tx", "nc-rx"):
            mr = {v: [r for r in runs if r["vmm"] == v and r["mode"] == "1q"] for v, _ in vmms}
            row = f"{'nc ' + JOB_TITLES[job]:<17}"
            stats = [job_stats(mr.get(v, []), job) for v in ("kite", "ch")]
            for s in stats:
                secs = s and s["secs"]
                row += fmt(secs, ".2f", 8) + fmt(secs and args.nc_mib * 1.048576 / secs, ".1f", 8)
            row += fmt(NC_REFERENCE_S[job], ".1f", 7)
            for s in stats:
                row += " | " + " " * 11 + fmt(s and s["all"], ".2f", 7) + fmt(s and s["net"], ".2f", 6) \
                    + fmt(s and s["vcpu"], ".2f", 6)
            print(row)

    print()
    print("## whole runs (boot to exit): VMM CPU from wait4 rusage")
    print(f"{'run':<10}{'ok':>4}{'wall s':>8}{'CPU s':>8}  threads (on-CPU ms)")
    for r in runs:
        thr = ", ".join(f"{c}={ns / 1e6:.0f}" for c, ns in
                        sorted(r["threads"].items(), key=lambda x: -x[1])[:6])
        print(f"{r['vmm'] + ' ' + r['mode']:<10}{'yes' if r['ok'] else 'NO':>4}{r['wall']:8.1f}"
              f"{r['cpu_rusage_ns'] / 1e9:8.2f}  {thr}")
    print(f"# console logs and iperf3 server JSON: {logdir}")
    if failed:
        print("# FAILED: see the messages above (stderr)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
