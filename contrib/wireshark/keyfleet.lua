-- keyfleet.lua: a Wireshark dissector for keyfleet's wire format (version 3,
-- and the two layouts of version 2).
--
-- Every message of core/src/wire/mod.rs (its table is the reference; docs/wire-v2.md
-- assigns the type codes) gets a field for every field on the wire, so that
-- each can be filtered: keyfleet.type, keyfleet.epoch, keyfleet.seq,
-- keyfleet.member, keyfleet.phase, keyfleet.entry.member, ... (`tshark -G
-- fields -X lua_script:keyfleet.lua | grep keyfleet` lists them, with the
-- expert infos). Datagrams that are short, carry
-- trailing bytes or an invalid value get expert info (group Malformed) that
-- says what was wrong, in the words of the library's WireError; another
-- version or an unknown type gets expert info of its own.
--
-- Version 3 (what keyfleet speaks now) and the two layouts of version 2 are
-- decoded (preference "Wire layout"):
--   handshake  what keyfleet speaks now, as the library decodes it (the key
--              update and transition requests of version 3, every other
--              message of version 2, its layout unchanged): the Noise NNpsk0
--              handshake init 0x17 and answer 0x09 (issue 17); the key update
--              request 0x02 and key response 0x05 carry the controller's
--              X25519 share, the replies 0x11-0x13 and the key request 0x14
--              the node's; the key update request carries the round's
--              transition commitment and the transition requests 0x03 / 0x04
--              their reveals (issue 11); the notices 0x0A / 0x0B / 0x0C
--              and the timed first transition reply 0x18 (session 14: the
--              first transition reply and how long its request waited at the
--              node) exist only here, of version 3;
--   join       version 2 before issue 17: join 0x15, join accept 0x06, no
--              X25519 shares;
--   auto       (the default) version 3, and version 2 in both its layouts:
--              the type code tells join from handshake, and for 0x02, 0x05
--              and 0x11-0x14 the datagram's length tells whether a share is
--              there (the layouts never share a length).
--
-- Registered on the UDP ports of the preference "UDP ports" (default: the
-- group port and the controller's unicast port of `keyfleet config
-- --print-default`) and as a heuristic dissector on UDP, so that the agents'
-- own unicast ports and fleets on other ports decode too: a datagram is
-- claimed when it starts with a version and a known type of the layout and decodes whole
-- (every length and value as the library checks them).
--
-- Use:  tshark -X lua_script:contrib/wireshark/keyfleet.lua -r capture.pcap -Y keyfleet
-- or copy this file to ~/.local/lib/wireshark/plugins/.
--
-- Answers point at their requests (keyfleet.request_in, keyfleet.response_time;
-- a key response at its key request, a join accept or handshake answer at its
-- join, a node's reply at the round's request) and, from the second pass on
-- (Wireshark, tshark -2), requests at their answers (keyfleet.response_in).
--
-- Nothing is decrypted or verified: signatures, MACs, wrapped keys and sealed
-- data are shown as bytes.

set_plugin_info({
    version = "3.0.0",
    description = "keyfleet wire version 3, and both layouts of version 2 (join, handshake)",
    repository = "contrib/wireshark/keyfleet.lua in the keyfleet repository",
})

local kf = Proto("keyfleet", "keyfleet group key protocol")

-- The library's version, and the one before it. Each message carries the
-- version its own layout last changed in: 3 for the key update and
-- transition requests (the transition chain) and for the messages version 3
-- added (the notices, the timed first transition reply), 2 for every other
-- message.
local VERSION, VERSION_2 = 3, 2
local REVEAL_LEN = 32
local SIG_LEN, MAC_LEN, WRAPPED_LEN, NONCE_LEN, TAG_LEN, SHARE_LEN = 64, 16, 60, 12, 16, 32
local KEY_LEN = 32
local ENTRY_LEN = 4 + WRAPPED_LEN
local MAX_USAGE_ENTRIES = 4
-- The Noise messages of issue 17: init = e 32 + tag 16; the
-- answer's encrypted payload is term, seq, member, controller key, current epoch
-- and key, round flag [round epoch, phase, round key].
local HS_INIT_NOISE = 32 + 16
local HS_ANSWER_MIN = 32 + 4 + 8 + 4 + 32 + 4 + KEY_LEN + 1 + 16
local HS_ANSWER_MAX = HS_ANSWER_MIN + 4 + 1 + KEY_LEN

local T = {
    DATA = 0x01,
    KEY_UPDATE = 0x02,
    FIRST_TRANSITION = 0x03,
    SECOND_TRANSITION = 0x04,
    KEY_RESPONSE = 0x05,
    JOIN_ACCEPT = 0x06,
    RESYNC = 0x07,
    BEACON = 0x08,
    HANDSHAKE_ANSWER = 0x09,
    SHARE_NOTICE = 0x0A,
    ROUND_NOTICE = 0x0B,
    TIMED_ROUND_NOTICE = 0x0C,
    KEY_UPDATE_REPLY = 0x11,
    FIRST_REPLY = 0x12,
    SECOND_REPLY = 0x13,
    KEY_REQUEST = 0x14,
    JOIN = 0x15,
    USAGE_REPORT = 0x16,
    HANDSHAKE_INIT = 0x17,
    TIMED_FIRST_REPLY = 0x18,
}

local type_names = {
    [T.DATA] = "Data",
    [T.KEY_UPDATE] = "Key update request",
    [T.FIRST_TRANSITION] = "First transition request",
    [T.SECOND_TRANSITION] = "Second transition request",
    [T.KEY_RESPONSE] = "Key response",
    [T.JOIN_ACCEPT] = "Join accept",
    [T.RESYNC] = "Resync request",
    [T.BEACON] = "Beacon",
    [T.HANDSHAKE_ANSWER] = "Handshake answer",
    [T.SHARE_NOTICE] = "Share notice",
    [T.ROUND_NOTICE] = "Round notice",
    [T.TIMED_ROUND_NOTICE] = "Timed round notice",
    [T.KEY_UPDATE_REPLY] = "Key update reply",
    [T.FIRST_REPLY] = "First transition reply",
    [T.SECOND_REPLY] = "Second transition reply",
    [T.KEY_REQUEST] = "Key request",
    [T.JOIN] = "Join",
    [T.USAGE_REPORT] = "Usage report",
    [T.HANDSHAKE_INIT] = "Handshake init",
    [T.TIMED_FIRST_REPLY] = "Timed first transition reply",
}

-- Who sends each type.
local controller_types = {
    [T.KEY_UPDATE] = true, [T.FIRST_TRANSITION] = true, [T.SECOND_TRANSITION] = true,
    [T.KEY_RESPONSE] = true, [T.JOIN_ACCEPT] = true, [T.RESYNC] = true,
    [T.BEACON] = true, [T.HANDSHAKE_ANSWER] = true, [T.SHARE_NOTICE] = true,
    [T.ROUND_NOTICE] = true, [T.TIMED_ROUND_NOTICE] = true,
}

-- The layouts (preference values) and the type codes each one has.
local LAYOUT_AUTO, LAYOUT_JOIN, LAYOUT_HANDSHAKE = 0, 1, 2
local layout_names = {
    [LAYOUT_JOIN] = "version 2 (join 0x15 / join accept 0x06, no X25519 shares)",
    [LAYOUT_HANDSHAKE] = "issue 17 (Noise handshake 0x17 / 0x09, X25519 shares; version 3: and the transition commitment and reveals)",
}
local common_types = {
    T.DATA, T.KEY_UPDATE, T.FIRST_TRANSITION, T.SECOND_TRANSITION, T.KEY_RESPONSE,
    T.RESYNC, T.BEACON, T.KEY_UPDATE_REPLY, T.FIRST_REPLY, T.SECOND_REPLY,
    T.KEY_REQUEST, T.USAGE_REPORT,
}
local known = { [LAYOUT_JOIN] = {}, [LAYOUT_HANDSHAKE] = {}, [LAYOUT_AUTO] = {} }
for _, t in ipairs(common_types) do
    known[LAYOUT_JOIN][t] = true
    known[LAYOUT_HANDSHAKE][t] = true
    known[LAYOUT_AUTO][t] = true
end
for _, t in ipairs({ T.JOIN, T.JOIN_ACCEPT }) do
    known[LAYOUT_JOIN][t] = true
    known[LAYOUT_AUTO][t] = true
end
for _, t in ipairs({ T.HANDSHAKE_INIT, T.HANDSHAKE_ANSWER, T.SHARE_NOTICE, T.ROUND_NOTICE,
    T.TIMED_ROUND_NOTICE, T.TIMED_FIRST_REPLY }) do
    known[LAYOUT_HANDSHAKE][t] = true
    known[LAYOUT_AUTO][t] = true
end
-- Types whose layout differs between join and handshake with the same code.
local share_types = {
    [T.KEY_UPDATE] = true, [T.KEY_RESPONSE] = true, [T.KEY_UPDATE_REPLY] = true,
    [T.FIRST_REPLY] = true, [T.SECOND_REPLY] = true, [T.KEY_REQUEST] = true,
}

local phase_names = {
    [0] = "no round",
    [1] = "distributing",
    [2] = "first transition",
    [3] = "draining",
    [4] = "second transition",
}
local step_names = {
    [1] = "key update",
    [2] = "first transition",
    [3] = "second transition",
}
local family_names = { [4] = "IPv4", [6] = "IPv6" }
local role_names = { [0] = "node", [1] = "controller" }

-- ---------------------------------------------------------------- fields

local F = {
    version = ProtoField.uint8("keyfleet.version", "Version", base.DEC),
    type = ProtoField.uint8("keyfleet.type", "Type", base.HEX, type_names),
    role = ProtoField.uint8("keyfleet.sender_role", "Sent by", base.DEC, role_names),
    layout = ProtoField.uint8("keyfleet.layout", "Layout", base.DEC, layout_names),
    epoch = ProtoField.uint32("keyfleet.epoch", "Epoch", base.DEC),
    seq = ProtoField.uint64("keyfleet.seq", "Sequence number", base.DEC),
    member = ProtoField.uint32("keyfleet.member", "Member", base.DEC),
    term = ProtoField.uint32("keyfleet.term", "Leader term", base.DEC),
    in_reply_to = ProtoField.uint64("keyfleet.in_reply_to", "In reply to (sequence number)", base.DEC),
    step = ProtoField.uint8("keyfleet.step", "Step", base.DEC, step_names),
    phase = ProtoField.uint8("keyfleet.phase", "Round phase", base.DEC, phase_names),
    round_epoch = ProtoField.uint32("keyfleet.round_epoch", "Round epoch", base.DEC),
    -- data
    data_flags = ProtoField.uint8("keyfleet.data.flags", "Flags", base.HEX),
    data_flag_epoch = ProtoField.bool("keyfleet.data.flags.epoch", "Epoch hint present", 8, nil, 0x01),
    sender = ProtoField.uint32("keyfleet.sender", "Sender (member)", base.DEC),
    nonce = ProtoField.bytes("keyfleet.data.nonce", "Nonce"),
    ciphertext = ProtoField.bytes("keyfleet.data.ciphertext", "Ciphertext"),
    data_tag = ProtoField.bytes("keyfleet.data.tag", "AES-GCM tag"),
    -- key update request
    first = ProtoField.uint32("keyfleet.batch.first", "First member", base.DEC),
    last = ProtoField.uint32("keyfleet.batch.last", "Last member", base.DEC),
    count = ProtoField.uint16("keyfleet.batch.count", "Entries", base.DEC),
    entry = ProtoField.none("keyfleet.entry", "Entry"),
    entry_member = ProtoField.uint32("keyfleet.entry.member", "Member", base.DEC),
    entry_key = ProtoField.bytes("keyfleet.entry.key", "Wrapped round key"),
    -- X25519 shares (issue 17)
    controller_share = ProtoField.bytes("keyfleet.controller_share", "Controller X25519 share"),
    node_share = ProtoField.bytes("keyfleet.node_share", "Node X25519 share"),
    -- the transition chain (version 3)
    commitment = ProtoField.bytes("keyfleet.commitment", "Transition commitment"),
    reveal = ProtoField.bytes("keyfleet.reveal", "Transition reveal"),
    -- timed first transition reply (session 14)
    held_us = ProtoField.uint32("keyfleet.held_us", "Held (µs)", base.DEC),
    -- key state (key response, join accept)
    key_state = ProtoField.none("keyfleet.key_state", "Key state"),
    current_key = ProtoField.bytes("keyfleet.key_state.current_key", "Wrapped current key"),
    round_flag = ProtoField.uint8("keyfleet.key_state.round", "Round in progress", base.DEC),
    round_key = ProtoField.bytes("keyfleet.key_state.round_key", "Wrapped round key"),
    controller_key = ProtoField.bytes("keyfleet.controller_key", "Controller public key (Ed25519)"),
    -- wrapped keys: nonce || AES-256-GCM(key) || tag
    wrap_nonce = ProtoField.bytes("keyfleet.wrapped.nonce", "Nonce"),
    wrap_ct = ProtoField.bytes("keyfleet.wrapped.ciphertext", "Encrypted key"),
    wrap_tag = ProtoField.bytes("keyfleet.wrapped.tag", "Tag"),
    -- beacon
    addr = ProtoField.none("keyfleet.controller_addr", "Controller unicast address"),
    family = ProtoField.uint8("keyfleet.controller_addr.family", "Family", base.DEC, family_names),
    ipv4 = ProtoField.ipv4("keyfleet.controller_addr.ipv4", "IPv4 address"),
    ipv6 = ProtoField.ipv6("keyfleet.controller_addr.ipv6", "IPv6 address"),
    port = ProtoField.uint16("keyfleet.controller_addr.port", "Port", base.DEC),
    -- join, handshake init
    node_id_len = ProtoField.uint8("keyfleet.node_id_len", "Node id length", base.DEC),
    node_id = ProtoField.string("keyfleet.node_id", "Node id"),
    -- usage report
    usage_count = ProtoField.uint8("keyfleet.usage.count", "Key-use entries", base.DEC),
    usage = ProtoField.none("keyfleet.usage", "Key use"),
    usage_epoch = ProtoField.uint32("keyfleet.usage.epoch", "Epoch", base.DEC),
    usage_seals = ProtoField.uint64("keyfleet.usage.seals", "Encryptions", base.DEC),
    usage_opens = ProtoField.uint64("keyfleet.usage.opens", "Decryptions", base.DEC),
    -- Noise (issue 17)
    noise_e = ProtoField.bytes("keyfleet.noise.e", "Noise ephemeral key"),
    noise_payload = ProtoField.bytes("keyfleet.noise.payload", "Noise encrypted payload"),
    noise_tag = ProtoField.bytes("keyfleet.noise.tag", "Noise tag"),
    -- requests and their answers (generated)
    request_in = ProtoField.framenum("keyfleet.request_in", "Request in", base.NONE, frametype.REQUEST),
    response_in = ProtoField.framenum("keyfleet.response_in", "Response in", base.NONE, frametype.RESPONSE),
    response_time = ProtoField.relative_time("keyfleet.response_time", "Time since request"),
    -- authenticators
    signature = ProtoField.bytes("keyfleet.signature", "Ed25519 signature"),
    mac = ProtoField.bytes("keyfleet.mac", "HMAC-SHA256 tag (16 bytes)"),
}
local field_list = {}
for _, f in pairs(F) do
    table.insert(field_list, f)
end
kf.fields = field_list

local E = {
    short = ProtoExpert.new("keyfleet.short", "keyfleet: datagram too short",
        expert.group.MALFORMED, expert.severity.ERROR),
    trailing = ProtoExpert.new("keyfleet.trailing", "keyfleet: unexpected bytes after the message",
        expert.group.MALFORMED, expert.severity.ERROR),
    invalid = ProtoExpert.new("keyfleet.invalid", "keyfleet: invalid field value",
        expert.group.MALFORMED, expert.severity.ERROR),
    version = ProtoExpert.new("keyfleet.bad_version", "keyfleet: unsupported wire version",
        expert.group.PROTOCOL, expert.severity.ERROR),
    unknown_type = ProtoExpert.new("keyfleet.unknown_type", "keyfleet: unknown message type",
        expert.group.PROTOCOL, expert.severity.ERROR),
}
kf.experts = { E.short, E.trailing, E.invalid, E.version, E.unknown_type }

-- ---------------------------------------------------------------- preferences

local DEFAULT_PORTS = "7777,47800"
kf.prefs.ports = Pref.range("UDP ports", DEFAULT_PORTS,
    "UDP ports decoded as keyfleet: the group port (network.group, default 7777) and the " ..
    "controller's unicast port (network.listen_port, default 47800). Other ports are found " ..
    "by the heuristic dissector.", 65535)
kf.prefs.layout = Pref.enum("Wire layout", LAYOUT_AUTO,
    "Which revision of the wire to decode: auto (version 3, and version 2 in both layouts; " ..
    "0x02, 0x05, 0x11-0x14 by length), join (version 2: join 0x15 / join accept 0x06, no X25519 " ..
    "shares) or handshake (as keyfleet speaks it now: version 3's key update and transition " ..
    "requests, notices and timed first transition reply, every other message of version 2).", {
        { 1, "auto", LAYOUT_AUTO },
        { 2, "join", LAYOUT_JOIN },
        { 3, "handshake", LAYOUT_HANDSHAKE },
    }, false)

-- ---------------------------------------------------------------- parsing
--
-- A datagram is parsed into a tree of items {f, off, len, kids, gen, value}
-- and at most one error {expert, off, len, text}, without touching the
-- protocol tree; the heuristic uses the error alone, the dissector draws the
-- items. Every read is bounds-checked first, so no tvb access can raise.

local R = {}
R.__index = R

local function new_reader(tvb, stop)
    local root = {}
    return setmetatable({ tvb = tvb, pos = 2, stop = stop, root = root, cur = root,
        stack = {}, err = nil, info = {}, vals = {} }, R)
end

function R:fail(kind, off, len, text)
    if not self.err then
        self.err = { expert = kind, off = off, len = len, text = text }
    end
end

-- Whether n more bytes are there; records a truncation error when not.
function R:need(n, what)
    if self.err then
        return false
    end
    local have = self.stop - self.pos
    if have < 0 then
        have = 0
    end
    if n > have then
        self:fail("short", self.pos, have,
            string.format("%s truncated: needs %d bytes, %d left", what, n, have))
        return false
    end
    return true
end

-- Reads a field of n bytes; kind "u" (n <= 4), "u64", "raw" or "none".
-- Returns its value (a number, a UInt64, a Lua string of the bytes, or true)
-- or nil after an error.
function R:field(f, n, what, kind)
    if not self:need(n, what) then
        return nil
    end
    local off = self.pos
    self.pos = off + n
    table.insert(self.cur, { f = f, off = off, len = n })
    if n == 0 then
        return kind == "raw" and "" or true
    end
    local range = self.tvb:range(off, n)
    if kind == "u" then
        return range:uint()
    elseif kind == "u64" then
        return range:uint64()
    elseif kind == "raw" then
        return range:raw()
    end
    return true
end

function R:u8(f, what) return self:field(f, 1, what, "u") end
function R:u16(f, what) return self:field(f, 2, what, "u") end
function R:u32(f, what) return self:field(f, 4, what, "u") end
function R:u64(f, what) return self:field(f, 8, what, "u64") end
function R:bytes(f, n, what) return self:field(f, n, what, "none") end

-- A generated field (not on the wire) under the current item.
function R:generated(f, value)
    table.insert(self.cur, { f = f, gen = true, value = value })
end

-- Opens a subtree item starting here; its length is set by close().
function R:open(f)
    local item = { f = f, off = self.pos, kids = {} }
    table.insert(self.cur, item)
    table.insert(self.stack, self.cur)
    self.cur = item.kids
    return item
end

function R:close(item)
    item.len = self.pos - item.off
    self.cur = table.remove(self.stack)
end

-- A wrapped key: nonce || encrypted key || tag, as one field with three parts.
function R:wrapped(f, what)
    if not self:need(WRAPPED_LEN, what) then
        return nil
    end
    local item = { f = f, off = self.pos, len = WRAPPED_LEN, kids = {} }
    table.insert(self.cur, item)
    local o = self.pos
    table.insert(item.kids, { f = F.wrap_nonce, off = o, len = NONCE_LEN })
    table.insert(item.kids, { f = F.wrap_ct, off = o + NONCE_LEN, len = KEY_LEN })
    table.insert(item.kids, { f = F.wrap_tag, off = o + NONCE_LEN + KEY_LEN, len = TAG_LEN })
    self.pos = o + WRAPPED_LEN
    return true
end

-- No bytes may be left before the authenticator.
function R:done()
    if self.err then
        return
    end
    local left = self.stop - self.pos
    if left > 0 then
        self:fail("trailing", self.pos, left,
            string.format("%d unexpected bytes after the message", left))
    end
end

function R:note(s)
    table.insert(self.info, s)
end

-- The node id of a join or handshake init: length u8, 1-64 characters of
-- A-Z a-z 0-9 . _ - (wire::NodeId).
local function node_id(r)
    local id_off = r.pos
    local len = r:u8(F.node_id_len, "node id length")
    if not len then
        return
    end
    if not r:need(len, "node id") then
        return
    end
    local off = r.pos
    local raw = r:field(F.node_id, len, "node id", "raw")
    -- shown as read, bytes outside printable ASCII escaped (a NUL would end
    -- the string field early)
    r.cur[#r.cur].value = raw:gsub("[^\32-\126]", function(c)
        return string.format("\\x%02x", c:byte())
    end)
    if len == 0 or len > 64 then
        r:fail("invalid", id_off, 1 + len,
            string.format("node id invalid: a node id has 1 to 64 characters, this one has %d", len))
        return
    end
    for i = 1, #raw do
        local b = raw:byte(i)
        local ok = (b >= 0x30 and b <= 0x39) or (b >= 0x41 and b <= 0x5a) or (b >= 0x61 and b <= 0x7a)
            or b == 0x2e or b == 0x5f or b == 0x2d
        if not ok then
            r:fail("invalid", off + i - 1, 1,
                string.format("node id invalid: a node id uses only A-Z a-z 0-9 . _ - ; found byte 0x%02x", b))
            return
        end
    end
    r:note("id " .. raw)
end

-- Key state (key response, join accept): current key wrapped, round u8 and,
-- if 1, round epoch u32, phase u8 (1-4), round key wrapped.
local function key_state(r)
    local ks = r:open(F.key_state)
    r:wrapped(F.current_key, "wrapped current key")
    local flag_off = r.pos
    local flag = r:u8(F.round_flag, "round flag")
    if flag == 1 then
        local re = r:u32(F.round_epoch, "round epoch")
        local ph_off = r.pos
        local ph = r:u8(F.phase, "round phase")
        if ph and (ph < 1 or ph > 4) then
            r:fail("invalid", ph_off, 1, string.format("round phase has the invalid value %d", ph))
        end
        r:wrapped(F.round_key, "wrapped round key")
        if re and ph and not r.err then
            r:note(string.format("round %d %s", re, phase_names[ph]))
        end
    elseif flag then
        if flag ~= 0 then
            r:fail("invalid", flag_off, 1, string.format("round flag has the invalid value %d", flag))
        end
    end
    r:close(ks)
end

-- Splits off a trailing authenticator of n bytes (wire::split_auth): the body
-- ends before it. Returns the reader or nil (then err is set on it).
local function split_auth(tvb, len, n, what)
    if len < 2 + n then
        local r = new_reader(tvb, len)
        r:fail("short", 0, len,
            string.format("%s truncated: needs %d bytes, %d left", what, 2 + n, len))
        return r, false
    end
    return new_reader(tvb, len - n), true
end

-- The leader term every controller message starts with (issue 16): 1 or
-- more, 0 is no leader's (wire::Reader::term).
local function term(r)
    local off = r.pos
    local t = r:u32(F.term, "term")
    if t == 0 then
        r:fail("invalid", off, 4, "term has the invalid value 0")
    elseif t then
        r:note("term " .. t)
        r.vals.term = t
    end
    return t
end

local function epoch_seq(r)
    local e = r:u32(F.epoch, "epoch")
    local s = r:u64(F.seq, "sequence number")
    if e and s then
        r:note(string.format("epoch %d seq %s", e, tostring(s)))
        r.vals.epoch, r.vals.seq = e, tostring(s)
    end
    return e, s
end

local function member(r)
    local m = r:u32(F.member, "member")
    if m then
        r:note("member " .. m)
        r.vals.member = m
    end
    return m
end

local parse = {}

parse[T.DATA] = function(tvb, len)
    local r = new_reader(tvb, len)
    local flags_off = r.pos
    local flags = r:u8(F.data_flags, "data flags")
    if flags then
        -- the flag bit as a subfield of the flags byte
        r.cur[#r.cur].kids = { { f = F.data_flag_epoch, off = flags_off, len = 1 } }
        if flags > 1 then
            r:fail("invalid", flags_off, 1, string.format("data flags has the invalid value %d", flags))
        end
    end
    local sender = r:u32(F.sender, "sender")
    local seq = r:u64(F.seq, "sequence number")
    if flags == 1 then
        local e = r:u32(F.epoch, "epoch")
        if e then
            r:note("epoch " .. e)
        end
    end
    r:bytes(F.nonce, NONCE_LEN, "nonce")
    if not r.err then
        local sealed = len - r.pos
        if sealed < TAG_LEN then
            r:fail("short", r.pos, sealed,
                string.format("sealed data truncated: needs %d bytes, %d left", TAG_LEN, sealed))
        else
            r:bytes(F.ciphertext, sealed - TAG_LEN, "ciphertext")
            r:bytes(F.data_tag, TAG_LEN, "tag")
        end
    end
    if sender and seq then
        table.insert(r.info, 1, string.format("sender %d seq %s", sender, tostring(seq)))
    end
    return r
end

parse[T.KEY_UPDATE] = function(tvb, len, shares, v3)
    local r = split_auth(tvb, len, SIG_LEN, "signature")
    r:generated(F.step, 1)
    term(r)
    epoch_seq(r)
    if shares then
        r:bytes(F.controller_share, SHARE_LEN, "controller share")
    end
    local hdr_off = r.pos
    local first = r:u32(F.first, "first member")
    local last = r:u32(F.last, "last member")
    local count = r:u16(F.count, "entry count")
    local commit_len = 0
    if v3 then
        r:bytes(F.commitment, REVEAL_LEN, "transition commitment")
        commit_len = REVEAL_LEN
    end
    if count and r:need(count * ENTRY_LEN, "key update entries") then
        local fe, le, prev, bad, bad_prev, bad_off
        for i = 1, count do
            local e = r:open(F.entry)
            local m = r:u32(F.entry_member, "member")
            r:wrapped(F.entry_key, "wrapped key")
            r:close(e)
            e.text = ": member " .. m
            if i == 1 then fe = m end
            if i == count then le = m end
            -- Entries rise strictly (a node finds its own by binary search).
            if prev and not bad and m <= prev then
                bad, bad_prev, bad_off = m, prev, hdr_off + 10 + commit_len + (i - 1) * ENTRY_LEN
            end
            prev = m
        end
        if count == 0 then
            r:fail("invalid", hdr_off + 8, 2, "entry count has the invalid value 0")
        elseif fe ~= first or le ~= last then
            r:fail("invalid", hdr_off, 8, string.format(
                "key update batch header says members %d..=%d but its entries run %d..=%d",
                first, last, fe, le))
        elseif bad then
            r:fail("invalid", bad_off, 4, string.format(
                "key update entries are not in rising member order: member %d follows member %d",
                bad, bad_prev))
        end
        r:note(string.format("members %d..%d (%d)", first, last, count))
    end
    return r
end

local function transition(step)
    return function(tvb, len, _, v3)
        local r = split_auth(tvb, len, SIG_LEN, "signature")
        r:generated(F.step, step)
        term(r)
        epoch_seq(r)
        if v3 then
            r:bytes(F.reveal, REVEAL_LEN, "transition reveal")
        end
        return r
    end
end
parse[T.FIRST_TRANSITION] = transition(2)
parse[T.SECOND_TRANSITION] = transition(3)

parse[T.KEY_RESPONSE] = function(tvb, len, shares)
    local r = split_auth(tvb, len, SIG_LEN, "signature")
    term(r)
    epoch_seq(r)
    member(r)
    local irt = r:u64(F.in_reply_to, "in reply to")
    r.vals.irt = irt and tostring(irt)
    if shares then
        r:bytes(F.controller_share, SHARE_LEN, "controller share")
    end
    key_state(r)
    if irt then
        r:note("in reply to " .. tostring(irt))
    end
    return r
end

parse[T.JOIN_ACCEPT] = function(tvb, len)
    local r = split_auth(tvb, len, MAC_LEN, "mac")
    term(r)
    epoch_seq(r)
    member(r)
    local irt = r:u64(F.in_reply_to, "in reply to")
    r.vals.irt = irt and tostring(irt)
    r:bytes(F.controller_key, 32, "controller public key")
    key_state(r)
    if irt then
        r:note("in reply to " .. tostring(irt))
    end
    return r
end

parse[T.RESYNC] = function(tvb, len)
    local r = split_auth(tvb, len, MAC_LEN, "mac")
    term(r)
    epoch_seq(r)
    member(r)
    return r
end

-- The signed head of a beacon and a share or round notice: term, epoch, sequence
-- number, in one note (neither is a request that replies point at).
local function announcement_head(tvb, len)
    local r = split_auth(tvb, len, SIG_LEN, "signature")
    local t_off = r.pos
    local t = r:u32(F.term, "term")
    if t == 0 then
        r:fail("invalid", t_off, 4, "term has the invalid value 0")
    end
    local epoch = r:u32(F.epoch, "epoch")
    local seq = r:u64(F.seq, "sequence number")
    if t and epoch and seq then
        r:note(string.format("term %d epoch %d seq %s", t, epoch, tostring(seq)))
    end
    return r, epoch
end

-- The next round's share, announced ahead (version 3).
parse[T.SHARE_NOTICE] = function(tvb, len)
    local r = announcement_head(tvb, len)
    r:bytes(F.controller_share, SHARE_LEN, "controller share")
    return r
end

-- The next round's share and transition commitment, announced ahead
-- (version 3, since session 13): a node takes the key update request that
-- repeats both, and whose entry opens, without a signature check.
parse[T.ROUND_NOTICE] = function(tvb, len)
    local r = announcement_head(tvb, len)
    r:bytes(F.controller_share, SHARE_LEN, "controller share")
    r:bytes(F.commitment, REVEAL_LEN, "transition commitment")
    return r
end

-- A round notice from a controller that reads timed first transition
-- replies (session 14): the same layout.
parse[T.TIMED_ROUND_NOTICE] = parse[T.ROUND_NOTICE]

parse[T.BEACON] = function(tvb, len)
    local r, epoch = announcement_head(tvb, len)
    local ph_off = r.pos
    local ph = r:u8(F.phase, "round phase")
    if ph and ph ~= 0 then
        if ph > 4 then
            r:fail("invalid", ph_off, 1, string.format("round phase has the invalid value %d", ph))
        end
        local re_off = r.pos
        local re = r:u32(F.round_epoch, "round epoch")
        -- one byte string per meaning: a round is always for the next epoch
        if re and epoch and (epoch >= 0xffffffff or re ~= epoch + 1) then
            r:fail("invalid", re_off, 4, string.format("round epoch has the invalid value %d", re))
        end
        if re and not r.err then
            r:note(string.format("round %d %s", re, phase_names[ph]))
        end
    elseif ph == 0 then
        r:note("no round")
    end
    local addr = r:open(F.addr)
    local fam_off = r.pos
    local fam = r:u8(F.family, "address family")
    local ip
    if fam == 4 then
        if r:need(4, "IPv4 address") then
            ip = tostring(r.tvb:range(r.pos, 4):ipv4())
        end
        r:bytes(F.ipv4, 4, "IPv4 address")
    elseif fam == 6 then
        if r:need(16, "IPv6 address") then
            ip = "[" .. tostring(r.tvb:range(r.pos, 16):ipv6()) .. "]"
        end
        r:bytes(F.ipv6, 16, "IPv6 address")
    elseif fam then
        r:fail("invalid", fam_off, 1, string.format("address family has the invalid value %d", fam))
    end
    local port = r:u16(F.port, "port")
    r:close(addr)
    if ip and port then
        r:note("controller " .. ip .. ":" .. port)
    end
    return r
end

parse[T.HANDSHAKE_ANSWER] = function(tvb, len)
    local r = new_reader(tvb, len)
    local irt = r:u64(F.in_reply_to, "in reply to")
    r.vals.irt = irt and tostring(irt)
    if irt then
        r:note("in reply to " .. tostring(irt))
        local n = len - r.pos
        if n < HS_ANSWER_MIN or n > HS_ANSWER_MAX then
            r:fail("invalid", r.pos, n, string.format("handshake answer length has the invalid value %d", n))
        else
            r:bytes(F.noise_e, 32, "Noise ephemeral key")
            r:bytes(F.noise_payload, n - 48, "Noise payload")
            r:bytes(F.noise_tag, 16, "Noise tag")
        end
    end
    return r
end

local function reply(step)
    return function(tvb, len, shares)
        local r = split_auth(tvb, len, MAC_LEN, "mac")
        r:generated(F.step, step)
        epoch_seq(r)
        member(r)
        if shares then
            r:bytes(F.node_share, SHARE_LEN, "node share")
        end
        return r
    end
end
parse[T.KEY_UPDATE_REPLY] = reply(1)
parse[T.FIRST_REPLY] = reply(2)
parse[T.SECOND_REPLY] = reply(3)

-- A first transition reply to a controller whose timed round notice
-- announced the round (session 14; only in the handshake layout, so always
-- with the node's share), then how long the request waited at the node, in µs.
parse[T.TIMED_FIRST_REPLY] = function(tvb, len)
    local r = reply(2)(tvb, len, true)
    local held = r:u32(F.held_us, "held")
    if held then
        r:note(string.format("held %d µs", held))
    end
    return r
end

parse[T.KEY_REQUEST] = function(tvb, len, shares)
    local r = split_auth(tvb, len, MAC_LEN, "mac")
    epoch_seq(r)
    member(r)
    local st_off = r.pos
    local st = r:u8(F.step, "step")
    if st then
        if st < 1 or st > 3 then
            r:fail("invalid", st_off, 1, string.format("step has the invalid value %d", st))
        else
            r:note("holds step " .. step_names[st])
        end
    end
    if shares then
        r:bytes(F.node_share, SHARE_LEN, "node share")
    end
    return r
end

parse[T.JOIN] = function(tvb, len)
    local r = split_auth(tvb, len, MAC_LEN, "mac")
    local e_off = r.pos
    local e = r:u32(F.epoch, "epoch")
    local s = r:u64(F.seq, "sequence number")
    -- a join has no epoch; the field is written as 0
    if e and e ~= 0 then
        r:fail("invalid", e_off, 4, string.format("join epoch has the invalid value %d", e))
    end
    if s then
        r:note("seq " .. tostring(s))
        r.vals.seq = tostring(s)
    end
    node_id(r)
    return r
end

parse[T.USAGE_REPORT] = function(tvb, len)
    local r = split_auth(tvb, len, MAC_LEN, "mac")
    epoch_seq(r)
    member(r)
    local c_off = r.pos
    local count = r:u8(F.usage_count, "usage entry count")
    if count and count > MAX_USAGE_ENTRIES then
        r:fail("invalid", c_off, 1, string.format("usage entry count has the invalid value %d", count))
    elseif count then
        for _ = 1, count do
            local u = r:open(F.usage)
            local e = r:u32(F.usage_epoch, "epoch")
            local seals = r:u64(F.usage_seals, "seals")
            local opens = r:u64(F.usage_opens, "opens")
            r:close(u)
            if e and seals and opens then
                u.text = string.format(": epoch %d, %s encryptions, %s decryptions", e,
                    tostring(seals), tostring(opens))
            end
        end
        r:note(count .. " keys")
    end
    return r
end

parse[T.HANDSHAKE_INIT] = function(tvb, len)
    local r = new_reader(tvb, len)
    local s = r:u64(F.seq, "sequence number")
    if s then
        r:note("seq " .. tostring(s))
        r.vals.seq = tostring(s)
    end
    node_id(r)
    -- Noise message 1, read whole as the library does: e, then the tag
    if r:need(HS_INIT_NOISE, "handshake message") then
        r:bytes(F.noise_e, 32, "handshake message")
        r:bytes(F.noise_tag, HS_INIT_NOISE - 32, "handshake message")
    end
    return r
end

-- The authenticator after the body, when the datagram is long enough for one.
local auth_of = {
    [T.KEY_UPDATE] = { F.signature, SIG_LEN },
    [T.FIRST_TRANSITION] = { F.signature, SIG_LEN },
    [T.SECOND_TRANSITION] = { F.signature, SIG_LEN },
    [T.KEY_RESPONSE] = { F.signature, SIG_LEN },
    [T.BEACON] = { F.signature, SIG_LEN },
    [T.SHARE_NOTICE] = { F.signature, SIG_LEN },
    [T.ROUND_NOTICE] = { F.signature, SIG_LEN },
    [T.TIMED_ROUND_NOTICE] = { F.signature, SIG_LEN },
    [T.JOIN_ACCEPT] = { F.mac, MAC_LEN },
    [T.RESYNC] = { F.mac, MAC_LEN },
    [T.KEY_UPDATE_REPLY] = { F.mac, MAC_LEN },
    [T.FIRST_REPLY] = { F.mac, MAC_LEN },
    [T.TIMED_FIRST_REPLY] = { F.mac, MAC_LEN },
    [T.SECOND_REPLY] = { F.mac, MAC_LEN },
    [T.KEY_REQUEST] = { F.mac, MAC_LEN },
    [T.JOIN] = { F.mac, MAC_LEN },
    [T.USAGE_REPORT] = { F.mac, MAC_LEN },
}

-- The messages whose layout version 3 changed (the transition chain).
local chain_types = {
    [T.KEY_UPDATE] = true, [T.FIRST_TRANSITION] = true, [T.SECOND_TRANSITION] = true,
}

-- The messages version 3 added: the notices and the timed first transition
-- reply (no version 2 layout has them).
local v3_added = {
    [T.SHARE_NOTICE] = true, [T.ROUND_NOTICE] = true, [T.TIMED_ROUND_NOTICE] = true,
    [T.TIMED_FIRST_REPLY] = true,
}

-- The messages of version 3: those it changed, and those it added.
local v3_types = {}
for t in pairs(chain_types) do
    v3_types[t] = true
end
for t in pairs(v3_added) do
    v3_types[t] = true
end

-- The version byte the library reads for a message of type `ty`.
local function version_for(ty)
    return v3_types[ty] and VERSION or VERSION_2
end

-- Which versions each layout decodes.
local function version_ok(version, layout)
    if layout == LAYOUT_JOIN then
        return version == VERSION_2
    end
    return version == VERSION or version == VERSION_2
end

local function versions_of(layout)
    if layout == LAYOUT_JOIN then
        return "version " .. VERSION_2
    end
    return "versions " .. VERSION_2 .. " and " .. VERSION
end

local function layout_word(layout)
    if layout == LAYOUT_JOIN then
        return "join"
    elseif layout == LAYOUT_HANDSHAKE then
        return "handshake"
    end
    return "auto"
end

-- Parses one whole datagram under `layout`. Returns the reader (items, err,
-- info), the type code (or nil) and the layout the datagram was read with
-- (LAYOUT_JOIN or LAYOUT_HANDSHAKE; nil when it does not matter).
local function parse_datagram(tvb, layout)
    local len = tvb:len()
    local r = new_reader(tvb, len)
    if len == 0 then
        r:fail("short", 0, 0, "empty datagram")
        return r
    end
    local version = tvb:range(0, 1):uint()
    if not version_ok(version, layout) then
        r:fail("version", 0, 1, string.format(
            "wire version %d is not supported (this dissector decodes %s in the %s layout; preference Wire layout)",
            version, versions_of(layout), layout_word(layout)))
        return r
    end
    if len < 2 then
        r:fail("short", 1, 0, "message type truncated: needs 1 bytes, 0 left")
        return r
    end
    local ty = tvb:range(1, 1):uint()
    -- Version 3's key update and transition requests have one layout:
    -- issue 17's, with the transition chain. Any other message of the
    -- library's layout carries version 2 (in `auto`, version 2's 0x02-0x04
    -- are revision 2's, without the chain).
    local v3 = false
    if layout ~= LAYOUT_JOIN and known[LAYOUT_HANDSHAKE][ty] then
        local wrong = (layout == LAYOUT_HANDSHAKE and version ~= version_for(ty))
            or (version == VERSION and not v3_types[ty])
            or (version == VERSION_2 and v3_added[ty])
        if wrong then
            r:fail("version", 0, 1, string.format(
                "wire version %d is not supported for this message (type 0x%02x is of version %d)",
                version, ty, version_for(ty)))
            return r, ty
        end
        v3 = version == VERSION
        if v3 then
            layout = LAYOUT_HANDSHAKE
        end
    end
    if not known[layout][ty] then
        local why = ""
        if type_names[ty] then
            why = " in the " .. layout_word(layout) .. " layout (preference Wire layout)"
        end
        r:fail("unknown_type", 1, 1, string.format("unknown message type 0x%02x%s", ty, why))
        return r, ty
    end
    local function run(shares)
        local p = parse[ty](tvb, len, shares, v3)
        p:done()
        return p
    end
    local used
    if share_types[ty] then
        if layout == LAYOUT_AUTO then
            -- The layout under which the datagram decodes; when neither does,
            -- the one that got further.
            local a = run(false)
            if not a.err then
                r, used = a, LAYOUT_JOIN
            else
                local b = run(true)
                if not b.err or b.err.off > a.err.off then
                    r, used = b, LAYOUT_HANDSHAKE
                else
                    r, used = a, LAYOUT_JOIN
                end
            end
        else
            r, used = run(layout == LAYOUT_HANDSHAKE), layout
        end
    else
        r = run(false)
        if ty == T.JOIN or ty == T.JOIN_ACCEPT then
            used = LAYOUT_JOIN
        elseif ty == T.HANDSHAKE_INIT or ty == T.HANDSHAKE_ANSWER then
            used = LAYOUT_HANDSHAKE
        end
    end
    return r, ty, used
end

-- ---------------------------------------------------------------- requests and answers
--
-- A key request and its key response (member, seq = in_reply_to), a join or
-- handshake init and its answer (the node's address, seq = in_reply_to), a
-- round's request and each node's reply (epoch and step: the reply points
-- at the latest request sent before it). Worked out on the first pass and
-- kept by frame number, so that every later pass (Wireshark's, tshark -2)
-- shows the same links; a request shows its answer only from the second pass.

local links

local function reset_links()
    links = { request = {}, request_of = {}, answer_of = {} }
end
reset_links()

function kf.init()
    reset_links()
end

local round_steps = {
    [T.KEY_UPDATE] = 1, [T.FIRST_TRANSITION] = 2, [T.SECOND_TRANSITION] = 3,
}
local reply_steps = {
    [T.KEY_UPDATE_REPLY] = 1, [T.FIRST_REPLY] = 2, [T.SECOND_REPLY] = 3, [T.TIMED_FIRST_REPLY] = 2,
}

-- The link key of a datagram and whether it asks (true) or answers (false).
local function link_key(ty, v, pinfo)
    local from = tostring(pinfo.src) .. ":" .. pinfo.src_port
    local to = tostring(pinfo.dst) .. ":" .. pinfo.dst_port
    if ty == T.KEY_REQUEST and v.member and v.seq then
        return "key " .. v.member .. " " .. v.seq, true
    elseif ty == T.KEY_RESPONSE and v.member and v.irt then
        return "key " .. v.member .. " " .. v.irt, false
    elseif (ty == T.JOIN or ty == T.HANDSHAKE_INIT) and v.seq then
        return "join " .. from .. " " .. v.seq, true
    elseif (ty == T.JOIN_ACCEPT or ty == T.HANDSHAKE_ANSWER) and v.irt then
        return "join " .. to .. " " .. v.irt, false
    elseif round_steps[ty] and v.epoch then
        return "round " .. v.epoch .. " " .. round_steps[ty], true
    elseif reply_steps[ty] and v.epoch then
        return "round " .. v.epoch .. " " .. reply_steps[ty], false
    end
end

local function link(ty, r, pinfo, root)
    local key, asks = link_key(ty, r.vals, pinfo)
    if not key then
        return
    end
    local no = pinfo.number
    if not pinfo.visited then
        if asks then
            -- a round's request is resent: replies point at the latest;
            -- a node's request keeps its first frame
            if round_steps[ty] or not links.request[key] then
                links.request[key] = { no = no, ts = pinfo.abs_ts }
            end
        else
            local q = links.request[key]
            if q and q.no < no then
                links.request_of[no] = q
                if not round_steps[ty] and not reply_steps[ty] and not links.answer_of[q.no] then
                    links.answer_of[q.no] = no
                end
            end
        end
    end
    if asks then
        local a = links.answer_of[no]
        if a then
            root:add(F.response_in, a):set_generated()
        end
    else
        local q = links.request_of[no]
        if q then
            root:add(F.request_in, q.no):set_generated()
            local d = pinfo.abs_ts - q.ts
            if d < 0 then
                d = 0
            end
            local secs = math.floor(d)
            root:add(F.response_time, NSTime(secs, math.floor((d - secs) * 1e9))):set_generated()
        end
    end
end

-- ---------------------------------------------------------------- drawing

local function draw(tvb, tree, items)
    for _, it in ipairs(items) do
        local node
        if it.gen then
            node = tree:add(it.f, it.value)
            node:set_generated()
        elseif it.len == 0 then
            node = tree:add(it.f, tvb:range(it.off, 0))
        elseif it.value then
            node = tree:add(it.f, tvb:range(it.off, it.len), it.value)
        else
            node = tree:add(it.f, tvb:range(it.off, it.len))
        end
        if it.text then
            node:append_text(it.text)
        end
        if it.kids and #it.kids > 0 then
            draw(tvb, node, it.kids)
        end
    end
end

local function dissect(tvb, pinfo, tree)
    local len = tvb:len()
    pinfo.cols.protocol = "KEYFLEET"
    local r, ty, used = parse_datagram(tvb, kf.prefs.layout)
    local root = tree:add(kf, tvb:range(0, len))
    if len >= 1 then
        root:add(F.version, tvb:range(0, 1))
    end
    local name
    if ty then
        root:add(F.type, tvb:range(1, 1))
        name = type_names[ty] or string.format("Unknown type 0x%02x", ty)
        if type_names[ty] and known[kf.prefs.layout][ty] then
            local role = controller_types[ty] and 1 or 0
            root:add(F.role, role):set_generated()
        end
        if used then
            root:add(F.layout, used):set_generated()
        end
    else
        name = "keyfleet"
    end
    draw(tvb, root, r.root)
    if ty and not r.err then
        link(ty, r, pinfo, root)
    end
    -- the authenticator, wherever the body parse stopped
    local auth = ty and known[kf.prefs.layout][ty] and auth_of[ty]
    if auth and len >= 2 + auth[2] then
        root:add(auth[1], tvb:range(len - auth[2], auth[2]))
    end
    local info = name
    if #r.info > 0 then
        info = info .. ", " .. table.concat(r.info, ", ")
    end
    if r.err then
        local e = r.err
        local where = root
        if e.off < len then
            local n = e.len
            if e.off + n > len then
                n = len - e.off
            end
            if n > 0 then
                where = root:add(tvb:range(e.off, n), "[" .. e.text .. "]")
            end
        end
        where:add_proto_expert_info(E[e.expert], e.text)
        info = info .. " [" .. e.text .. "]"
    end
    pinfo.cols.info = info
    root:append_text(", " .. name)
    return len
end

function kf.dissector(tvb, pinfo, tree)
    return dissect(tvb, pinfo, tree)
end

-- Claims a UDP datagram on any port that starts with a version of the
-- layout and a known type and decodes whole.
local function heuristic(tvb, pinfo, tree)
    if tvb:len() < 2 or not version_ok(tvb:range(0, 1):uint(), kf.prefs.layout) then
        return false
    end
    if not known[kf.prefs.layout][tvb:range(1, 1):uint()] then
        return false
    end
    local r = parse_datagram(tvb, kf.prefs.layout)
    if r.err then
        return false
    end
    dissect(tvb, pinfo, tree)
    return true
end

-- ---------------------------------------------------------------- registration

local udp_port = DissectorTable.get("udp.port")
local registered_ports = nil

local function register_ports()
    if registered_ports then
        udp_port:remove(registered_ports, kf)
    end
    registered_ports = kf.prefs.ports
    if registered_ports and registered_ports ~= "" then
        udp_port:add(registered_ports, kf)
    end
end

function kf.prefs_changed()
    if registered_ports ~= kf.prefs.ports then
        register_ports()
    end
end

register_ports()
kf:register_heuristic("udp", heuristic)
