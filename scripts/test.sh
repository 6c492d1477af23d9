#!/bin/sh
# Runs every check and test: formatting, clippy, unit and integration tests
# (the integration tests boot real guests on /dev/kvm).
set -eu
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
