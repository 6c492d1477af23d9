#!/bin/sh
# One command on a fresh machine: install what kite needs, build it, and boot
# the Linux guest through the REST API.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
cd "$root" && cargo build --release
"$root/scripts/demo.sh"
