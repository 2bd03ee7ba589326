#!/usr/bin/env bash
# How convert's cost grows with the data, for qcow and qemu-img side by side (issue 21):
# for each size, a qcow2 image of that much random data is converted to raw and back, by both
# tools, alternating, and each run's wall and CPU seconds (user + sys) and peak RSS are printed.
#
# With --memory-limit (a cgroup v1 or v2 memory limit, root only) every run is confined with its
# page cache to that much memory, and the source is evicted from the page cache first
# (posix_fadvise DONTNEED), so images larger than the limit are read from disk, as on a host
# whose page cache cannot hold them.
#
# With --sparse "G ..." a G GiB image holding only 1 GiB of data is converted the same way (rows
# labelled Gs1), to compare with the fully allocated 1 GiB image: the cost should follow the data.
#
# Usage: scripts/bench-scaling.sh [--sizes "1 4 16"] [--sparse "16"] [--reps N] [--memory-limit MIB]
#                                 [--low-disk] [--dir DIR]
# Sizes are GiB (--sizes "" runs none); DIR (default /tmp/qcow-scaling) needs about 3x the largest
# size free, 2x with --low-disk (all qcow2 -> raw rounds first, then raw -> qcow2 from the last
# one's output, the qcow2 source deleted). The work files are kept in DIR for the next run; delete
# DIR when done.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
sizes="1 4"
sparse=""
low_disk=""
reps=3
limit=""
dir=/tmp/qcow-scaling
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) sizes="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --sparse) sparse="$2"; shift 2 ;;
    --low-disk) low_disk=1; shift ;;
    --memory-limit) limit="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    *) echo "bench-scaling: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
qcow="$here/bin/qcow"
[ -x "$qcow" ] || { echo "bench-scaling: $qcow not found (npm run build first)" >&2; exit 2; }
command -v qemu-img >/dev/null || { echo "bench-scaling: qemu-img not found" >&2; exit 2; }
mkdir -p "$dir"

# A memory cgroup to run each command in (v2 if mounted as such, else v1's memory controller).
# It is made as a child of the cgroup this script runs in, not at the root of the hierarchy: on a
# host that confines its jobs to a cgroup (a container, a CI runner, a sandbox) moving the runs
# to the root would take them out of their job's accounting, or fail.
cg=""
if [ -n "$limit" ]; then
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    cg=/sys/fs/cgroup$(awk -F: '$1 == "0" { print $3 }' /proc/self/cgroup)
    cg=${cg%/}/qcow-scaling.$$
    file=memory.max
  elif [ -d /sys/fs/cgroup/memory ]; then
    cg=/sys/fs/cgroup/memory$(awk -F: '$2 == "memory" { print $3 }' /proc/self/cgroup)
    cg=${cg%/}/qcow-scaling.$$
    file=memory.limit_in_bytes
  else
    echo "bench-scaling: no memory cgroup found (neither v2 nor v1's memory controller)" >&2; exit 2
  fi
  mkdir "$cg" || { echo "bench-scaling: cannot make the cgroup $cg (root needed)" >&2; exit 2; }
  trap 'rmdir "$cg" 2>/dev/null || true' EXIT
  echo $((limit * 1048576)) > "$cg/$file" || { echo "bench-scaling: cannot set $cg/$file" >&2; exit 2; }
fi

evict() { python3 -c 'import os,sys
for f in sys.argv[1:]:
    fd=os.open(f,os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.close(fd)' "$@"; }

# One timed run: prints "wall cpu maxrss_mib".
timed() {
  local out
  if [ -n "$cg" ]; then
    out=$( { /usr/bin/time -f '%e %U %S %M' sh -c 'echo $$ > "$0/cgroup.procs"; shift; exec "$@"' "$cg" -- "$@" >/dev/null; } 2>&1 | tail -1)
  else
    out=$( { /usr/bin/time -f '%e %U %S %M' "$@" >/dev/null; } 2>&1 | tail -1)
  fi
  awk '{ printf "%.2f %.2f %.0f\n", $1, $2 + $3, $4 / 1024 }' <<<"$out"
}

# One convert by TOOL of SRC to OUT in FORMAT (the source evicted first), printed as a row of
# LABEL's table.
one() {
  local label="$1" tool="$2" format="$3" src="$4" out="$5" bin=qemu-img workload
  [ "$tool" = qcow ] && bin="$qcow"
  workload='qcow2->raw'; [ "$format" = qcow2 ] && workload='raw->qcow2'
  rm -f "$out"; sync
  evict "$src"
  printf '%-8s %-12s %-9s %s\n' "$label" "$workload" "$tool" "$(timed "$bin" convert -O "$format" "$src" "$out" | awk '{printf "%8s %8s %8s", $1, $2, $3}')"
}

# Converts IMG (qcow2) to raw and RAW to qcow2, REPS times, both tools taking turns; LABEL names
# the size in the first column. The 1-minute load average is printed before each round.
bench() {
  local label="$1" img="$2" raw="$3" r tool
  for r in $(seq "$reps"); do
    echo "# $label round $r, load $(cut -d' ' -f1-3 /proc/loadavg)"
    for tool in qemu-img qcow; do
      one "$label" "$tool" raw "$img" "$dir/out.raw"
      rm -f "$dir/out.raw"
      one "$label" "$tool" qcow2 "$raw" "$dir/out.qcow2"
      rm -f "$dir/out.qcow2"
    done
  done
}

# As bench, with two images of the size on disk at a time instead of three: all the qcow2 -> raw
# rounds first, from IMG alone; the last one's output then stands in for RAW (the same bytes)
# and IMG is deleted before the raw -> qcow2 rounds.
bench_low_disk() {
  local label="$1" img="$2" raw="$3" r tool
  rm -f "$raw"
  for r in $(seq "$reps"); do
    echo "# $label qcow2->raw round $r, load $(cut -d' ' -f1-3 /proc/loadavg)"
    for tool in qemu-img qcow; do
      one "$label" "$tool" raw "$img" "$dir/out.raw"
    done
  done
  mv "$dir/out.raw" "$raw"
  rm -f "$img"
  for r in $(seq "$reps"); do
    echo "# $label raw->qcow2 round $r, load $(cut -d' ' -f1-3 /proc/loadavg)"
    for tool in qemu-img qcow; do
      one "$label" "$tool" qcow2 "$raw" "$dir/out.qcow2"
    done
  done
  rm -f "$dir/out.qcow2"
}

printf '%-8s %-12s %-9s %8s %8s %8s\n' GiB workload tool wall_s cpu_s rss_MiB
for g in $sizes; do
  raw="$dir/src-$g.raw"; img="$dir/src-$g.qcow2"
  if [ ! -f "$img" ]; then
    [ -f "$raw" ] || head -c $((g * 1073741824)) /dev/urandom > "$raw"
    qemu-img convert -O qcow2 "$raw" "$img"
  fi
  if [ -n "$low_disk" ]; then
    bench_low_disk "$g" "$img" "$raw"
  else
    [ -f "$raw" ] || qemu-img convert -O raw "$img" "$raw"
    bench "$g" "$img" "$raw"
    rm -f "$dir/out.raw" "$dir/out.qcow2"
  fi
done
# The sparse image: G GiB virtual holding 1 GiB of random data in 16 extents of 64 MiB spread
# evenly over the disk, the rest never written (holes in the raw file, unallocated clusters in
# the qcow2). Its cost should be that of the 1 GiB image, not of a G GiB one.
for g in $sparse; do
  raw="$dir/sparse-$g.raw"; img="$dir/sparse-$g.qcow2"
  if [ ! -f "$img" ] || [ ! -f "$raw" ]; then
    rm -f "$raw"
    for i in $(seq 0 15); do
      dd if=/dev/urandom of="$raw" bs=1M count=64 seek=$((i * g * 64)) conv=notrunc status=none
    done
    truncate -s "${g}G" "$raw"
    qemu-img convert -O qcow2 "$raw" "$img"
  fi
  bench "${g}s1" "$img" "$raw"
  rm -f "$dir/out.raw" "$dir/out.qcow2"
done
