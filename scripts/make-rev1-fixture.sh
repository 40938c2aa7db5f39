#!/bin/sh
# Writes fixtures/rev1/: a controller state directory (controller.secrets,
# fleet.db) and one agent's state.json as wire/state revision 1 left them,
# after the agent joined and one rekey round. Run with the binaries of a
# revision-1 build (main before issue 17, commit 2bc0f6e):
#   scripts/make-rev1-fixture.sh /path/to/rev1/target/debug
# The initial key is fixed (fixtures/rev1/node-00.key) so that the test can
# start the new agent with it; it protects nothing but this fixture.
set -eu
BIN=${1:?give the directory of revision-1 keyfleet and keyfleet-agent}
OUT=$(cd "$(dirname "$0")/.." && pwd)/fixtures/rev1
W=$(mktemp -d)
AG=; SV=
trap 'kill $AG $SV 2>/dev/null || true; rm -rf "$W"' EXIT
# 00112233445566778899aabbccddeeff and its CRC-16/X-25 (little-endian).
FORM=$(python3 - <<'PY'
k = bytes.fromhex("00112233445566778899aabbccddeeff")
crc = 0xFFFF
for b in k:
    crc ^= b
    for _ in range(8):
        crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
crc ^= 0xFFFF
print((k + crc.to_bytes(2, "little")).hex().upper())
PY
)
PORT=47911
cat > "$W/keyfleet.toml" <<T
[network]
group = "239.255.211.7:47912"
iface = "127.0.0.1"
listen_port = $PORT
T
mkdir -m 700 -p "$W/agent"
printf '%s\n' "$FORM" > "$W/node-00.key"
chmod 600 "$W/node-00.key"
K="$BIN/keyfleet --state $W/controller --config $W/keyfleet.toml"
$K init >/dev/null
$K enroll --node-id node-00 --addr 127.0.0.1:47913 --key "$FORM" >/dev/null
$K serve 2>"$W/serve.log" & SV=$!
sleep 1
"$BIN/keyfleet-agent" run --state "$W/agent" --node-id node-00 --initial-key-file "$W/node-00.key" \
  --group 239.255.211.7:47912 --iface 127.0.0.1 --listen 127.0.0.1:47913 --controller 127.0.0.1:$PORT \
  2>"$W/agent.log" & AG=$!
sleep 2
$K rekey >/dev/null
sleep 1
kill $AG; wait $AG 2>/dev/null || true
kill $SV; wait $SV 2>/dev/null || true
AG=; SV=
mkdir -p "$OUT"
cp "$W/controller/controller.secrets" "$W/controller/fleet.db" "$W/agent/state.json" "$W/node-00.key" "$OUT/"
$K status --json > "$OUT/status.json"
echo "wrote $OUT"
