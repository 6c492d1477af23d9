#!/bin/sh
# Network benchmark, kite side by side with a reference VMM when one is given:
#   CH_BIN=/path/to/cloud-hypervisor scripts/bench-net.sh
# The Linux test guest (scripts/guest-env.sh) runs iperf3 (copied from the
# host into an initramfs overlay) against one-off iperf3 servers in a network
# namespace of the run's own, where the VMM runs and creates its TAP: guest to
# host and host to guest, single queue (1 vCPU, 1 stream) and multiqueue
# (2 vCPUs, num_queues=4, 2 streams), in Gbit/s, with the VMM's CPU time per
# GB; then busybox nc, 8 MiB each way (the reference's method). The physical
# limit beside it: the same iperf3 over a veth pair between two namespaces.
# Needs root (namespaces, TAPs). Details: scripts/bench-net/bench_net.py.
# Exits non-zero if a run fails.
# Settings (environment): RUNTIME (s per iperf3 direction, 5), ROUNDS (1),
# MODES ("1q 2q"), MEMORY (1G), NC_MIB (8; 0 skips nc),
# BENCH_NET_DIR (build/bench-net: overlay, console logs, iperf3 JSON).
set -eu
. "$(dirname "$0")/guest-env.sh"
cd "$root"
cargo build --release -q
scripts/install-deps.sh iperf3 >&2
set -- --kite "$root/target/release/kite"
if [ -n "${CH_BIN:-}" ]; then set -- "$@" --ch "$CH_BIN"; fi
exec python3 "$root/scripts/bench-net/bench_net.py" "$@" \
  --kernel "$KITE_GUEST_KERNEL" --initramfs "$KITE_GUEST_INITRAMFS" --cmdline "$KITE_GUEST_CMDLINE" \
  --work "${BENCH_NET_DIR:-$root/build/bench-net}" \
  --runtime "${RUNTIME:-5}" --rounds "${ROUNDS:-1}" --modes "${MODES:-1q 2q}" \
  --memory "${MEMORY:-1G}" --nc-mib "${NC_MIB:-8}"
