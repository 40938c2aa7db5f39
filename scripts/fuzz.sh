#!/usr/bin/env bash
# Fuzz keyfleet's parsers of outside bytes (SPEC §7) with cargo-fuzz / libFuzzer.
#
#   scripts/fuzz.sh SECONDS [TARGET...]  build, then run each target (default: all) for SECONDS,
#                                        starting from its corpus in fuzz/corpus/TARGET
#   scripts/fuzz.sh cmin [TARGET...]     minimize the corpora (keep only inputs that add coverage)
#   scripts/fuzz.sh seed [TARGET...]     merge fuzz/seeds/TARGET (python3 fuzz/make_seeds.py) into the corpora
#   scripts/fuzz.sh list                 the targets
#
# Environment:
#   FUZZ_BUILD=release (default) optimized, AddressSanitizer, debug assertions and overflow checks
#   FUZZ_BUILD=quick   unoptimized, no sanitizer, no debug info (overflow checks stay): builds in
#                      a quarter of the CPU time and runs slower; CI's bounded pass
#   FUZZ_KEEP=1        merge what a run found into fuzz/corpus/TARGET (minimized); by default a
#                      run only reads the corpus, so the work tree stays clean
#   FUZZ_ARGS="..."    more libFuzzer flags (e.g. "-jobs=1" or "-max_len=65536")
#
# Exits 1 when a target crashed, leaked, ran out of memory or hung; the input is in
# fuzz/artifacts/TARGET/ and the libFuzzer log in fuzz/target/fuzz-logs/TARGET.log.
# Works on stable Rust: cargo-fuzz needs nightly flags (-Zsanitizer), which
# RUSTC_BOOTSTRAP=1 allows on a stable compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_DIR=fuzz
LOGS=$FUZZ_DIR/target/fuzz-logs

die() { echo "scripts/fuzz.sh: $*" >&2; exit 2; }

tools() {
  if ! rustc -V | grep -q nightly; then export RUSTC_BOOTSTRAP=1; fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "scripts/fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
  fi
  # libfuzzer-sys compiles libFuzzer (C++).
  if ! command -v c++ >/dev/null 2>&1; then
    echo "scripts/fuzz.sh: installing g++ (libFuzzer is C++)" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends g++ >/dev/null
  fi
}

all_targets() { cargo fuzz list --fuzz-dir "$FUZZ_DIR"; }

# The targets named (checked), or all; sets TARGETS.
TARGETS=()
pick() {
  local known t
  known=$(all_targets)
  if [ $# -eq 0 ]; then
    mapfile -t TARGETS <<<"$known"
    return
  fi
  for t in "$@"; do
    grep -qx -- "$t" <<<"$known" || die "no fuzz target $t (have: $(echo $known))"
  done
  TARGETS=("$@")
}

BUILD_FLAGS=()
PROFILE_DIR=
build() {
  case "${FUZZ_BUILD:-release}" in
    release) BUILD_FLAGS=(-O -a); PROFILE_DIR=release ;;
    quick) BUILD_FLAGS=(-D -s none); PROFILE_DIR=debug; export CARGO_PROFILE_DEV_DEBUG=0 ;;
    *) die "FUZZ_BUILD is release or quick, not ${FUZZ_BUILD}" ;;
  esac
  local start=$SECONDS
  cargo fuzz build --fuzz-dir "$FUZZ_DIR" "${BUILD_FLAGS[@]}" "$@"
  echo "scripts/fuzz.sh: built in $((SECONDS - start)) s (${FUZZ_BUILD:-release})" >&2
}

bin() { echo "$FUZZ_DIR/target/$(rustc -vV | sed -n 's/^host: //p')/$PROFILE_DIR/$1"; }

dict_flag() {
  if [ -f "$FUZZ_DIR/dict/$1.dict" ]; then echo "-dict=$FUZZ_DIR/dict/$1.dict"; fi
}

# Replace fuzz/corpus/$1 by a small subset of it and of the extra directories
# that covers every edge they cover: a set cover on edge coverage, hit counts
# ignored (-set_cover_merge=1 -use_counters=0), which keeps the corpora in the
# repo a few KiB each; a long local run rebuilds the finer features quickly.
merge() {
  local t=$1; shift
  local corpus=$FUZZ_DIR/corpus/$t out
  mkdir -p "$corpus"
  out=$(mktemp -d)
  "$(bin "$t")" -set_cover_merge=1 -use_counters=0 $(dict_flag "$t") "$out" "$corpus" "$@" >"$LOGS/$t.merge.log" 2>&1 ||
    { tail -20 "$LOGS/$t.merge.log" >&2; rm -rf "$out"; return 1; }
  rm -rf "$corpus"
  mv "$out" "$corpus"
  chmod 755 "$corpus"
  echo "$t: corpus $(ls "$corpus" | wc -l) files, $(du -sk --apparent-size "$corpus" | cut -f1) KiB" >&2
}

run() {
  local secs=$1
  local failed=() t new log status
  mkdir -p "$LOGS"
  printf '%-16s %10s %12s %8s  %s\n' target seconds executions exec/s result
  for t in "${TARGETS[@]}"; do
    mkdir -p "$FUZZ_DIR/corpus/$t" "$FUZZ_DIR/artifacts/$t"
    new=$(mktemp -d)
    log=$LOGS/$t.log
    # New inputs go to the first directory (a scratch one); the corpus is only read.
    status=0
    # shellcheck disable=SC2086
    "$(bin "$t")" -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$FUZZ_DIR/artifacts/$t/" $(dict_flag "$t") ${FUZZ_ARGS:-} \
      "$new" "$FUZZ_DIR/corpus/$t" >"$log" 2>&1 || status=$?
    local execs rate result
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    if [ "$status" -eq 0 ]; then
      result=ok
      if [ -n "${FUZZ_KEEP:-}" ] && [ -n "$(ls -A "$new")" ]; then merge "$t" "$new" || true; fi
    else
      result="FAILED ($(grep -m1 -oE 'ERROR: libFuzzer: [a-z -]+|SUMMARY: [A-Za-z]+: [a-z-]+|panicked at [^ ]+' "$log" || echo "exit $status"))"
      failed+=("$t")
    fi
    printf '%-16s %10s %12s %8s  %s\n' "$t" "$secs" "${execs:-?}" "${rate:-?}" "$result"
    rm -rf "$new"
  done
  if [ ${#failed[@]} -gt 0 ]; then
    for t in "${failed[@]}"; do
      echo "--- $t: $LOGS/$t.log" >&2
      grep -v '^#[0-9]' "$LOGS/$t.log" | grep -m1 -A25 -E 'panicked|ERROR:' >&2 || tail -25 "$LOGS/$t.log" >&2
      echo "reproduce: $(bin "$t") $(ls -t "$FUZZ_DIR/artifacts/$t"/* 2>/dev/null | head -1)" >&2
    done
    exit 1
  fi
}

case "${1:-}" in
  list) tools; all_targets ;;
  cmin)
    shift; tools; pick "$@"; build; mkdir -p "$LOGS"
    for t in "${TARGETS[@]}"; do merge "$t"; done ;;
  seed)
    shift; tools; pick "$@"; build; mkdir -p "$LOGS"
    for t in "${TARGETS[@]}"; do
      # Targets that make seeds in Rust (signed datagrams, the default config) write them
      # from their init when FUZZ_WRITE_SEEDS is set; the others ignore it.
      FUZZ_WRITE_SEEDS="$FUZZ_DIR/seeds/$t" "$(bin "$t")" -runs=0 >/dev/null 2>&1 || true
      if [ -d "$FUZZ_DIR/seeds/$t" ]; then merge "$t" "$FUZZ_DIR/seeds/$t"; fi
    done ;;
  '' | -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' ; exit 0 ;;
  *)
    [[ "$1" =~ ^[0-9]+$ ]] || die "usage: scripts/fuzz.sh SECONDS [TARGET...] | cmin | seed | list"
    secs=$1; shift
    tools; pick "$@"; build
    run "$secs" ;;
esac
