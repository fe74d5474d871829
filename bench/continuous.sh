#!/usr/bin/env bash
# Benchmark (not a test): continuous replication of a VM in a running QEMU.
#
# 1. Delta cycle: a SIZE_GIB (default 8) qcow2 disk in qemu-storage-daemon, half of it
#    random data; after the initial replication, CHANGE_PCT (default 1) % of it changed
#    by scattered 64 KiB random writes through the guest's NBD export. Times one
#    `tern replicate` (a delta cycle) against a second `restic backup` and a second
#    `borg create --chunker-params fixed,65536` of the image file, in the same run;
#    bytes each stored; tern's peak RSS.
# 2. Guest impact: fio 4 KiB random writes (iodepth 4) through the export for
#    FIO_SECONDS, without tern and with `tern agent` cycling every IMPACT_FREQ.
# 3. Achieved RPO: RPO_SECONDS of steady 5 MB/s churn (fio, 64 KiB random writes) with
#    the agent at each frequency in RPO_FREQS; the newest point's age sampled every
#    second from `tern status --json`: p50, p99, max.
# 4. Memory: peak RSS of the initial replication and of a delta cycle of a BIG_GIB
#    (default 64) disk with 1 GiB written.
# 5. The journal (`--tracking journal`, docs/journal.md): guest impact, fio 4 KiB
#    random writes (iodepth 4) for FIO_SECONDS without a mirror, with QEMU's
#    write-blocking mirror into nbdkit's null plugin (the cost of any such mirror), and
#    with the mirror into `tern agent`'s journal; then its achieved RPO over
#    RPO_SECONDS of 5 MB/s churn at JOURNAL_FREQ (default 5s).
#
#   bench/continuous.sh                          # everything (about 30 minutes)
#   ONLY=delta bench/continuous.sh               # one part: delta, impact, rpo, memory
#   RPO_SECONDS=120 ONLY=rpo bench/continuous.sh
#   ONLY=journal RPO_SECONDS=300 bench/continuous.sh   # or journal-impact, journal-rpo
#   MODE=push ONLY=impact bench/continuous.sh          # bitmap cycles in push mode
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${SIZE_GIB:-8}
CHANGE_PCT=${CHANGE_PCT:-1}
FIO_SECONDS=${FIO_SECONDS:-60}
IMPACT_FREQ=${IMPACT_FREQ:-30s}
RPO_SECONDS=${RPO_SECONDS:-600}
RPO_FREQS=${RPO_FREQS:-"30s 5s"}
BIG_GIB=${BIG_GIB:-64}
JOURNAL_FREQ=${JOURNAL_FREQ:-5s}
# How bitmap cycles leave QEMU in the impact and rpo parts: pull (tern reads NBD
# exports on the daemon's server) or push (QEMU copies each cut into local files).
MODE=${MODE:-pull}
ONLY=${ONLY:-all}
work=${BENCH_DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/tern-cbench.XXXXXX")}
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

missing=()
for c in restic borg fio nbdcopy nbdkit qemu-storage-daemon /usr/bin/time; do command -v "$c" >/dev/null || missing+=("$c"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing restic borgbackup fio libnbd-bin nbdkit qemu-system-common time (missing: ${missing[*]})" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic borgbackup fio libnbd-bin nbdkit qemu-system-common time >/dev/null
fi
cargo build --release --quiet -p tern-cli
tern=$(realpath "${CARGO_TARGET_DIR:-target}")/release/tern

secs() {
  local t0 t1 log
  log=$(mktemp)
  t0=$(date +%s.%N)
  if ! "$@" >"$log" 2>&1; then
    echo "bench: failed: $*" >&2; cat "$log" >&2; rm -f "$log"; return 1
  fi
  t1=$(date +%s.%N)
  rm -f "$log"
  echo "$t1 - $t0" | bc -l
}
ratio() { printf '%.1f' "$(echo "$1 / $2" | bc -l)"; }
du_b() { du -sb "$1" | cut -f1; }
# Peak RSS in KiB of a command (GNU time).
rss() { /usr/bin/time -f '%M' -o "$work/rss" "$@" >/dev/null 2>&1; cat "$work/rss"; }

# A qemu-storage-daemon with one qcow2 disk of $2 GiB in folder $1, exported as disk0.
start_vm() {
  local dir=$1 gib=$2
  mkdir -p "$dir"
  qemu-img create -q -f qcow2 "$dir/disk0.qcow2" "${gib}G"
  qemu-storage-daemon \
    --blockdev "driver=file,filename=$dir/disk0.qcow2,node-name=f0" \
    --blockdev "driver=qcow2,file=f0,node-name=disk0" \
    --chardev "socket,path=$dir/qmp.sock,server=on,wait=off,id=m" --monitor chardev=m \
    --nbd-server "addr.type=unix,addr.path=$dir/nbd.sock" \
    --export "type=nbd,id=g0,node-name=disk0,name=disk0,writable=on" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do [ -S "$dir/nbd.sock" ] && [ -S "$dir/qmp.sock" ] && return; sleep 0.05; done
  echo "bench: qemu-storage-daemon did not start" >&2; exit 1
}
uri() { echo "nbd+unix:///disk0?socket=$1/nbd.sock"; }
# `vm add` arguments for folder $1's daemon: its NBD server (pull), or push mode
# (bitmap cycles only: the journal always pulls).
cut_args() {
  if [ "$MODE" = push ] && [ "${2:-qemu}" != journal ]; then echo "--mode push"; else echo "--nbd $1/nbd.sock"; fi
}

# Write $3 random 64 KiB blocks at random 64 KiB-aligned offsets of a $2 GiB disk
# exported at folder $1 (one qemu-io, each block its own random data).
scatter() {
  local dir=$1 gib=$2 n=$3 seed=${4:-7}
  python3 - "$dir" "$gib" "$n" "$seed" <<'PY'
import os, random, sys
d, gib, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
slots = rng.sample(range(gib * 16384), n)
os.makedirs(f"{d}/w", exist_ok=True)
with open(f"{d}/w/cmds", "w") as c:
    for i, s in enumerate(slots):
        p = f"{d}/w/{i}"
        with open(p, "wb") as f:
            f.write(rng.randbytes(65536))
        c.write(f"write -q -s {p} {s * 65536} 64k\n")
PY
  qemu-io -f raw "$(uri "$dir")" < "$dir/w/cmds" >/dev/null
  rm -rf "$dir/w"
}

# Fill half of a $2 GiB disk at folder $1 with random data in 1 MiB extents.
fill_half() {
  local dir=$1 gib=$2
  python3 - "$dir/fill.raw" "$gib" <<'PY'
import random, sys
path, gib = sys.argv[1], int(sys.argv[2])
rng = random.Random(2026)
with open(path, "wb") as f:
    f.truncate(gib << 30)
    for e in range(gib * 1024):
        if rng.random() < 0.5:
            f.seek(e << 20)
            f.write(rng.randbytes(1 << 20))
PY
  nbdcopy "$dir/fill.raw" "$(uri "$dir")"
  rm -f "$dir/fill.raw"
}

if [ "$ONLY" = all ] || [ "$ONLY" = delta ]; then
  v=$work/delta; start_vm "$v" "$SIZE_GIB"
  echo "bench: filling half of the ${SIZE_GIB} GiB disk" >&2
  fill_half "$v" "$SIZE_GIB"
  export TERN_DATA_DIR=$v/tern RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
  "$tern" vm add web --qmp "$v/qmp.sock" --nbd "$v/nbd.sock" >/dev/null
  t_init=$(secs "$tern" replicate web --no-progress)
  restic init -q --repo "$v/restic" >/dev/null
  borg init --encryption=repokey-blake2 "$v/borg" >/dev/null 2>&1
  sync
  r1=$(secs restic backup -q --repo "$v/restic" "$v/disk0.qcow2")
  b1=$(secs borg create --chunker-params fixed,65536 --compression zstd,3 "$v/borg::one" "$v/disk0.qcow2")
  blocks=$(( SIZE_GIB * 16384 * CHANGE_PCT / 100 ))
  changed=$(( blocks * 65536 ))
  echo "bench: changing $blocks scattered 64 KiB blocks ($changed bytes)" >&2
  scatter "$v" "$SIZE_GIB" "$blocks"
  sync
  s0=$(du_b "$v/tern/store"); r0=$(du_b "$v/restic"); g0=$(du_b "$v/borg")
  t0=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$work/rss" "$tern" replicate web --no-progress >"$work/cycle.out" 2>&1
  t_cycle=$(echo "$(date +%s.%N) - $t0" | bc -l)
  cycle_rss=$(cat "$work/rss")
  r2=$(secs restic backup -q --repo "$v/restic" "$v/disk0.qcow2")
  b2=$(secs borg create --chunker-params fixed,65536 --compression zstd,3 "$v/borg::two" "$v/disk0.qcow2")
  s1=$(du_b "$v/tern/store"); r1b=$(du_b "$v/restic"); g1=$(du_b "$v/borg")
  ts=$((s1 - s0)); rs=$((r1b - r0)); gs=$((g1 - g0))
  echo
  echo "## Delta cycle: ${SIZE_GIB} GiB qcow2, ${CHANGE_PCT}% changed in 64 KiB random writes ($changed bytes)"
  echo "initial: tern $(printf %.1f "$t_init") s, restic $(printf %.1f "$r1") s, borg fixed $(printf %.1f "$b1") s"
  echo "| tool | second run (s) | bytes stored | stored / changed | tern faster by |"
  echo "|---|---|---|---|---|"
  echo "| tern delta cycle | $(printf %.2f "$t_cycle") | $ts | $(printf %.2f "$(echo "$ts / $changed" | bc -l)") | |"
  echo "| restic backup | $(printf %.2f "$r2") | $rs | $(printf %.2f "$(echo "$rs / $changed" | bc -l)") | $(ratio "$r2" "$t_cycle")x |"
  echo "| borg create fixed,65536 | $(printf %.2f "$b2") | $gs | $(printf %.2f "$(echo "$gs / $changed" | bc -l)") | $(ratio "$b2" "$t_cycle")x |"
  echo "tern delta cycle peak RSS: $((cycle_rss / 1024)) MiB"
  grep "changed" "$work/cycle.out" || true
  unset TERN_DATA_DIR
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
  rm -rf "$v"
fi

fio_iops() {
  fio --name=g --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=4 --size=2G \
    --time_based --runtime="$2" --randrepeat=0 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); print(int(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"]))'
}

# The same fio run: "IOPS | p99.9 completion latency | max latency" (a mark that held
# the guest's writes shows in the tail).
fio_iops_lat() {
  fio --name=g --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=4 --size=2G \
    --time_based --runtime="$2" --randrepeat=0 --output-format=json 2>/dev/null |
    python3 -c '
import json, sys
t = sys.stdin.read(); w = json.loads(t[t.index("{"):])["jobs"][0]["write"]; c = w["clat_ns"]
p = c.get("percentile", {}).get("99.900000", 0) / 1e6
n = int(w["iops"]); m = c["max"] / 1e6
print(f"{n} | {p:.2f} ms | {m:.1f} ms")'
}

if [ "$ONLY" = all ] || [ "$ONLY" = impact ]; then
  v=$work/impact; start_vm "$v" 4
  fill_half "$v" 4
  export TERN_DATA_DIR=$v/tern
  "$tern" vm add web --qmp "$v/qmp.sock" $(cut_args "$v") >/dev/null
  "$tern" replicate web --no-progress >/dev/null
  base=$(fio_iops "$(uri "$v")" "$FIO_SECONDS")
  "$tern" agent --frequency "$IMPACT_FREQ" >"$v/agent.log" 2>&1 &
  pids+=($!); agent=$!
  sleep 1
  "$tern" replicate web --frequency "$IMPACT_FREQ" --detach 2>/dev/null
  with=$(fio_iops "$(uri "$v")" "$FIO_SECONDS")
  kill -TERM "$agent"; wait "$agent" 2>/dev/null || true
  cycles=$(grep -c "delta" "$v/agent.log" || true)
  echo
  echo "## Guest impact: fio 4 KiB random writes, iodepth 4, ${FIO_SECONDS} s"
  echo "| | IOPS |"
  echo "|---|---|"
  echo "| without tern | $base |"
  echo "| tern agent cycling every $IMPACT_FREQ, $MODE mode ($cycles cycles) | $with |"
  echo "ratio with/without: $(printf %.2f "$(echo "$with / $base" | bc -l)")"
  unset TERN_DATA_DIR
  kill "${pids[-2]}" 2>/dev/null || true
  rm -rf "$v"
fi

# Achieved RPO: RPO_SECONDS of 5 MB/s churn with the agent at frequency $1, the VM
# added with --tracking $2 (qemu or journal).
rpo_run() {
  local freq=$1 tracking=$2 v
  v=$work/rpo-$tracking-$freq; start_vm "$v" 4
  export TERN_DATA_DIR=$v/tern
  "$tern" vm add web --qmp "$v/qmp.sock" $(cut_args "$v" "$tracking") --tracking "$tracking" >/dev/null
  "$tern" agent --frequency "$freq" >"$v/agent.log" 2>&1 &
  agent=$!; pids+=($agent)
  sleep 1
  "$tern" replicate web --frequency "$freq" >/dev/null 2>&1
  fio --name=churn --ioengine=nbd --uri="$(uri "$v")" --rw=randwrite --bs=64k --rate=5m --size=4G \
    --time_based --runtime="$RPO_SECONDS" --randrepeat=0 >/dev/null 2>&1 &
  churn=$!
  : >"$v/ages"
  end=$(( $(date +%s) + RPO_SECONDS ))
  while [ "$(date +%s)" -lt "$end" ]; do
    "$tern" status web --json | python3 -c 'import json,sys; t=json.load(sys.stdin)[0].get("tracking") or {}; a=t.get("last_point_age_seconds"); print(a if a is not None else "")' >>"$v/ages"
    sleep 1
  done
  wait "$churn" || true
  kill -TERM "$agent"; wait "$agent" 2>/dev/null || true
  stats=$(python3 - "$v/ages" <<'PY'
import sys
a = sorted(int(x) for x in open(sys.argv[1]).read().split())
q = lambda p: a[min(len(a) - 1, int(p * len(a)))]
print(f"{len(a)} samples: p50 {q(0.5)} s, p99 {q(0.99)} s, max {a[-1]} s")
PY
)
  points=$(grep -c "point" "$v/agent.log" || true)
  compactions=$(grep -c "compacted point" "$v/agent.log" || true)
  echo
  local how=$tracking; [ "$tracking" = qemu ] && how="qemu ($MODE mode)"
  echo "## Achieved RPO, --tracking $how at --frequency $freq: ${RPO_SECONDS} s of 5 MB/s churn, unlimited bandwidth"
  echo "newest point's age: $stats; $points points, $compactions compactions beside the cycles"
  unset TERN_DATA_DIR
  kill "${pids[-2]}" 2>/dev/null || true
  rm -rf "$v"
}

if [ "$ONLY" = all ] || [ "$ONLY" = rpo ]; then
  for freq in $RPO_FREQS; do rpo_run "$freq" qemu; done
fi

if [ "$ONLY" = all ] || [ "$ONLY" = memory ]; then
  v=$work/mem; start_vm "$v" "$BIG_GIB"
  export TERN_DATA_DIR=$v/tern
  scatter "$v" "$BIG_GIB" 16384 11      # 1 GiB in 64 KiB blocks
  "$tern" vm add web --qmp "$v/qmp.sock" --nbd "$v/nbd.sock" >/dev/null
  init=$(rss "$tern" replicate web --no-progress)
  scatter "$v" "$BIG_GIB" 16384 12
  cyc=$(rss "$tern" replicate web --no-progress)
  echo
  echo "## Memory: ${BIG_GIB} GiB disk, 1 GiB written, then 1 GiB more"
  echo "peak RSS: initial replication $((init / 1024)) MiB, delta cycle of 1 GiB $((cyc / 1024)) MiB"
  unset TERN_DATA_DIR
fi

# A QMP command on the daemon at folder $1 (the arguments as JSON in $3).
qmp() {
  python3 - "$1/qmp.sock" "$2" "${3:-{\}}" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
for cmd, args in (("qmp_capabilities", {}), (sys.argv[2], json.loads(sys.argv[3]))):
    f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "error" in r: sys.exit(f"qmp {cmd}: {r['error']['desc']}")
        if "return" in r: break
PY
}

if [ "$ONLY" = all ] || [ "$ONLY" = journal ] || [ "$ONLY" = journal-impact ]; then
  v=$work/journal; start_vm "$v" 4
  fill_half "$v" 4
  base=$(fio_iops_lat "$(uri "$v")" "$FIO_SECONDS")
  # The same write-blocking mirror into a sink that does nothing: nbdkit's null plugin.
  nbdkit --unix "$v/null.sock" --exit-with-parent null size=4G &
  pids+=($!); null=$!
  for _ in $(seq 100); do [ -S "$v/null.sock" ] && break; sleep 0.05; done
  qmp "$v" blockdev-add "{\"driver\": \"nbd\", \"node-name\": \"nul\", \"server\": {\"type\": \"unix\", \"path\": \"$v/null.sock\"}, \"export\": \"\"}"
  qmp "$v" blockdev-mirror '{"job-id": "nul", "device": "disk0", "target": "nul", "sync": "none", "copy-mode": "write-blocking"}'
  nul=$(fio_iops_lat "$(uri "$v")" "$FIO_SECONDS")
  qmp "$v" block-job-cancel '{"device": "nul", "force": true}'
  sleep 1
  qmp "$v" blockdev-del '{"node-name": "nul"}'
  kill "$null" 2>/dev/null || true
  export TERN_DATA_DIR=$v/tern
  "$tern" vm add web --qmp "$v/qmp.sock" --nbd "$v/nbd.sock" --tracking journal >/dev/null
  "$tern" replicate web --no-progress >/dev/null
  "$tern" agent --frequency "$JOURNAL_FREQ" >"$v/agent.log" 2>&1 &
  pids+=($!); agent=$!
  sleep 1
  "$tern" replicate web --frequency "$JOURNAL_FREQ" >/dev/null 2>&1
  with=$(fio_iops_lat "$(uri "$v")" "$FIO_SECONDS")
  kill -TERM "$agent"; wait "$agent" 2>/dev/null || true
  points=$(grep -c "point" "$v/agent.log" || true)
  iops() { echo "${1%% |*}"; }
  echo
  echo "## Guest impact of the journal: fio 4 KiB random writes, iodepth 4, ${FIO_SECONDS} s"
  echo "| | IOPS | p99.9 latency | max latency | ratio |"
  echo "|---|---|---|---|---|"
  echo "| no mirror | $base | 1.00 |"
  echo "| write-blocking mirror into nbdkit null | $nul | $(printf %.2f "$(echo "$(iops "$nul") / $(iops "$base")" | bc -l)") |"
  echo "| write-blocking mirror into tern's journal, a point every $JOURNAL_FREQ ($points points) | $with | $(printf %.2f "$(echo "$(iops "$with") / $(iops "$base")" | bc -l)") |"
  unset TERN_DATA_DIR
  kill "${pids[-3]}" 2>/dev/null || true
  rm -rf "$v"
fi
if [ "$ONLY" = all ] || [ "$ONLY" = journal ] || [ "$ONLY" = journal-rpo ]; then
  rpo_run "$JOURNAL_FREQ" journal
  rpo_run "$JOURNAL_FREQ" qemu
fi
