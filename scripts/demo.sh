#!/bin/sh
# Boots the Linux guest through kite's REST API, the way an orchestrator
# would: vm.create, vm.boot, the guest's serial output, vm.info, and the end.
set -eu
. "$(dirname "$0")/guest-env.sh"
kite="$root/target/release/kite"
tmp=$(mktemp -d)
sock="$tmp/kite.sock"
serial="$tmp/serial.log"
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT

api() { # METHOD ENDPOINT [JSON]
  if [ $# -gt 2 ]; then
    curl -sS --fail-with-body --unix-socket "$sock" -X "$1" "http://localhost/api/v1/$2" \
      -H 'Content-Type: application/json' -d "$3"
  else
    curl -sS --fail-with-body --unix-socket "$sock" -X "$1" "http://localhost/api/v1/$2"
  fi
}
wait_serial() { # NEEDLE
  i=0
  until grep -q "$1" "$serial" 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 3000 ] || { echo "timed out waiting for $1" >&2; exit 1; }
    sleep 0.01
  done
}

"$kite" --api-socket "$sock" &
pid=$!
while [ ! -S "$sock" ]; do sleep 0.01; done
echo "== kite $(api GET vmm.ping)"
config=$(cat <<JSON
{"payload": {"kernel": "$KITE_GUEST_KERNEL", "initramfs": "$KITE_GUEST_INITRAMFS",
             "cmdline": "$KITE_GUEST_CMDLINE"},
 "cpus": {"boot_vcpus": 2, "max_vcpus": 2}, "memory": {"size": 536870912},
 "serial": {"mode": "File", "file": "$serial"}, "console": {"mode": "Off"}}
JSON
)
echo "== PUT vm.create"; api PUT vm.create "$config"
echo "== PUT vm.boot"; api PUT vm.boot
wait_serial KITE-GUEST-UP
echo "== GET vm.info: $(api GET vm.info | head -c 300)..."
wait_serial KITE-GUEST-DONE
echo "== guest serial output:"; grep KITE- "$serial"
# The guest powers itself off (ACPI S5) after KITE-GUEST-DONE.
i=0; until api GET vm.info | grep -q '"state":"Shutdown"'; do i=$((i+1)); [ $i -lt 500 ] || exit 1; sleep 0.01; done
echo "== GET vm.info: state Shutdown"
echo "== PUT vm.delete"; api PUT vm.delete
echo "== PUT vmm.shutdown"; api PUT vmm.shutdown
wait $pid
echo "== kite exited with status $?"
