#!/usr/bin/env bash
# fuzz/run.sh SECONDS [TARGET...]
#
# Builds every fuzz target (nightly, libFuzzer, no sanitizer, debug
# assertions and overflow checks on) and runs each for SECONDS, two at a
# time, on its corpus (made by scripts/make-seeds.sh when missing). Crashes,
# time-outs (20 s an exec) and out-of-memory inputs are kept in
# fuzz/artifacts/TARGET and do not stop the run (libFuzzer's fork mode).
# Prints per target: executions, exec/s, crashes found in this run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(open_info map read check check_repair commit rebase convert writer)
fi
cd "$here/.."
command -v cargo-fuzz >/dev/null || { echo "cargo install cargo-fuzz first" >&2; exit 2; }
[ -d "$here/corpus/writer" ] || "$here/scripts/make-seeds.sh" "$here/corpus"
cargo +nightly fuzz build -s none -a >/dev/null 2>&1 || cargo +nightly fuzz build -s none -a
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

run_one() {
  local t=$1
  mkdir -p "$here/artifacts/$t" "$here/corpus/$t"
  ls "$here/artifacts/$t" | sort >"$logs/$t.before"
  # -rss_limit_mb: the allocator check fails first on the ops' own
  # allocations; this only catches what escapes it.
  cargo +nightly fuzz run -s none -a "$t" -- \
    -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
    -max_total_time="$secs" -timeout=20 -rss_limit_mb=6144 -print_final_stats=1 \
    >"$logs/$t.log" 2>&1 || true
  ls "$here/artifacts/$t" | sort >"$logs/$t.after"
}

i=0
for t in "${targets[@]}"; do
  run_one "$t" &
  i=$((i + 1))
  if [ $((i % 2)) -eq 0 ]; then wait; fi
done
wait

printf '%-14s %12s %8s %8s\n' target executions exec/s crashes
total=0
for t in "${targets[@]}"; do
  # Fork mode's status lines: "#N: cov: ... exec/s: R ... time: Ts ...".
  line=$(grep -E '^#[0-9]+: ' "$logs/$t.log" | tail -1 || true)
  execs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$line")
  rate=$(sed -nE 's/.*exec\/s: ([0-9]+).*/\1/p' <<<"$line")
  new=$(comm -13 "$logs/$t.before" "$logs/$t.after" | wc -l)
  printf '%-14s %12s %8s %8s\n' "$t" "${execs:-0}" "${rate:-0}" "$new"
  comm -13 "$logs/$t.before" "$logs/$t.after" | sed "s|^|    fuzz/artifacts/$t/|"
  total=$((total + ${execs:-0}))
done
echo "total executions: $total"
