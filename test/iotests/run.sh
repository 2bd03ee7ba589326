#!/usr/bin/env bash
# QEMU's own test suite (tests/qemu-iotests) through qcow's drop-in programs.
#
# QEMU's tests are GPL and are never committed here: this script downloads Debian's qemu source
# package with apt (adding a deb-src entry for the machine's suites when there is none), extracts
# only tests/qemu-iotests, and runs QEMU's `./check` twice per configuration on the tests in
# targets.txt: first with QEMU's real qemu-img/qemu-io (the baseline: a failure there is an
# environment problem, not ours), then with QEMU_IMG_PROG/QEMU_IO_PROG set to compat/qemu-img and
# compat/qemu-io. It fails when a test listed in passing.txt fails through qcow.
#
# With --vm it runs instead the tests of vm-targets.txt (gate: vm-passing.txt), those that start
# QEMU itself (qemu-system-x86_64, the VM and block layer: block jobs, snapshots, bitmaps, resize
# and exports through QMP) or its storage daemon, while our programs create, fill, check, compare
# and map the images before and after. Their Python half needs the source package's python/ folder
# too, so that run extracts both into a tree of its own ($QCOW_IOTESTS_DIR/vm).
#
# Usage: test/iotests/run.sh [--vm] [--config qcow2|qcow2-v2|qcow]... [--no-baseline] [TEST...]
#   QCOW_IOTESTS_DIR  where the extracted tests live (default: .cache/iotests in the repo)
#   QCOW_IOTESTS_JOBS parallel tests per run (default 2)
#   QCOW_IOTESTS_TIMEOUT  --vm only: seconds one test may take before it is killed, with the QEMU
#                     it started, and counted as failed (default 900)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=${QCOW_IOTESTS_DIR:-$root/.cache/iotests}
jobs=${QCOW_IOTESTS_JOBS:-2}
timeout=${QCOW_IOTESTS_TIMEOUT:-900}

configs=()
baseline=1
vm=0
only=()
while [ $# -gt 0 ]; do
  case $1 in
    --config) configs+=("$2"); shift 2 ;;
    --no-baseline) baseline=0; shift ;;
    --vm) vm=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) echo "iotests: unknown option $1" >&2; exit 2 ;;
    *) only+=("$1"); shift ;;
  esac
done
if [ $vm = 1 ]; then
  [ ${#configs[@]} -gt 0 ] || configs=(qcow2)
  # A tree of its own: QEMU's testenv.py finds python/ as ../../python from the tests.
  dir=$dir/vm
  iot=$dir/tests/qemu-iotests
  targets_file=$here/vm-targets.txt
  passing_file=$here/vm-passing.txt
else
  [ ${#configs[@]} -gt 0 ] || configs=(qcow2 qcow2-v2 qcow)
  iot=$dir/qemu-iotests
  targets_file=$here/targets.txt
  passing_file=$here/passing.txt
fi

# --- the tests: Debian's qemu source, tests/qemu-iotests (and python/ for --vm) only -----------
fetch_tests() {
  [ -x "$iot/check" ] && return 0
  command -v apt-get >/dev/null || { echo "iotests: apt-get is needed to download QEMU's tests" >&2; exit 1; }
  if ! apt-get source --help >/dev/null 2>&1 || ! grep -rqs '^Types:.*deb-src\|^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # A deb-src twin of every deb entry of the machine's own sources (same mirror, suites, keys).
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      grep -q '^Types: deb$' "$f" || continue
      sed 's/^Types: deb$/Types: deb-src/' "$f" > "/etc/apt/sources.list.d/qcow-src-$(basename "$f")"
    done
    if [ -f /etc/apt/sources.list ] && grep -q '^deb ' /etc/apt/sources.list; then
      sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/qcow-src.list
    fi
    apt-get update -qq
  fi
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get source --download-only qemu >/dev/null 2>&1) || { echo "iotests: apt-get source qemu failed" >&2; exit 1; }
  local tarball
  tarball=$(ls "$tmp"/qemu_*.orig.tar.* | head -n 1)
  mkdir -p "$dir"
  if [ $vm = 1 ]; then
    tar -xf "$tarball" -C "$tmp" --wildcards '*/tests/qemu-iotests/*' '*/python/*'
    rm -rf "$dir/tests" "$dir/python"
    mkdir -p "$dir/tests"
    mv "$tmp"/qemu-*/tests/qemu-iotests "$iot"
    mv "$tmp"/qemu-*/python "$dir/python"
  else
    tar -xf "$tarball" -C "$tmp" --wildcards '*/tests/qemu-iotests/*'
    rm -rf "$iot"
    mv "$tmp"/qemu-*/tests/qemu-iotests "$iot"
  fi
  rm -rf "$tmp"
}
fetch_tests

if [ $vm = 1 ]; then
  vm_prog=$(command -v qemu-system-x86_64) || { echo "iotests: --vm needs qemu-system-x86_64" >&2; exit 1; }
  qsd_prog=$(command -v qemu-storage-daemon) || { echo "iotests: --vm needs qemu-storage-daemon" >&2; exit 1; }
  # The tests start QEMU with -accel qtest (no guest code runs; QMP and the block layer do).
  # Debian's build has no qtest accelerator ("invalid accelerator qtest"), so QEMU comes through
  # a launcher that asks for TCG instead. Under qtest no guest code runs; under TCG the guest's
  # firmware (SeaBIOS) would run, and read the boot disk, again each minute as it retries the boot:
  # such a read reaching a blkdebug breakpoint a test set for its own request was held there, and
  # the next drain waited for it forever (030 and 055 hung so, with QEMU's programs as with ours).
  # So the guest gets a firmware of its own: 64 KiB of HLT, which stops the CPU at its first
  # instruction (interrupts are off at reset) and touches no device, as under qtest. The launcher
  # has QEMU's basename, which the tests' filters replace by QEMU_PROG.
  if ! "$vm_prog" -accel help 2>/dev/null | grep -qx qtest; then
    mkdir -p "$dir/bin"
    head -c 65536 /dev/zero | tr '\0' '\364' > "$dir/bin/halt.bin"
    {
      echo '#!/usr/bin/env bash'
      echo 'a=()'
      echo 'while [ $# -gt 0 ]; do'
      echo '  if [ "$1" = -accel ] && [ "${2-}" = qtest ]; then a+=(-accel tcg); shift 2; continue; fi'
      echo '  a+=("$1"); shift'
      echo 'done'
      echo "exec $vm_prog -bios $dir/bin/halt.bin \"\${a[@]}\""
    } > "$dir/bin/qemu-system-x86_64"
    chmod +x "$dir/bin/qemu-system-x86_64"
    vm_prog=$dir/bin/qemu-system-x86_64
  fi
else
  # These tests never start a VM or a storage daemon, but ./check insists that the programs exist.
  vm_prog=$dir/no-vm
  printf '#!/bin/sh\nexit 0\n' > "$vm_prog"
  chmod +x "$vm_prog"
  qsd_prog=$vm_prog
fi

# QEMU's tests write their images under TEST_DIR (./check's default: scratch/ beside the tests), and
# some (197, 215: blkdebug configurations) refuse to run when that path holds anything but letters,
# digits, '-', '_' and '/'. The default tree, .cache/iotests in the repo, has a dot, so such a tree
# gets a scratch folder of its own under /tmp, named after the tree so that runs of one tree reuse it.
scratch=$iot/scratch
case $scratch in
  *[!-_a-zA-Z0-9/]*)
    scratch=/tmp/qcow-iotests-$(printf '%s' "$iot" | cksum | cut -d' ' -f1)
    rm -rf "$scratch" && mkdir -p "$scratch" ;;
esac

read -r -a targets <<< "$(grep -v '^#' "$targets_file" | tr '\n' ' ')"
[ ${#only[@]} -gt 0 ] && targets=("${only[@]}")

passing_for() { sed -n "s/^$1:\(.*\)$/\1/p" "$passing_file"; }

# run_one LOG IMG_PROG IO_PROG TEST CHECK_ARGS...
# One ./check of one test in a session of its own, with TEST_DIR $scratch/TEST (as ./check -j N
# gives each test). ./check has no time limit, and a VM test can hang (055 once waited 15 minutes on
# a request held at a blkdebug breakpoint); after $timeout seconds the whole session (./check, the
# test, the QEMU and storage daemon it started) gets SIGTERM, then SIGKILL: a QEMU left behind
# would keep holding its image's lock and fail the tests after it. The log then says so in one line.
run_one() {
  local log=$1 img=$2 io=$3 t=$4
  shift 4
  mkdir -p "$scratch/$t"
  local rc=0 group=$scratch/$t.group
  rm -f "$group"
  # The new session's first process writes its id (that of the session and of its process group)
  # for the clean-up below, then becomes timeout, which signals its whole group when time is up.
  (cd "$iot" && TEST_DIR=$scratch/$t QEMU_PROG=$vm_prog QSD_PROG=$qsd_prog QEMU_IMG_PROG=$img \
      QEMU_IO_PROG=$io QEMU_NBD_PROG=$(command -v qemu-nbd) \
      setsid -w bash -c 'echo $$ > "$0"; exec timeout -k 10 "$@"' "$group" \
      "$timeout" ./check -j 1 "$@" "$t") > "$log" 2>&1 || rc=$?
  # Whatever of that group outlived ./check (a QEMU the test never shut down) goes now.
  [ ! -s "$group" ] || kill -KILL -- "-$(cat "$group")" 2>/dev/null || true
  rm -f "$group"
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    echo "$t  timed out after ${timeout}s (killed with the QEMU it started)" >> "$log"
    echo "iotests: $t timed out after ${timeout}s through $(basename "$(dirname "$img")")/$(basename "$img"); killed with the QEMU it started" >&2
  fi
}

# run_check_each LOG IMG_PROG IO_PROG CHECK_ARGS...: run_one for each test of `tests`, $jobs at a
# time, their logs joined into LOG in the order of `tests`.
run_check_each() {
  local log=$1 img=$2 io=$3
  shift 3
  local t running=0
  for t in "${tests[@]}"; do
    if [ $running -ge "$jobs" ]; then wait -n || true; running=$((running - 1)); fi
    run_one "$log.$t" "$img" "$io" "$t" "$@" &
    running=$((running + 1))
  done
  wait || true
  : > "$log"
  for t in "${tests[@]}"; do cat "$log.$t" >> "$log"; rm -f "$log.$t"; done
}

# run_check LABEL IMG_PROG IO_PROG CHECK_ARGS...
# Runs the tests of the array `tests` (all targets unless set otherwise). Sets NOTRUN (tests
# ./check skipped as not suitable for this configuration) and FAILED (every other test that
# ./check did not print as "NNN  pass", a crash of ./check itself included).
run_check() {
  local label=$1 img=$2 io=$3
  shift 3
  local log=$dir/$label.log
  if [ $vm = 1 ]; then
    run_check_each "$log" "$img" "$io" "$@"
  else
    (cd "$iot" && TEST_DIR=$scratch QEMU_PROG=$vm_prog QSD_PROG=$qsd_prog QEMU_IMG_PROG=$img QEMU_IO_PROG=$io \
        QEMU_NBD_PROG=$(command -v qemu-nbd) ./check -j "$jobs" "$@" "${tests[@]}") > "$log" 2>&1 || true
  fi
  local t
  NOTRUN=()
  FAILED=()
  for t in "${tests[@]}"; do
    # With one job, ./check writes a test's result on its "started" line (no newline between).
    # A test whose ./check was killed failed, even if it printed its pass before the time was up.
    if grep -Eq "(^|[[:space:]])$t +timed out " "$log"; then FAILED+=("$t")
    elif grep -Eq "(^|[[:space:]])$t +pass( |$)" "$log"; then :
    elif grep -Eq "(^|[[:space:]])$t +not run " "$log"; then NOTRUN+=("$t")
    else FAILED+=("$t"); fi
  done
}

status=0
total_pass=0
total_fail=0
for config in "${configs[@]}"; do
  case $config in
    qcow2) args=(-qcow2) ;;
    qcow2-v2) args=(-qcow2 -o compat=0.10) ;;
    qcow) args=(-qcow) ;;
    *) echo "iotests: unknown config $config" >&2; exit 2 ;;
  esac
  # Tests that declare themselves unsuitable for a configuration (a format or an option they do
  # not support) are not counted. With the baseline, that is what QEMU's run says.
  skip=()
  if [ $baseline = 1 ]; then
    tests=("${targets[@]}")
    run_check "$config-qemu" "$(command -v qemu-img)" "$(command -v qemu-io)" "${args[@]}"
    if [ ${#FAILED[@]} -gt 0 ]; then
      # QEMU's own qemu-img can fail by the machine's load alone: creating a LUKS image times its
      # key derivation and gives up with "Unable to get accurate CPU usage" on a busy CPU. Such
      # tests get one more run, alone; a failure that repeats is still the environment's.
      baseline_notrun=("${NOTRUN[@]}")
      tests=("${FAILED[@]}")
      echo "iotests $config: QEMU's own programs failed ${FAILED[*]}; running them again" >&2
      run_check "$config-qemu-again" "$(command -v qemu-img)" "$(command -v qemu-io)" "${args[@]}"
      NOTRUN+=("${baseline_notrun[@]}")
      # A test whose baseline failed only on that timing still runs through qcow and counts: the
      # baseline shows that QEMU's programs can run it here, and ours do not time key derivation
      # by thread CPU time.
      local_failed=()
      for t in "${FAILED[@]}"; do
        if grep -qs 'Unable to get accurate CPU usage' "$scratch/$t/$t.out.bad" "$scratch/$t.out.bad"; then
          echo "iotests $config: QEMU's own qemu-img could not time LUKS key derivation in $t (busy CPU); running it through qcow anyway" >&2
        else
          local_failed+=("$t")
        fi
      done
      FAILED=("${local_failed[@]}")
    fi
    # A test QEMU's own programs fail twice here says nothing about ours: it is left out of this
    # configuration, loudly, and the others still run through qcow (CI saw 046 fail twice with
    # QEMU's programs in compat=0.10 on a machine where it passes alone). More than a few such
    # failures mean the machine itself is broken, and fail the run.
    if [ ${#FAILED[@]} -gt 3 ]; then
      echo "iotests $config: QEMU's own programs fail ${FAILED[*]} (an environment problem; see $dir/$config-qemu.log)" >&2
      status=1
      continue
    fi
    [ ${#FAILED[@]} -eq 0 ] || echo "iotests $config: QEMU's own programs fail ${FAILED[*]} here, twice; left out of this configuration (see $dir/$config-qemu.log)" >&2
    skip=("${NOTRUN[@]}" "${FAILED[@]}")
  fi
  tests=("${targets[@]}")
  run_check "$config-qcow" "$root/compat/qemu-img" "$root/compat/qemu-io" "${args[@]}"
  [ $baseline = 1 ] || skip=("${NOTRUN[@]}")
  pass=()
  fail=()
  for t in "${targets[@]}"; do
    case " ${skip[*]} " in *" $t "*) continue ;; esac
    case " ${FAILED[*]} ${NOTRUN[*]} " in *" $t "*) fail+=("$t") ;; *) pass+=("$t") ;; esac
  done
  listed=" $(passing_for "$config") "
  regressions=()
  for t in "${fail[@]}"; do
    case $listed in *" $t "*) regressions+=("$t") ;; esac
  done
  newly=()
  for t in "${pass[@]}"; do
    case $listed in *" $t "*) ;; *) newly+=("$t") ;; esac
  done
  echo "iotests $config: $(( ${#pass[@]} )) of $(( ${#pass[@]} + ${#fail[@]} )) pass through qcow${skip:+ (left out: ${skip[*]}, unsuitable for this configuration or failing with QEMU programs too)}"
  echo "  passing: ${pass[*]:-none}"
  echo "  failing: ${fail[*]:-none}"
  [ ${#newly[@]} -eq 0 ] || echo "  passing but not yet in $(basename "$passing_file"): ${newly[*]}"
  if [ ${#regressions[@]} -gt 0 ]; then
    echo "  REGRESSIONS (listed in $(basename "$passing_file")): ${regressions[*]} (see $dir/$config-qcow.log and $scratch/*.out.bad)" >&2
    status=1
  fi
  total_pass=$((total_pass + ${#pass[@]} - ${#newly[@]}))
  total_fail=$((total_fail + ${#regressions[@]}))
done
# The gate: tests of passing.txt (vm-passing.txt with --vm) that passed, and those that regressed.
echo "iotests: $total_pass passed, $total_fail failed"
exit $status
