#!/usr/bin/env bash
# make-seeds.sh [CORPUS_DIR]
#
# Makes the fuzz targets' seed corpora with qemu-img and qemu-io: every
# variant of qcow2 the engine supports (cluster sizes 512 B to 2 MiB, v2 and
# v3, every refcount width, extended L2, zlib and zstd compressed clusters,
# zero clusters, internal snapshots, bitmaps, external data files plain and
# raw, preallocation, lazy refcounts, backing chains with qcow2 and raw
# backings), each encoded by encode.py into the container the targets read
# (f0 is the image, f1 and f2 its backing files or data file). Nothing is
# committed: the corpora are made again by this script (fuzz/corpus is
# ignored by git).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
corpus=${1:-$here/../corpus}
work=$(mktemp -d /dev/shm/cowshed-seeds.XXXXXX)
trap 'rm -rf "$work"' EXIT

img() { qemu-img "$@" >/dev/null; }
io() { # io FMT FILE CMD...
  local fmt=$1 file=$2; shift 2
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  qemu-io -f "$fmt" "${args[@]}" "$file" >/dev/null
}

# A spread of writes over a disk of SIZE bytes with clusters of CS bytes:
# data (small pieces, so that large clusters stay small inputs), a partial
# cluster, zeros written as zero clusters, a compressed cluster when asked.
fill() { # fill FILE CS SIZE [compress]
  local f=$1 cs=$2 size=$3 c=${4:-}
  local p=$((cs < 4096 ? cs : 4096))
  local cmds=("write -P 0x11 0 $p" "write -P 0x22 $((cs * 3)) $p" "write -P 0x22 $((cs * 4)) $p"
    "write -P 0x33 $((size / 2 + 512)) 1024" "write -z $((cs * 5)) $((cs * 2))"
    "write -P 0x44 $((size - cs)) $p")
  if [ -n "$c" ]; then
    cmds+=("write -c -P 0x55 $cs $cs" "write -c -P 0 $((cs * 2)) $cs")
  fi
  io qcow2 "$f" "${cmds[@]}"
}

n=0
scenario() { # scenario NAME: the files f0 [f1 [f2]] of $work/NAME
  local d=$work/$1
  local files=()
  for f in f0 f1 f2; do [ -e "$d/$f" ] && files+=("$d/$f"); done
  n=$((n + 1))
  for t in open_info map read check check_repair; do
    mkdir -p "$corpus/$t"
    python3 "$here/encode.py" "$corpus/$t/$1" 0 "$ops" "${files[@]}"
  done
  for s in 0 1 2 3; do
    for t in commit rebase; do
      mkdir -p "$corpus/$t"
      python3 "$here/encode.py" "$corpus/$t/$1-$s" "$s" "" "${files[@]}"
    done
  done
  for s in 0 1 2 3 5 9 14; do
    mkdir -p "$corpus/convert"
    python3 "$here/encode.py" "$corpus/convert/$1-$s" "$s" "" "${files[@]}"
  done
  mkdir -p "$corpus/writer"
  python3 "$here/encode.py" "$corpus/writer/$1" 0 "$ops" "${files[@]}"
  python3 "$here/encode.py" "$corpus/writer/$1-b" 0 "$ops2" "${files[@]}"
}

# Writer operations (8 bytes each: kind, offset:u32, len:u16, seed), fixed.
ops=$(python3 -c '
import random, struct
r = random.Random(1)
print("".join(struct.pack("<BIHB", r.choice([0, 8, 0x18, 0x28, 3, 0x1b, 5, 0x1d, 7]),
    r.randrange(1 << 24), r.randrange(64), r.randrange(256)).hex() for _ in range(12)))')
ops2=$(python3 -c '
import random, struct
r = random.Random(2)
print("".join(struct.pack("<BIHB", r.randrange(256), r.randrange(1 << 32),
    r.randrange(1 << 16), r.randrange(256)).hex() for _ in range(24)))')

new() { mkdir -p "$work/$1"; cd "$work/$1"; }

for cs in 512 4096 65536 2097152; do
  size=$((cs >= 2097152 ? 16 << 20 : 4 << 20))
  new "cs$cs"; img create -f qcow2 -o cluster_size=$cs f0 $size; fill f0 $cs $size c; scenario "cs$cs"
  new "v2-cs$cs"; img create -f qcow2 -o compat=0.10,cluster_size=$cs f0 $size; fill f0 $cs $size c; scenario "v2-cs$cs"
done
for rb in 1 2 4 8 32 64; do
  new "refbits$rb"; img create -f qcow2 -o refcount_bits=$rb,cluster_size=4096 f0 4M; fill f0 4096 $((4 << 20)); scenario "refbits$rb"
done
new ext-l2; img create -f qcow2 -o extended_l2=on,cluster_size=65536 f0 4M
io qcow2 f0 "write -P 0x11 0 4k" "write -P 0x22 70k 2k" "write -z 128k 64k" "write -P 0x33 1M 64k" "write -c -P 0x44 2M 64k"
scenario ext-l2
new ext-l2-small; img create -f qcow2 -o extended_l2=on,cluster_size=16384 f0 2M
io qcow2 f0 "write -P 0x11 512 1k" "write -z 32k 512" "write -P 0x22 100k 3k"
scenario ext-l2-small
new zstd; img create -f qcow2 -o compression_type=zstd f0 4M; fill f0 65536 $((4 << 20)) c; scenario zstd
new snapshots; img create -f qcow2 -o cluster_size=4096 f0 2M
io qcow2 f0 "write -P 0x11 0 16k"; img snapshot -c one f0
io qcow2 f0 "write -P 0x22 8k 16k" "write -z 512k 8k"; img snapshot -c two f0
io qcow2 f0 "write -P 0x33 4k 4k"
scenario snapshots
new bitmaps; img create -f qcow2 -o cluster_size=4096 f0 2M
img bitmap --add f0 b0; io qcow2 f0 "write -P 0x11 0 16k"
scenario bitmaps
new lazy; img create -f qcow2 -o lazy_refcounts=on,cluster_size=4096 f0 2M; fill f0 4096 $((2 << 20)); scenario lazy
for p in metadata falloc full; do
  new "prealloc-$p"; img create -f qcow2 -o preallocation=$p,cluster_size=4096 f0 1M
  io qcow2 f0 "write -P 0x11 8k 8k"; scenario "prealloc-$p"
done
new datafile; img create -f qcow2 -o data_file=f1,cluster_size=4096 f0 1M
io qcow2 f0 "write -P 0x11 0 8k" "write -z 64k 8k" "write -P 0x22 100k 3k"; scenario datafile
new datafile-raw; img create -f qcow2 -o data_file=f1,data_file_raw=on,cluster_size=4096 f0 1M
io qcow2 f0 "write -P 0x11 0 8k" "write -z 64k 8k" "write -P 0x22 100k 3k"; scenario datafile-raw

# Chains: f0 -> f1 -> f2 (qcow2), f0 -> f1 (raw) with a spare f2, and the
# same with other cluster sizes and v2.
chain() { # chain NAME OPTS BASEFMT
  new "$1"
  if [ "$3" = raw ]; then
    img create -f raw f1 4M; io raw f1 "write -P 0x61 0 64k" "write -P 0x62 3M 8k"
    img create -f qcow2 -o cluster_size=65536 f2 4M; io qcow2 f2 "write -P 0x71 512k 64k"
  else
    img create -f qcow2 -o "$2" f2 4M; io qcow2 f2 "write -P 0x71 0 128k" "write -P 0x71 2M 4k" "write -c -P 0x72 3M 64k"
    img create -f qcow2 -o "$2" -b f2 -F qcow2 f1; io qcow2 f1 "write -P 0x61 1M 64k" "write -z 1536k 64k"
  fi
  img create -f qcow2 -o "$2" -b f1 -F "$3" f0
  io qcow2 f0 "write -P 0x51 0 4k" "write -P 0x52 1200k 16k" "write -z 3M 128k" "write -P 0x53 4090k 2k"
  scenario "$1"
}
chain chain-64k cluster_size=65536 qcow2
chain chain-512 cluster_size=512 qcow2
chain chain-v2 compat=0.10,cluster_size=4096 qcow2
chain chain-ext-l2 extended_l2=on,cluster_size=65536 qcow2
chain chain-raw cluster_size=65536 raw
chain chain-raw-4k cluster_size=4096 raw
# A top smaller and larger than its backing.
new chain-sizes; img create -f qcow2 -o cluster_size=4096 f1 1M; io qcow2 f1 "write -P 0x61 0 64k" "write -P 0x61 960k 64k"
img create -f qcow2 -o cluster_size=4096 -b f1 -F qcow2 f0 2M; io qcow2 f0 "write -P 0x51 900k 16k"
img create -f qcow2 -o cluster_size=4096 f2 3M; io qcow2 f2 "write -P 0x71 0 64k"
scenario chain-sizes
echo "$n scenarios in $corpus"
