#!/usr/bin/env python3
"""Times whole VMM processes: from start to a marker on the guest's serial
output (the VMM's stdout) and to process exit. Several commands are run in
turn, round by round, so a drifting machine affects them alike.

Usage: boot_time.py --runs N --marker TEXT --args 'VMM ARGS' NAME=BINARY [NAME=BINARY ...]
Prints, per command, min/median/max of both times in milliseconds; exits 1 if
a run misses the marker or exits non-zero.
"""
import argparse, shlex, statistics, subprocess, sys, time


def one(cmd, marker, timeout):
    t0 = time.perf_counter()
    p = subprocess.Popen(shlex.split(cmd), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = None
    buf = b""
    while True:
        chunk = p.stdout.read1(65536)
        if not chunk:
            break
        buf += chunk
        if seen is None and marker in buf:
            seen = time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            p.kill()
            break
    rc = p.wait()
    return seen, time.perf_counter() - t0, rc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--marker", required=True)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--args", required=True, help="arguments for every VMM (shell quoting)")
    ap.add_argument("vmms", nargs="+", help="NAME=BINARY")
    a = ap.parse_args()
    cmds = [(name, f"{shlex.quote(binary)} {a.args}") for name, binary in (v.split("=", 1) for v in a.vmms)]
    res = {name: ([], []) for name, _ in cmds}
    ok = True
    for _ in range(a.runs):
        for name, cmd in cmds:
            seen, total, rc = one(cmd, a.marker.encode(), a.timeout)
            if seen is None or rc != 0:
                print(f"{name}: run failed (marker seen: {seen is not None}, exit {rc})", file=sys.stderr)
                ok = False
                continue
            res[name][0].append(seen * 1e3)
            res[name][1].append(total * 1e3)
    for name, (marks, totals) in res.items():
        if marks:
            f = lambda v: f"{min(v):.1f}/{statistics.median(v):.1f}/{max(v):.1f}"
            print(f"{name}: to {a.marker} ms min/median/max {f(marks)}; to exit {f(totals)} (runs={len(marks)})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
