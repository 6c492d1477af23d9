#!/bin/sh
# Block-device benchmark, kite side by side with a reference VMM when one is given:
#   CH_BIN=/path/to/cloud-hypervisor scripts/bench-block.sh
# The Linux test guest (scripts/guest-env.sh; 1 vCPU, 1 GiB) runs busybox dd and
# fio (direct I/O) against /dev/vdb, a fully written 1 GiB raw file on the host;
# fio on the host (io_uring, direct) against the same file is the baseline.
# Each VMM runs once with the data disk on the host page cache (default) and
# once with direct=on; per job it reports IOPS, MB/s and the VMM's CPU time
# per request. Details: scripts/bench-block/bench.py. Exits non-zero if a run fails.
# Settings (environment): RUNTIME (s per fio job, 5), ROUNDS (1), MODES
# ("default direct"), CPUS (1), MEMORY (1G), PHASES ("dd fio"), QD (32),
# BENCH_BLOCK_DIR (build/bench-block: data file, overlay, console logs).
set -eu
. "$(dirname "$0")/guest-env.sh"
cd "$root"
cargo build --release -q
scripts/install-deps.sh fio >&2
set -- --kite "$root/target/release/kite"
if [ -n "${CH_BIN:-}" ]; then set -- "$@" --ch "$CH_BIN"; fi
exec python3 "$root/scripts/bench-block/bench.py" "$@" \
  --kernel "$KITE_GUEST_KERNEL" --initramfs "$KITE_GUEST_INITRAMFS" --cmdline "$KITE_GUEST_CMDLINE" \
  --work "${BENCH_BLOCK_DIR:-$root/build/bench-block}" \
  --runtime "${RUNTIME:-5}" --rounds "${ROUNDS:-1}" --modes "${MODES:-default direct}" \
  --cpus "${CPUS:-1}" --memory "${MEMORY:-1G}" --phases "${PHASES:-dd fio}" --qd "${QD:-32}"
