#!/usr/bin/env bash
# Checks that the udev rules beside this script parse.
#   - systemd >= 254: `udevadm verify` (full syntax and semantics check);
#   - older udevadm, as root: `udevadm test` loads the rules from a private
#     /run/udev/rules.d (a mount namespace, so the running system is not
#     touched) and any complaint about them fails the check.
# Exit 0: they parse; 1: they do not; 77: cannot check here (reason printed).
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)"
rules=("$dir"/*.rules)

if ! command -v udevadm >/dev/null; then
  echo "check-rules: SKIPPED: udevadm is not installed" >&2; exit 77
fi
if udevadm verify --help >/dev/null 2>&1; then
  exec udevadm verify --resolve-names=never "${rules[@]}"
fi
if [ "$(id -u)" -ne 0 ] || ! command -v unshare >/dev/null; then
  echo "check-rules: SKIPPED: udevadm $(udevadm --version) has no 'verify', and 'udevadm test' in a private namespace needs root and unshare" >&2
  exit 77
fi
device=/sys/devices/virtual/tty/tty
[ -e "$device" ] || device=$(ls -d /sys/class/*/* 2>/dev/null | head -1)
out=$(unshare -m bash -c '
  set -e
  mount -t tmpfs keyfleet-rules /run
  mkdir -p /run/udev/rules.d
  cp "$@" /run/udev/rules.d/
  udevadm test --action=add "'"$device"'" 2>&1 || true
' bash "${rules[@]}")
names=$(for r in "${rules[@]}"; do basename "$r"; done | paste -sd'|')
if ! grep -Eq "Reading rules file: /run/udev/rules.d/($names)" <<<"$out"; then
  echo "check-rules: udevadm did not read the rules:" >&2; echo "$out" >&2; exit 1
fi
complaints=$(grep -E "/run/udev/rules.d/($names):[0-9]+" <<<"$out" || true)
if [ -n "$complaints" ]; then
  echo "check-rules: udevadm complains:" >&2; echo "$complaints" >&2; exit 1
fi
echo "check-rules: ${rules[*]##*/} parse (udevadm $(udevadm --version) test)"
