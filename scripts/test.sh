#!/bin/sh
# Runs every check and test: formatting, clippy, unit and integration tests
# (the integration tests boot real guests on /dev/kvm).
set -eu
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
# Fuzz the guest-facing parsers briefly (qcow2 header and image, virtio-blk
# queue processing); FUZZ_SECONDS=0 skips it.
if [ "${FUZZ_SECONDS:-20}" != 0 ]; then
  scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
fi
