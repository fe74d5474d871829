#!/usr/bin/env bash
# Benchmark (not a test): `tern disk convert` vs `qemu-img convert` on the same input,
# in the same run. Input: an 8 GiB image, half of it random data in scattered 1 MiB
# extents, the rest never written, as a sparse raw file and as a qcow2. Outputs: raw,
# fixed VHD and VHDX (32 MiB blocks for both tools). Both tools read from the page
# cache; each measurement is the best of RUNS runs.
#
#   bench/convert.sh            # 8 GiB, 3 runs
#   SIZE_GIB=2 RUNS=1 bench/convert.sh
#   ONLY=VHDX TERN=/path/to/other/tern bench/convert.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${SIZE_GIB:-8}
RUNS=${RUNS:-3}
work=${BENCH_DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/tern-bench.XXXXXX")}
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet -p tern-cli
tern=${TERN:-$(realpath "${CARGO_TARGET_DIR:-target}")/release/tern} # TERN=path compares another build

echo "bench: making a ${SIZE_GIB} GiB qcow2, half random data in 1 MiB extents" >&2
python3 - "$work/src.raw" "$SIZE_GIB" <<'PY'
import os, random, sys
path, gib = sys.argv[1], int(sys.argv[2])
extents = gib * 1024
rng = random.Random(2026)
chosen = sorted(rng.sample(range(extents), extents // 2))
with open(path, "wb") as f:
    f.truncate(gib << 30)
    for e in chosen:
        f.seek(e << 20)
        f.write(os.urandom(1 << 20))
PY
qemu-img convert -O qcow2 "$work/src.raw" "$work/src.qcow2"

best() { # best wall-clock seconds of RUNS runs of "$@", output removed between runs
  local out=$1; shift
  local best=""
  for _ in $(seq "$RUNS"); do
    rm -f "$out"
    sync
    local t0 t1
    t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N)
    local t; t=$(echo "$t1 - $t0" | bc -l)
    if [ -z "$best" ] || (( $(echo "$t < $best" | bc -l) )); then best=$t; fi
  done
  rm -f "$out"
  printf '%.3f' "$best"
}

cat "$work/src.qcow2" "$work/src.raw" >/dev/null # warm the page cache
# tern fsyncs its output before it reports success unless given --no-sync; qemu-img
# convert by default does not (its target cache mode is unsafe), and with
# `-t writeback` it fdatasyncs at the end. Like is compared with like: durable with
# durable, unsafe with unsafe.
printf '%-20s %10s %14s %7s   %14s %9s %7s\n' "conversion" "tern (s)" "qemu -t wb (s)" "ratio" "tern --no-sync" "qemu (s)" "ratio"
row() { # ONLY=REGEX runs only the rows whose name matches
  if [ -n "${ONLY:-}" ] && ! [[ $1 =~ $ONLY ]]; then return; fi
  local name=$1 tern_args=$2 qemu_args=$3 ext=$4 src=${5:-$work/src.qcow2}
  local t w tn q
  # shellcheck disable=SC2086
  t=$(best "$work/out.$ext" "$tern" disk convert --no-progress "$src" "$work/out.$ext" $tern_args)
  # shellcheck disable=SC2086
  w=$(best "$work/out.$ext" qemu-img convert -t writeback $qemu_args "$src" "$work/out.$ext")
  # shellcheck disable=SC2086
  tn=$(best "$work/out.$ext" "$tern" disk convert --no-progress --no-sync "$src" "$work/out.$ext" $tern_args)
  # shellcheck disable=SC2086
  q=$(best "$work/out.$ext" qemu-img convert $qemu_args "$src" "$work/out.$ext")
  printf '%-20s %10s %14s %7.2f   %14s %9s %7.2f\n' "$name" "$t" "$w" "$(echo "$t / $w" | bc -l)" "$tn" "$q" "$(echo "$tn / $q" | bc -l)"
}
row "qcow2 -> raw" "-O raw" "-O raw" raw
row "qcow2 -> fixed VHD" "-O vhd-fixed" "-O vpc -o subformat=fixed" vhd
row "raw -> VHDX" "-O vhdx --block-size 32M" "-f raw -O vhdx -o block_size=32M" vhdx "$work/src.raw"
row "qcow2 -> VHDX" "-O vhdx --block-size 32M" "-O vhdx -o block_size=32M" vhdx
