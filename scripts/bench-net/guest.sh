# Guest side of scripts/bench-net.sh, run by the test guest's /init
# (kite.exec=vda) from the script disk. bench_net.py prepends the settings:
#   HOST_IP, GUEST_IP, PREFIX (netmask bits), T (s per iperf3 run),
#   PARALLEL (iperf3 -P), NC_MIB (busybox nc transfer size, 0: skip),
#   IPERF_TX_PORT, IPERF_RX_PORT, NC_SINK_PORT, NC_SOURCE_PORT.
# Prints on the console, per job:
#   BENCH-BEGIN <job>  /  BENCH-END <job>   (the host samples the VMM's CPU there)
#   BENCH <job> rc=<rc> secs=<s> irq_in=<n> irq_out=<n> rx_pkts=<n> tx_pkts=<n>
#     rx_bytes=<n> tx_bytes=<n>   (guest-side deltas over the job)
#   BENCH-FAIL <job> ...  on a failure; BENCH-DONE at the end.
B=/bin/busybox
IPERF=/usr/bin/iperf3
$B ip addr add $GUEST_IP/$PREFIX dev eth0 && $B ip link set eth0 up || echo "BENCH-FAIL setup ip"
$B ping -c 1 -W 5 $HOST_IP >/dev/null 2>&1 || echo "BENCH-FAIL setup ping $HOST_IP"
dev=$($B basename $($B readlink /sys/class/net/eth0/device))
echo "BENCH-DEV $dev queues=$($B ls /sys/class/net/eth0/queues | $B tr '\n' ' ')mtu=$($B cat /sys/class/net/eth0/mtu)"

# Sum of eth0's MSI-X interrupt counts over all CPUs, for queues named $1
# (input or output).
irqs() {
  $B awk -v pat="^$dev-$1" '$NF ~ pat { for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) s += $i; else break } END { print s + 0 }' /proc/interrupts
}
st() { $B cat /sys/class/net/eth0/statistics/$1; }
snap() { echo "$(irqs input) $(irqs output) $(st rx_packets) $(st tx_packets) $(st rx_bytes) $(st tx_bytes)"; }

job() { # name command...
  n=$1; shift
  a=$(snap)
  echo "BENCH-BEGIN $n"
  read t0 x < /proc/uptime
  "$@" > /tmp/job.out 2>&1
  rc=$?
  read t1 x < /proc/uptime
  echo "BENCH-END $n"
  b=$(snap)
  echo "$a $b" | $B awk -v n=$n -v rc=$rc -v t0=$t0 -v t1=$t1 '{
    printf "BENCH %s rc=%d secs=%.2f irq_in=%.0f irq_out=%.0f rx_pkts=%.0f tx_pkts=%.0f rx_bytes=%.0f tx_bytes=%.0f\n",
      n, rc, t1 - t0, $7 - $1, $8 - $2, $9 - $3, $10 - $4, $11 - $5, $12 - $6 }'
  if [ $rc != 0 ]; then
    echo "BENCH-FAIL $n rc=$rc"
    $B tail -5 /tmp/job.out
  fi
}

# iperf3: the host runs one-off servers (their JSON is the measurement).
job iperf-tx $IPERF -c $HOST_IP -p $IPERF_TX_PORT -t $T -P $PARALLEL
$B tail -3 /tmp/job.out
job iperf-rx $IPERF -c $HOST_IP -p $IPERF_RX_PORT -t $T -P $PARALLEL -R
$B tail -3 /tmp/job.out

# busybox nc, the reference's method: NC_MIB MiB each way.
if [ "$NC_MIB" -gt 0 ]; then
  $B dd if=/dev/urandom of=/tmp/nc.dat bs=1048576 count=$NC_MIB 2>/dev/null
  nc_to_host() { $B nc $HOST_IP $NC_SINK_PORT < /tmp/nc.dat; }
  nc_from_host() { $B nc $HOST_IP $NC_SOURCE_PORT > /dev/null; }
  job nc-tx nc_to_host
  job nc-rx nc_from_host
fi
echo "BENCH-DONE"
$B stty onlcr
