# Guest side of scripts/bench-block.sh, run by the test guest's /init
# (kite.exec=vda) from the script disk. bench.py prepends the settings:
#   RT (s per fio job), PHASES ("dd fio"), DD_SEQ_COUNT (128 KiB blocks),
#   DD_4K_COUNT (4 KiB blocks), QD_HIGH (32).
# Prints on the console, per job:
#   BENCH-BEGIN <job>  /  BENCH-END <job>   (the host samples the VMM's CPU there)
#   BENCH <job> iops=<n> bw_kib=<n> ios=<n> ... (or BENCH-FAIL <job> ...)
#   BENCH-STAT <job> <the fields of /sys/block/vdb/stat after the job> (fio jobs)
B=/bin/busybox
FIO=/usr/bin/fio
# No SysV IPC in the guest kernel: fio's job area comes from this shim.
export LD_PRELOAD=/usr/lib/fio-shm.so
dev=/dev/vdb
if [ ! -b $dev ]; then echo "BENCH-FAIL setup no $dev"; exit 1; fi
mib=$(( $($B cat /sys/block/vdb/size) / 2048 ))
echo "BENCH-DEV vdb mib=$mib sched=$($B cat /sys/block/vdb/queue/scheduler 2>/dev/null) nr_queues=$($B ls /sys/block/vdb/mq 2>/dev/null | $B wc -l) max_sectors_kb=$($B cat /sys/block/vdb/queue/max_sectors_kb) max_segments=$($B cat /sys/block/vdb/queue/max_segments) nr_requests=$($B cat /sys/block/vdb/queue/nr_requests)"

dd_job() { # name bs_kib count dd-args...
  n=$1 bs=$2 cnt=$3; shift 3
  echo "BENCH-BEGIN $n"
  read t0 x < /proc/uptime
  $B dd bs=${bs}k count=$cnt "$@" 2>/tmp/dd.err
  rc=$?
  read t1 x < /proc/uptime
  echo "BENCH-END $n"
  out=$($B sed -n 's/^\([0-9]*\)+[0-9]* records out$/\1/p' /tmp/dd.err)
  if [ $rc = 0 ] && [ -n "$out" ] && [ "$out" -gt 0 ]; then
    $B awk -v n=$n -v ios=$out -v bs=$bs -v t0=$t0 -v t1=$t1 'BEGIN {
      s = t1 - t0; if (s <= 0) s = 0.005
      printf "BENCH %s iops=%.0f bw_kib=%.0f ios=%d secs=%.2f engine=dd\n", n, ios / s, ios * bs / s, ios, s }'
  else
    echo "BENCH-FAIL $n rc=$rc $($B head -c 200 /tmp/dd.err | $B tr '\n' ' ')"
  fi
}

engine=psync
if $FIO --thread --name=probe --filename=$dev --rw=read --bs=4k --direct=1 --ioengine=libaio \
    --iodepth=2 --size=64k >/dev/null 2>&1; then
  engine=libaio
fi
echo "BENCH-ENGINE $engine"

fio_job() { # name rw bs_kib qd
  n=$1 rw=$2 bs=$3 qd=$4
  if [ $engine = libaio ]; then
    opts="--ioengine=libaio --iodepth=$qd"
  elif [ $qd = 1 ]; then
    opts="--ioengine=psync"
  else
    # No AIO in the guest kernel: queue depth N = N threads doing pread/pwrite.
    opts="--ioengine=psync --numjobs=$qd --group_reporting"
    case $rw in
      read|write) opts="$opts --size=$((mib / qd))m --offset_increment=$((mib / qd))m" ;;
    esac
  fi
  echo "BENCH-BEGIN $n"
  $FIO --thread --name=$n --filename=$dev --rw=$rw --bs=${bs}k --direct=1 $opts \
    --runtime=$RT --time_based --output-format=terse >/tmp/fio.out 2>&1
  rc=$?
  echo "BENCH-END $n"
  # The device's own counters (reads, merges, sectors...: Documentation/block/stat.rst).
  echo "BENCH-STAT $n $($B cat /sys/block/vdb/stat) irqs=$($B awk '/-req\./ { s += $2 } END { print s }' /proc/interrupts)"
  # terse v3: 5 error, 6/7/8 read KiB/KiB/s/IOPS, 47/48/49 the same for writes.
  $B awk -F';' -v n=$n -v bs=$bs -v rc=$rc -v eng=$engine -v qd=$qd '
    $1 == "3" && NF > 50 && rc == 0 && $5 == 0 { found = 1
      printf "BENCH %s iops=%.0f bw_kib=%d ios=%d secs=%.2f engine=%s%s\n", n, $8 + $49, $7 + $48,
        ($6 + $47) / bs, ($9 > $50 ? $9 : $50) / 1000, eng, (eng == "psync" && qd > 1) ? "x" qd : "" }
    END { if (!found) print "BENCH-FAIL " n " rc=" rc }' /tmp/fio.out
  [ $rc = 0 ] || $B head -5 /tmp/fio.out
}

for phase in $PHASES; do
  case $phase in
    dd)
      dd_job dd-read-128k 128 $DD_SEQ_COUNT if=$dev of=/dev/null iflag=direct
      dd_job dd-write-128k 128 $DD_SEQ_COUNT if=/dev/zero of=$dev oflag=direct
      dd_job dd-read-4k 4 $DD_4K_COUNT if=$dev of=/dev/null iflag=direct
      ;;
    fio)
      for qd in 1 $QD_HIGH; do fio_job randread-4k-qd$qd randread 4 $qd; done
      for qd in 1 $QD_HIGH; do fio_job randwrite-4k-qd$qd randwrite 4 $qd; done
      for qd in 1 $QD_HIGH; do fio_job read-128k-qd$qd read 128 $qd; done
      for qd in 1 $QD_HIGH; do fio_job write-128k-qd$qd write 128 $qd; done
      ;;
  esac
done
echo "BENCH-DONE"
