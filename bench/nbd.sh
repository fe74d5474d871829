#!/usr/bin/env bash
# Benchmark (not a test): `tern disk serve` vs qemu-nbd vs nbdkit's file plugin, each
# serving the same raw image over a Unix socket, measured by the same client in the
# same run: fio's nbd engine (libnbd). Rows: 4 KiB random read and write at queue
# depth 1 and 16, 1 MiB sequential read and write at queue depth 4. Each figure is the
# best of RUNS runs of RUNTIME seconds, the runs of the three servers interleaved. At
# queue depth 1 the figures swing run to run on a VM (an idle vCPU is slow to wake):
# compare them only within one run of this script.
#
#   bench/nbd.sh                       # 1 GiB image in /dev/shm, 10 s per job, 3 runs
#   SIZE_MIB=4096 RUNTIME=30 RUNS=3 bench/nbd.sh
#   BENCH_DIR=/var/tmp/x bench/nbd.sh  # image on disk instead of tmpfs
#   ONLY='QD16' TERN=/path/to/other/tern bench/nbd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-1024}
RUNTIME=${RUNTIME:-10}
RUNS=${RUNS:-3}
base=${BENCH_DIR:-$([ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/var/tmp}")}
work=$(mktemp -d "$base/tern-bench-nbd.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for t in fio qemu-nbd nbdkit; do
  command -v "$t" >/dev/null || { echo "bench: $t is needed (scripts/deps installs it)" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench: this fio has no nbd engine" >&2; exit 1; }
cargo build --release --quiet -p tern-cli
tern=${TERN:-$(realpath "${CARGO_TARGET_DIR:-target}")/release/tern} # TERN=path compares another build

img=$work/disk.raw
echo "bench: writing a ${SIZE_MIB} MiB raw image in $base" >&2
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$img"

wait_socket() { # up to 20 s for a server to accept on $1
  for _ in $(seq 200); do
    python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: no server on $1" >&2
  exit 1
}

start_server() { # name: starts it, sets $sock; its pid is appended to pids
  sock=$work/$1.sock
  rm -f "$sock"
  case $1 in
    tern) "$tern" disk serve --socket "$sock" "$img" >/dev/null & ;;
    qemu-nbd) qemu-nbd -f raw --persistent --shared=16 -x '' -k "$sock" "$img" & ;;
    nbdkit) nbdkit --foreground -U "$sock" file "file=$img" & ;;
  esac
  pids+=($!)
  wait_socket "$sock"
}

# name rw bs iodepth metric (iops | mibs)
jobs=(
  "4k randread QD1|randread|4k|1|iops"
  "4k randread QD16|randread|4k|16|iops"
  "4k randwrite QD1|randwrite|4k|1|iops"
  "4k randwrite QD16|randwrite|4k|16|iops"
  "1M read QD4|read|1M|4|mibs"
  "1M write QD4|write|1M|4|mibs"
)

measure() { # sock rw bs depth metric -> the figure of one run
  local sock=$1 rw=$2 bs=$3 depth=$4 metric=$5
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$rw" --bs="$bs" \
    --iodepth="$depth" --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time=1 \
    --randrepeat=0 --norandommap --output-format=json 2>/dev/null |
    python3 -c '
import json, sys
text = sys.stdin.read()  # the nbd engine prints a line of its own first
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print(round(side["iops"]) if sys.argv[1] == "iops" else round(side["bw_bytes"] / 1048576))
' "$metric"
}

# All three servers listen at once (an idle server costs nothing); every job runs
# against each in turn, RUNS rounds, so that drift in the machine (frequency, the
# other tenants of a VM host) falls on all three alike.
declare -A sockets result
for server in tern nbdkit qemu-nbd; do
  start_server "$server"
  sockets[$server]=$sock
done
for j in "${jobs[@]}"; do
  IFS='|' read -r name rw bs depth metric <<<"$j"
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then continue; fi
  for _ in $(seq "$RUNS"); do
    for server in tern nbdkit qemu-nbd; do
      echo "bench: $server: $name" >&2
      v=$(measure "${sockets[$server]}" "$rw" "$bs" "$depth" "$metric")
      if [ "$v" -gt "${result[$server|$name]:-0}" ]; then result[$server|$name]=$v; fi
    done
  done
done

printf '%-20s %6s %10s %10s %10s %12s %14s\n' "job" "unit" "tern" "nbdkit" "qemu-nbd" "tern/nbdkit" "tern/qemu-nbd"
for j in "${jobs[@]}"; do
  IFS='|' read -r name rw bs depth metric <<<"$j"
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then continue; fi
  t=${result[tern|$name]} k=${result[nbdkit|$name]} q=${result[qemu-nbd|$name]}
  unit=$([ "$metric" = iops ] && echo IOPS || echo MiB/s)
  printf '%-20s %6s %10s %10s %10s %12.2f %14.2f\n' "$name" "$unit" "$t" "$k" "$q" \
    "$(echo "$t / $k" | bc -l)" "$(echo "$t / $q" | bc -l)"
done
