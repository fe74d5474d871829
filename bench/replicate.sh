#!/usr/bin/env bash
# Benchmark (not a test): tern's initial replication and migration against restic and
# borg on the same input in the same run, plus peak memory on a large sparse disk and
# the machine's single-core hashing + compression limit.
#
# Input: one raw image of SIZE_GIB (default 8): about half random data in scattered
# 1 MiB extents, a quarter compressible text, the rest zero. Stores: local folders.
#
#   bench/replicate.sh                   # full run (needs ~30 GB of free disk)
#   SIZE_GIB=2 BIG_GIB=8 bench/replicate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${SIZE_GIB:-8}
BIG_GIB=${BIG_GIB:-64}
BIG_DATA_GIB=${BIG_DATA_GIB:-8}
THREADS=${THREADS:-4}
work=${BENCH_DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/tern-bench.XXXXXX")}
trap 'rm -rf "$work"' EXIT

missing=()
for c in restic borg /usr/bin/time zstd; do command -v "$c" >/dev/null || missing+=("$c"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing restic borgbackup time zstd (missing: ${missing[*]})" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic borgbackup time zstd >/dev/null
fi
cargo build --release --quiet -p tern-cli
target=$(realpath "${CARGO_TARGET_DIR:-target}")
tern=$target/release/tern

# Seconds a command takes; a failing command stops the benchmark with its output.
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
ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
du_b() { du -sb "$1" | cut -f1; }

echo "bench: making the ${SIZE_GIB} GiB input" >&2
python3 - "$work/disk.raw" "$SIZE_GIB" <<'PY'
import os, random, sys
path, gib = sys.argv[1], int(sys.argv[2])
extents = gib * 1024                      # 1 MiB extents
rng = random.Random(2026)
order = list(range(extents)); rng.shuffle(order)
rand_ext = set(order[: extents // 2])
text_ext = set(order[extents // 2 : extents // 2 + extents // 4])
words = [w.encode() for w in "the quick brown fox jumps over lazy dog replica disk sector cluster block chunk store point cycle migrate host agent service".split()]
# A 64 MiB pool of text; each text extent is a slice at a random offset, so extents
# compress like text but do not repeat at chunk alignment.
pool = bytearray()
while len(pool) < (64 << 20):
    pool += b" ".join(rng.choice(words) for _ in range(12)) + b".\n"
pool = bytes(pool)
def text_mib():
    at = rng.randrange(len(pool) - (1 << 20))
    return pool[at : at + (1 << 20)]
with open(path, "wb") as f:
    f.truncate(gib << 30)
    for e in sorted(rand_ext | text_ext):
        f.seek(e << 20)
        f.write(os.urandom(1 << 20) if e in rand_ext else text_mib())
PY
cat "$work/disk.raw" >/dev/null

export TERN_DATA_DIR=$work/tern-data RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
"$tern" vm add bench --disk "$work/disk.raw" >/dev/null
t_tern=$(secs "$tern" replicate bench --threads "$THREADS" --force)
tern_store=$(du_b "$TERN_DATA_DIR/store")

restic init -q -r "$work/restic" >/dev/null
t_restic=$(secs restic backup -q -r "$work/restic" "$work/disk.raw")
restic_store=$(du_b "$work/restic")

borg init -e repokey "$work/borg" >/dev/null
t_borg=$(secs borg create "$work/borg::a" "$work/disk.raw")
borg init -e repokey "$work/borg-fixed" >/dev/null
t_borg_fixed=$(secs borg create --chunker-params fixed,4194304 "$work/borg-fixed::a" "$work/disk.raw")
t_borg_best=$(echo "if ($t_borg < $t_borg_fixed) $t_borg else $t_borg_fixed" | bc -l)
rm -rf "$work/borg" "$work/borg-fixed"   # only their times are compared: free the space

# Like is compared with like. Durable: tern migrate fsyncs its outputs (a cutover image
# must survive a crash), restic restore is followed by a sync. Page cache: tern migrate
# --no-sync, restic restore and qemu-img convert (which does not sync by default).
# Each output is removed once measured, so that at most one exists at a time.
t_migrate=$(secs "$tern" migrate bench --format raw --out "$work/out-tern")
cmp -s "$work/disk.raw" "$work/out-tern/"*.raw && same=yes || same=NO
rm -rf "$work/out-tern"; sync
t_restore_sync=$(secs sh -c "restic restore -q -r '$work/restic' latest --target '$work/out-restic' && sync")
rm -rf "$work/out-restic"; sync
t_migrate_ns=$(secs "$tern" migrate bench --no-sync --format raw --out "$work/out-tern-ns")
sync; rm -rf "$work/out-tern-ns"; sync
t_restore=$(secs restic restore -q -r "$work/restic" latest --target "$work/out-restic")
sync; rm -rf "$work/out-restic"; sync
t_qemu=$(secs qemu-img convert -O raw "$work/disk.raw" "$work/out-qemu.raw")
sync; rm -f "$work/out-qemu.raw"; sync

echo
echo "input: ${SIZE_GIB} GiB raw, half random, a quarter text, a quarter zero; threads $THREADS"
printf '%-44s %10s %10s %8s %8s\n' measure tern peer ratio target
printf '%-44s %10.2f %10.2f %8s %8s\n' "initial replication vs restic backup (s)" "$t_tern" "$t_restic" "$(ratio "$t_tern" "$t_restic")" "<=0.50"
printf '%-44s %10.2f %10.2f %8s %8s\n' "initial replication vs borg create (s)" "$t_tern" "$t_borg" "$(ratio "$t_tern" "$t_borg")" ""
printf '%-44s %10.2f %10.2f %8s %8s\n' "initial replication vs borg fixed 4 MiB (s)" "$t_tern" "$t_borg_fixed" "$(ratio "$t_tern" "$t_borg_fixed")" ""
printf '%-44s %10.2f %10.2f %8s %8s\n' "initial replication vs faster borg (s)" "$t_tern" "$t_borg_best" "$(ratio "$t_tern" "$t_borg_best")" "<=0.80"
printf '%-44s %10d %10d %8s %8s\n' "store size vs restic repository (bytes)" "$tern_store" "$restic_store" "$(ratio "$tern_store" "$restic_store")" "<=1.05"
printf '%-44s %10.2f %10.2f %8s %8s\n' "migrate vs restic restore, both + sync (s)" "$t_migrate" "$t_restore_sync" "$(ratio "$t_migrate" "$t_restore_sync")" ""
printf '%-44s %10.2f %10.2f %8s %8s\n' "migrate --no-sync vs restic restore (s)" "$t_migrate_ns" "$t_restore" "$(ratio "$t_migrate_ns" "$t_restore")" "<=0.40"
printf '%-44s %10.2f %10.2f %8s %8s\n' "migrate --no-sync vs qemu-img convert (s)" "$t_migrate_ns" "$t_qemu" "$(ratio "$t_migrate_ns" "$t_qemu")" "<=1.50"
echo "migrated image equals the source: $same"

# Machine limit: single-core keyed BLAKE3 + zstd -1 + AES-GCM over the non-zero chunks
# of the same input, from the page cache, times the number of cores.
cargo build --release --quiet -p tern-chunk --example seal_speed
speed=$("$target"/release/examples/seal_speed "$work/disk.raw" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data_mib_per_s"])')
cores=$(nproc)
data_gib=$(echo "$SIZE_GIB * 3 / 4" | bc -l)
ours=$(echo "$data_gib * 1024 / $t_tern" | bc -l)
echo "single-core BLAKE3 + zstd -1 + AES-GCM: $speed MiB/s of data; machine limit with $cores cores: $(echo "$speed * $cores" | bc -l | xargs printf '%.0f') MiB/s"
echo "tern replication: $(printf '%.0f' "$ours") MiB/s of non-zero data = $(printf '%.0f' "$(echo "100 * $ours / ($speed * $cores)" | bc -l)")% of the machine limit"

rm -rf "$work/restic" "$work/disk.raw" "$TERN_DATA_DIR"
# Peak memory on a large sparse disk.
echo "bench: ${BIG_GIB} GiB sparse image with ${BIG_DATA_GIB} GiB of data" >&2
python3 - "$work/big.raw" "$BIG_GIB" "$BIG_DATA_GIB" <<'PY'
import os, random, sys
path, gib, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(7)
ext = sorted(rng.sample(range(gib * 256), data * 256))   # 4 MiB extents
with open(path, "wb") as f:
    f.truncate(gib << 30)
    for e in ext:
        f.seek(e << 22); f.write(os.urandom(1 << 22))
PY
"$tern" vm add big --disk "$work/big.raw" >/dev/null
/usr/bin/time -f %M -o "$work/rss" "$tern" replicate big --threads "$THREADS" --force >/dev/null
rss=$(tail -1 "$work/rss")
echo "peak RSS replicating ${BIG_GIB} GiB sparse / ${BIG_DATA_GIB} GiB data: $((rss / 1024)) MiB (target < 256 MiB)"
