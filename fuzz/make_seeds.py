#!/usr/bin/env python3
"""Writes the seed inputs of keyfleet's fuzz targets into fuzz/seeds/TARGET/.

The corpora in fuzz/corpus/ started from these (then `scripts/fuzz.sh cmin`
kept what adds coverage). Seeds come from the fixtures (fixtures/hid,
fixtures/serial) and from files made here in the formats keyfleet writes
(state files, secrets envelopes, sealed with the passphrase "fuzz" and cheap
Argon2id parameters). Needs python3 and `cryptography` (>= 44, for Argon2id).

    python3 fuzz/make_seeds.py && scripts/fuzz.sh seed

The wire, node and config seeds are made by the Rust targets themselves (the
genuine datagrams of a round from the protocol tests' controller, and
`Config::default_toml()`): `scripts/fuzz.sh seed` runs them with
FUZZ_WRITE_SEEDS set.
"""
import hashlib
import json
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
SEEDS = FUZZ / "seeds"


def put(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def hid():
    for rec in sorted((ROOT / "fixtures/hid").glob("*.hid")):
        text = rec.read_text()
        # hid-recorder's comment lines are most of a fixture's size and are skipped by the parser.
        lines = [l for l in text.splitlines() if not l.startswith("#")]
        put("hid_recording", rec.stem + ".hid", "# " + rec.name + "\n" + "\n".join(lines) + "\n")
        for l in lines:
            m = re.match(r"R: (\d+) (.*)", l)
            if m:
                put("hid_descriptor", rec.stem + ".desc", bytes.fromhex(m.group(2)))
    # The Rust hid-recorder's coloured output, two devices, a B: line.
    put("hid_recording", "rust_recorder.hid",
        "\x1b[31mR: 2 05 01\x1b[39m\nN: x\nI: 3 46d c52b\nB: 000000.000000 2 01 02 \n"
        "\x1b[31mE: 000000.000100 2 01 02 \x1b[39m\n")
    put("hid_recording", "two_devices.hid",
        "D: 0\nR: 1 05\nN: a\nD: 1\nR: 1 06\nN: b\nD: 0\nE: 000000.000001 1 aa\nD: 1\nE: 000000.000002 1 bb\n")
    # A mouse: a descriptor that is no scanner.
    put("hid_descriptor", "mouse.desc", bytes.fromhex(
        "05010902a1010509190129031500250195037501810295017505810105010930"
        "0931158125 7f750895028106c0".replace(" ", "")))


def serial():
    for cap in sorted((ROOT / "fixtures/serial").glob("*.bin")):
        put("serial_framer", cap.name, cap.read_bytes())


def statefile(payload):
    head = f"keyfleet-state v1 len={len(payload)} sha256={hashlib.sha256(payload).hexdigest()}\n"
    return head.encode() + payload


SECRETS = {
    "signing_seed": "11" * 32,
    "current": {"epoch": 7, "key": "07" * 32},
    "previous": {"epoch": 6, "key": "06" * 32},
    "initial_keys": [{"node_id": "node-a", "key": "a5" * 16}],
}


def envelope(seal=None, data=None):
    return json.dumps({"format": "keyfleet-secrets", "version": 1, "seal": seal, "data": data},
                      separators=(",", ":")).encode()


def secrets():
    plain = json.dumps(SECRETS, separators=(",", ":")).encode()
    unsealed = envelope(None, plain.hex())
    put("secrets", "unsealed.json", unsealed)
    put("secrets", "no_keys.json", envelope(None, json.dumps(
        {"signing_seed": "22" * 32, "current": None, "previous": None, "initial_keys": []}).encode().hex()))
    salt, nonce = bytes(range(16)), bytes(range(12))
    m, t, p = 64, 1, 1
    key = Argon2id(salt=salt, length=32, iterations=t, lanes=p, memory_cost=m).derive(b"fuzz")
    seal = {"kdf": "argon2id", "m_cost_kib": m, "t_cost": t, "p_cost": p, "salt": salt.hex(),
            "cipher": "aes-256-gcm", "nonce": nonce.hex()}
    aad = (f"keyfleet-secrets v1 argon2id m={m} t={t} p={p} salt={salt.hex()} "
           f"aes-256-gcm nonce={nonce.hex()}").encode()
    sealed = envelope(seal, AESGCM(key).encrypt(nonce, plain, aad).hex())
    put("secrets", "sealed_fuzz.json", sealed)
    put("statefile", "secrets.state", statefile(unsealed))
    put("statefile", "sealed.state", statefile(sealed))
    put("statefile", "agent.state", statefile(b'{"epoch":3}'))
    put("statefile", "empty.state", statefile(b""))


def copy(target, paths):
    for f in paths:
        put(target, f.name, f.read_bytes())


def drivers():
    """Labels, typed keys, mount tables, IR captures and keymaps."""
    copy("label_parse", sorted((ROOT / "fixtures/labels").glob("*.txt")))
    copy("label_parse", sorted((ROOT / "fixtures/file").glob("*.key")))
    copy("keyboard_replay", sorted((ROOT / "fixtures/keyboard").glob("*.log")))
    # /proc/self/mountinfo lines: octal escapes, optional fields, a FAT stick, a bind mount.
    put("mountinfo", "mountinfo.txt",
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "45 22 8:17 / /media/inst/KEY\\040STICK rw,nosuid,nodev shared:30 master:2 - vfat /dev/sdb1 rw,uid=1000\n"
        "46 22 0:40 /sub /mnt/b\\011ind ro - tmpfs tmpfs rw\n"
        "47 22 7:0 / /mnt/loop rw - ext4 /dev/loop0 rw\n")
    ir = ROOT / "fixtures/ir"
    # The captures are long; their first few KiB (a few frames) cover the same code.
    for f in sorted(p for p in ir.iterdir() if p.suffix in (".mode2", ".mode2m", ".irctl")):
        lines = f.read_text().splitlines(keepends=True)
        head = "".join(lines[:150])[:3000]
        put("ir_mode2", f.name, head[: head.rfind("\n") + 1] if "\n" in head else head)
    for f in sorted(ir.glob("*.irtoy")):
        put("ir_irtoy", f.name, f.read_bytes()[:4096])
    copy("ir_keymap", sorted((ir / "keymaps").glob("*.toml")))
    # ir-keytable's own keymaps (v4l-utils, GPL-2.0+; read here, not committed as such:
    # only what the corpus minimization keeps of them).
    copy("ir_keymap", sorted(Path("/lib/udev/rc_keymaps").glob("*.toml")))


if __name__ == "__main__":
    os.umask(0o022)
    hid()
    serial()
    secrets()
    drivers()
    for d in sorted(SEEDS.iterdir()):
        print(d.name, len(list(d.iterdir())), "seeds")
