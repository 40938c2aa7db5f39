//! A datagram off the multicast socket, as `wire::decode` takes it: never a
//! panic, and what decodes is exactly what keyfleet's encoders write for
//! those fields (the body before the signature or MAC re-encodes to the same
//! bytes), so no two byte strings mean the same message.
#![no_main]

use keyfleet_core::wire::{self, Message};
use keyfleet_fuzz::{genuine_seeds, write_seeds};
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: write_seeds(genuine_seeds), |data: &[u8]| {
    let Ok(msg) = wire::decode(data) else {
        return;
    };
    assert!(!msg.name().is_empty());
    let (body, auth_len) = match &msg {
        Message::Data(d) => {
            let header = wire::data_header(d.sender, d.seq, d.epoch_hint, &d.nonce);
            assert_eq!(header, d.header, "data header re-encodes");
            assert_eq!([d.header, d.sealed].concat(), data);
            return;
        }
        Message::KeyUpdate(k) => {
            let entries: Vec<_> = k.entries().collect();
            assert_eq!(entries.len(), k.len());
            for (m, w) in &entries {
                assert!(k.may_hold(*m));
                assert_eq!(k.entry_for(*m), Some(*w), "entries sorted, found by member");
            }
            (wire::key_update(k.term, k.epoch, k.seq, &k.share, &k.commit, &entries), k.auth.body.len())
        }
        Message::Transition(t) => (wire::transition(t.term, t.step, t.epoch, t.seq, &t.reveal), t.auth.body.len()),
        Message::KeyResponse(k) => (
            wire::key_response(k.term, k.seq, k.member, k.in_reply_to, &k.share, &k.state),
            k.auth.body.len(),
        ),
        Message::HandshakeAnswer(a) => {
            assert_eq!(wire::handshake_answer(a.in_reply_to, a.noise), data);
            return;
        }
        Message::Beacon(b) => (
            wire::beacon(b.term, b.epoch, b.seq, b.round, b.controller),
            b.auth.body.len(),
        ),
        Message::ShareNotice(n) => (
            match &n.commit {
                Some(c) if n.timed => wire::timed_round_notice(n.term, n.epoch, n.seq, &n.share, c),
                Some(c) => wire::round_notice(n.term, n.epoch, n.seq, &n.share, c),
                None => wire::share_notice(n.term, n.epoch, n.seq, &n.share),
            },
            n.auth.body.len(),
        ),
        Message::Resync(r) => (wire::resync(r.term, r.epoch, r.seq, r.member), r.auth.body.len()),
        Message::Ack(a) => (
            match a.held_us {
                Some(held) => wire::timed_first_ack(a.epoch, a.seq, a.member, &a.share, held),
                None => wire::ack(a.step, a.epoch, a.seq, a.member, &a.share),
            },
            a.auth.body.len(),
        ),
        Message::KeyRequest(k) => (
            wire::key_request(k.epoch, k.step, k.seq, k.member, &k.share),
            k.auth.body.len(),
        ),
        Message::HandshakeInit(h) => {
            assert_eq!(wire::handshake_init_header(h.seq, &h.node_id), h.prologue);
            assert_eq!([h.prologue, &h.noise[..]].concat(), data);
            return;
        }
        Message::UsageReport(u) => (
            wire::usage_report(u.epoch, u.seq, u.member, &u.uses),
            u.auth.body.len(),
        ),
    };
    assert_eq!(body.len(), auth_len, "{}: body length", msg.name());
    assert_eq!(&body[..], &data[..auth_len], "{} re-encodes to the same bytes", msg.name());
});
