#!/bin/sh
# kite's benchmarks, side by side with a reference VMM when one is given:
#   CH_BIN=/path/to/cloud-hypervisor scripts/bench.sh
# Uses the shared harness in ../shared/bench (lifecycle, API latency) and
# scripts/boot_time.py (whole-process boot times). Results go to stdout.
set -eu
. "$(dirname "$0")/guest-env.sh"
cd "$root"
bench="$root/../shared/bench"
runs=${RUNS:-10}
cargo build --release -q
guests="$root/build/bench-guests"
mkdir -p "$guests"
sh "$bench/guests/build.sh" "$guests"

kite="$root/target/release/kite"
set -- "kite=$kite"
if [ -n "${CH_BIN:-}" ]; then set -- "$@" "cloud-hypervisor=$CH_BIN"; fi

echo "# machine: $(nproc) CPUs, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
for vmm in "$@"; do
  name=${vmm%%=*}; bin=${vmm#*=}
  echo "## $name: lifecycle (idle.elf, 512 MiB, 20 rounds; microseconds, medians)"
  python3 "$bench/lifecycle.py" --vmm "$bin --api-socket path={sock}" --kernel "$guests/idle.elf" --rounds 20
  echo "## $name: API latency (vmm.ping, 2000 requests)"
  tmp=$(mktemp -d)
  "$bin" --api-socket "path=$tmp/api.sock" >/dev/null 2>&1 &
  pid=$!
  while [ ! -S "$tmp/api.sock" ]; do sleep 0.01; done
  python3 "$bench/api_latency.py" "$tmp/api.sock" --n 2000
  kill $pid; wait $pid 2>/dev/null || true; rm -rf "$tmp"
done

echo "## whole process: boot poweroff.elf to exit ($runs runs each, alternating)"
python3 scripts/boot_time.py --runs "$runs" --marker READY \
  --args "--kernel $guests/poweroff.elf --memory size=512M --serial tty --console off" "$@"
echo "## whole process: Linux (vmlinux, 1 vCPU, 512 MiB, '$KITE_GUEST_CMDLINE') to KITE-GUEST-UP and to exit"
python3 scripts/boot_time.py --runs "$runs" --marker KITE-GUEST-UP \
  --args "--kernel $KITE_GUEST_KERNEL --initramfs $KITE_GUEST_INITRAMFS --cmdline '$KITE_GUEST_CMDLINE' --cpus boot=1 --memory size=512M --serial tty --console off" "$@"
echo "## block devices: fio and busybox dd in the guest vs the host (scripts/bench-block.sh)"; scripts/bench-block.sh
echo "## network: iperf3 and busybox nc in the guest vs a veth pair (scripts/bench-net.sh)"; scripts/bench-net.sh
