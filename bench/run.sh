#!/usr/bin/env bash
# keyfleet's benchmarks side by side (issue 6): rotation against Serf, the data
# path against raw AES-GCM, QR decoding against zbarimg.
#
#   bench/run.sh            full run: writes bench/results.md and bench/rotation.svg
#   bench/run.sh --quick    smoke test with small sizes: writes under target/keyfleet-bench/
#
# Other flags go to `keyfleet-bench run` (see `keyfleet-bench run --help`), e.g.
# `--only serf,keyfleet --sizes 10,50`. Needs Debian's `serf`, `zbar-tools` and
# `valgrind` (installed here when missing and we are root) and a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for a in "$@"; do [ "$a" = "--quick" ] && quick=1; done

install_pkg() { # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing $2 (for $1)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >/dev/null ||
            { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >/dev/null; }
    else
        echo "$1 is missing: install the Debian package $2 (apt-get install -y $2); its part is skipped" >&2
    fi
}
install_pkg serf serf
install_pkg zbarimg zbar-tools
install_pkg valgrind valgrind

echo "load before building: $(uptime)" >&2
t0=$(date +%s)
cargo build --release --quiet -p keyfleet --bins -p keyfleet-bench
echo "built in $(( $(date +%s) - t0 )) s; load: $(uptime)" >&2

target="${CARGO_TARGET_DIR:-target}"
out="$target/keyfleet-bench"
if [ "$quick" = 1 ]; then
    md="$out/results.md"; svg="$out/rotation.svg"; readme=()
else
    md=bench/results.md; svg=bench/rotation.svg; readme=(--readme README.md)
fi

"$target/release/keyfleet-bench" run --out "$out" --bin-dir "$target/release" "$@"
"$target/release/keyfleet-bench" report --json "$out/results.json" --md "$md" --svg "$svg" "${readme[@]}"
echo "wrote $md and $svg; load after: $(uptime)" >&2
