#!/usr/bin/env bash
# Builds the Debian package: target/debian/keyfleet_<version>-1_<arch>.deb.
#   scripts/package.sh            release build (what a user installs)
#   scripts/package.sh --dev      the debug programs `scripts/dev test` already
#                                 built in target/debug, as they are (CI: no second
#                                 build of every dependency; `cargo build` would
#                                 rebuild them without the tests' dev-dependency
#                                 features); built first when missing
# Installs cargo-deb (pinned) when it is missing. The man pages, completions
# and default config are generated from the built programs themselves, so
# they always match the one clap definition and Config::default_toml.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DEB_VERSION=3.8.0

profile=release
case "${1:-}" in
  --dev) profile=dev ;;
  "") ;;
  *) echo "usage: scripts/package.sh [--dev]" >&2; exit 2 ;;
esac
dir=$([ "$profile" = dev ] && echo debug || echo release)

if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi

kf=target/$dir/keyfleet
agent=target/$dir/keyfleet-agent
# Both programs (keyfleet-agent needs the `drivers` feature, on by default).
if [ "$profile" = release ] || [ ! -x "$kf" ] || [ ! -x "$agent" ]; then
  cargo build --locked --profile "$profile" --bins
fi

out=target/package
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$kf" man "$out/man"
"$agent" man "$out/man"
gzip -9n "$out"/man/*.1
for prog in keyfleet keyfleet-agent; do
  bin=target/$dir/$prog
  "$bin" completions bash > "$out/completions/$prog.bash"
  "$bin" completions zsh > "$out/completions/_$prog"
  "$bin" completions fish > "$out/completions/$prog.fish"
done
"$kf" config --print-default > "$out/config.toml"

# cargo-deb takes the binaries from target/release/ in [package.metadata.deb];
# --profile points it at target/debug/ for --dev.
fast=()
[ "$profile" = dev ] && fast=(--fast)
cargo deb --no-build --locked --profile "$profile" --no-dbgsym "${fast[@]}"
ls -l target/debian/*.deb
