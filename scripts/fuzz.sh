#!/bin/sh
# Builds kite's fuzz targets (fuzz/, a cargo-fuzz project) and runs each for
# SECONDS (default 30). Exits non-zero if a target fails to build or the
# fuzzer finds a crash, a panic, a timeout or a memory blow-up; the input
# that did it is kept in fuzz/artifacts/<target>/ (replay it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>` in fuzz/, adding
# KITE_FUZZ_VERBOSE=1 to see what it does).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# cargo-fuzz needs nightly -Z flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them. Environment:
#   FUZZ_SANITIZER  address (default) or none (faster, finds only panics)
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (10)
#   FUZZ_JOBS       parallel fuzzing processes per target (1; more uses
#                   libFuzzer's -fork mode)
#
# Each target's corpus is fuzz/corpus/<target>/ (untracked; it grows from run
# to run), topped up with the tracked seeds in fuzz/seeds/<target>/.
set -eu
seconds=${1:-30}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/../fuzz"

case $seconds in
  ''|*[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-address}
timeout=${FUZZ_TIMEOUT:-10}
jobs=${FUZZ_JOBS:-1}
fork=""
if [ "$jobs" -gt 1 ]; then fork="-fork=$jobs"; fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked || cargo install cargo-fuzz
fi

if [ $# -gt 0 ]; then
  targets=$*
else
  targets=$(cargo fuzz list)
fi

cargo fuzz build --sanitizer "$sanitizer"

# qcow2_image rewrites its image file every iteration: keep it on tmpfs when
# there is one (several times faster than a disk), in a directory of its own
# that is removed afterwards.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
  scratch=$(mktemp -d /dev/shm/kite-fuzz.XXXXXX)
else
  mkdir -p target
  scratch=$(mktemp -d "$PWD/target/kite-fuzz.XXXXXX")
fi
trap 'rm -rf "$scratch"' EXIT INT TERM

failed=""
for t in $targets; do
  corpus="corpus/$t"
  mkdir -p "$corpus" "artifacts/$t"
  if [ -d "seeds/$t" ]; then
    cp -n "seeds/$t"/* "$corpus"/ 2>/dev/null || true
  fi
  echo "=== $t: ${seconds}s" >&2
  log="$scratch/$t.log"
  set +e
  TMPDIR="$scratch" cargo fuzz run --sanitizer "$sanitizer" "$t" "$corpus" -- \
    -max_total_time="$seconds" -timeout="$timeout" -print_final_stats=1 $fork \
    >"$log" 2>&1
  rc=$?
  set -e
  grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added|stat::peak_rss_mb)' "$log" >&2 || true
  if [ $rc -ne 0 ]; then
    # The fuzzer's report, from the panic or sanitizer message on; the
    # whole log is kept next to the crashing input.
    cp "$log" "artifacts/$t/fuzz.log"
    awk '/panicked at|==ERROR|ERROR: libFuzzer|deadly signal/ { on = 1 } on && n++ < 80' "$log" >&2
    echo "=== $t: FAILED (exit $rc); input and log in fuzz/artifacts/$t/" >&2
    failed="$failed $t"
  else
    echo "=== $t: ok ($(ls "$corpus" | wc -l) inputs in the corpus)" >&2
  fi
done

if [ -n "$failed" ]; then
  echo "fuzz.sh: failing targets:$failed" >&2
  exit 1
fi
echo "fuzz.sh: all targets ran ${seconds}s without a crash" >&2
