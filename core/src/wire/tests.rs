use super::*;
use crate::crypto::KeyUse;
use proptest::prelude::*;
use rand::SeedableRng;

fn keys() -> Chain {
    Chain::for_tests(4)
}

fn share() -> impl Strategy<Value = Share> {
    any::<[u8; 32]>().prop_map(Share)
}

fn group_key() -> impl Strategy<Value = GroupKey> {
    (any::<u32>(), any::<[u8; 32]>()).prop_map(|(e, b)| GroupKey::from_bytes(Epoch(e), b))
}

fn signing() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1))
}

fn wrapped() -> impl Strategy<Value = WrappedKey> {
    proptest::array::uniform32(any::<u8>()).prop_flat_map(|a| {
        proptest::array::uniform28(any::<u8>()).prop_map(move |b| {
            let mut w = [0u8; WRAPPED_LEN];
            w[..32].copy_from_slice(&a);
            w[32..].copy_from_slice(&b);
            WrappedKey(w)
        })
    })
}

fn key_state() -> impl Strategy<Value = KeyState> {
    (
        any::<u32>(),
        wrapped(),
        proptest::option::of((any::<u32>(), 1u8..=4, wrapped())),
    )
        .prop_map(|(e, w, r)| KeyState {
            current_epoch: Epoch(e),
            current: w,
            round: r.map(|(re, p, rw)| RoundState {
                epoch: Epoch(re),
                phase: RoundPhase::from_u8(p).unwrap(),
                wrapped: rw,
            }),
        })
}

fn node_id() -> impl Strategy<Value = NodeId> {
    "[A-Za-z0-9._-]{1,64}".prop_map(|s| NodeId::parse(&s).unwrap())
}

fn phase() -> impl Strategy<Value = RoundPhase> {
    (1u8..=4).prop_map(|p| RoundPhase::from_u8(p).unwrap())
}

fn address() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        Just(Step::KeyUpdate),
        Just(Step::FirstTransition),
        Just(Step::SecondTransition)
    ]
}

/// A signed notice (share or round) refuses every truncation, a byte more
/// before its signature, and revision 2's version byte (revision 2 had no
/// notice).
fn notice_framing_holds(bytes: &[u8]) -> Result<(), TestCaseError> {
    for cut in 0..bytes.len() {
        prop_assert!(
            decode(&bytes[..cut]).is_err(),
            "{} of {} bytes decoded",
            cut,
            bytes.len()
        );
    }
    let mut long = bytes.to_vec();
    long.insert(bytes.len() - SIGNATURE_LEN, 0);
    prop_assert_eq!(decode(&long), Err(WireError::Trailing(1)));
    let mut old = bytes.to_vec();
    old[0] = PREVIOUS_VERSION;
    prop_assert_eq!(decode(&old), Err(WireError::Version(PREVIOUS_VERSION)));
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(ty in any::<u8>(), tail in proptest::collection::vec(any::<u8>(), 0..1300)) {
        let mut bytes = vec![version_of(ty), ty];
        bytes.extend_from_slice(&tail);
        if let Ok(Message::KeyUpdate(ku)) = decode(&bytes) {
            // Walking the entries of a hostile batch must not panic either.
            let n = ku.entries().count();
            prop_assert_eq!(n, ku.len());
            let _ = ku.entry_for(ku.first);
        }
    }

    #[test]
    fn data_round_trips(sender in any::<u32>(), seq in any::<u64>(), hint in proptest::option::of(any::<u32>()),
                        nonce in any::<[u8; 12]>(), sealed in proptest::collection::vec(any::<u8>(), 16..200)) {
        let mut bytes = data_header(sender, seq, hint.map(Epoch), &nonce);
        let hlen = bytes.len();
        bytes.extend_from_slice(&sealed);
        let Message::Data(d) = decode(&bytes).unwrap() else { panic!("not data") };
        prop_assert_eq!(d.sender, sender);
        // Where a kernel filter looks for the sender, before any decoding.
        prop_assert_eq!(&bytes[..2], &[version_of(kind::DATA), kind::DATA]);
        prop_assert_eq!(&bytes[DATA_SENDER_AT..DATA_SENDER_AT + 4], &sender.to_be_bytes());
        prop_assert_eq!(d.seq, seq);
        prop_assert_eq!(d.epoch_hint, hint.map(Epoch));
        prop_assert_eq!(d.nonce, nonce);
        prop_assert_eq!(d.header.len(), hlen);
        prop_assert_eq!(d.sealed, &sealed[..]);
    }

    #[test]
    fn key_update_round_trips(term in 1u32.., epoch in any::<u32>(), seq in any::<u64>(), sh in share(),
                              members in proptest::collection::btree_set(any::<u32>(), 1..=MAX_BATCH_ENTRIES),
                              w in wrapped(), commit in any::<[u8; 32]>()) {
        let entries: Vec<(u32, WrappedKey)> = members.iter().map(|m| (*m, w)).collect();
        let bytes = sign(key_update(term, Epoch(epoch), seq, &sh, &commit, &entries), &signing());
        prop_assert!(bytes.len() <= MAX_DATAGRAM);
        let Message::KeyUpdate(ku) = decode(&bytes).unwrap() else { panic!("not a key update") };
        prop_assert_eq!((ku.term, ku.epoch, ku.seq, ku.share, ku.commit), (term, Epoch(epoch), seq, sh, commit));
        prop_assert_eq!(ku.entries().collect::<Vec<_>>(), entries.clone());
        // Where a kernel filter looks for the batch's member range, before any decoding.
        prop_assert_eq!(&bytes[..2], &[VERSION, kind::KEY_UPDATE]);
        prop_assert_eq!(&bytes[KEY_UPDATE_RANGE_AT..KEY_UPDATE_RANGE_AT + 4], &ku.first.to_be_bytes());
        prop_assert_eq!(&bytes[KEY_UPDATE_RANGE_AT + 4..KEY_UPDATE_RANGE_AT + 8], &ku.last.to_be_bytes());
        prop_assert_eq!((ku.first, ku.last), (entries[0].0, entries[entries.len() - 1].0));
        for (m, _) in &entries {
            prop_assert_eq!(ku.entry_for(*m), Some(w));
        }
        prop_assert!(crate::crypto::verify(&signing().verifying_key(), ku.auth.body, &ku.auth.signature));
    }

    #[test]
    fn transition_round_trips(s in step().prop_filter("request", |s| *s != Step::KeyUpdate), term in 1u32.., epoch in any::<u32>(), seq in any::<u64>(), reveal in any::<[u8; 32]>()) {
        let bytes = sign(transition(term, s, Epoch(epoch), seq, &reveal), &signing());
        let Message::Transition(t) = decode(&bytes).unwrap() else { panic!("not a transition") };
        prop_assert_eq!((t.term, t.step, t.epoch, t.seq, t.reveal), (term, s, Epoch(epoch), seq, reveal));
        prop_assert!(crate::crypto::verify(&signing().verifying_key(), t.auth.body, &t.auth.signature));
    }

    #[test]
    fn key_response_round_trips(term in 1u32.., seq in any::<u64>(), member in any::<u32>(), irt in any::<u64>(),
                                st in key_state(), sh in share()) {
        let bytes = sign(key_response(term, seq, member, irt, &sh, &st), &signing());
        let Message::KeyResponse(r) = decode(&bytes).unwrap() else { panic!("not a key response") };
        prop_assert_eq!((r.term, r.seq, r.member, r.in_reply_to, r.share, r.state), (term, seq, member, irt, sh, st));
    }

    #[test]
    fn handshake_messages_round_trip(term in 1u32.., seq in any::<u64>(), id in node_id(), noise in any::<[u8; 48]>(),
                                     member in any::<u32>(), pk in any::<[u8; 32]>(), cur in group_key(),
                                     round in proptest::option::of((1u8..=4, group_key())),
                                     tail in proptest::collection::vec(any::<u8>(), 48)) {
        let mut b = handshake_init_header(seq, &id);
        let hlen = b.len();
        b.extend_from_slice(&noise);
        let Message::HandshakeInit(h) = decode(&b).unwrap() else { panic!("not a handshake init") };
        prop_assert_eq!((h.seq, &h.node_id, h.noise), (seq, &id, noise));
        prop_assert_eq!(h.prologue, &b[..hlen]);
        let p = AnswerPayload { term, seq, member, controller_key: pk, current: cur,
            round: round.map(|(ph, k)| (RoundPhase::from_u8(ph).unwrap(), k)) };
        let bytes = answer_payload(&p);
        prop_assert_eq!(decode_answer_payload(&bytes), Ok(p));
        // The answer as it travels: 32 + payload + 16 bytes of Noise.
        let mut n = tail[..32].to_vec();
        n.extend_from_slice(&bytes);
        n.extend_from_slice(&tail[32..]);
        let a = handshake_answer(seq, &n);
        let Message::HandshakeAnswer(x) = decode(&a).unwrap() else { panic!("not an answer") };
        prop_assert_eq!((x.in_reply_to, x.noise), (seq, &n[..]));
    }

    #[test]
    fn node_messages_round_trip(s in step(), epoch in any::<u32>(), seq in any::<u64>(), member in any::<u32>(),
                                sh in share(), uses in proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..=MAX_USAGE_ENTRIES)) {
        let k = keys();
        let b = mac(ack(s, Epoch(epoch), seq, member, &sh), &k);
        let Message::Ack(a) = decode(&b).unwrap() else { panic!() };
        prop_assert_eq!((a.step, a.epoch, a.seq, a.member, a.share), (s, Epoch(epoch), seq, member, sh));
        prop_assert!(a.auth.verify(&k));
        let b = mac(key_request(Epoch(epoch), s, seq, member, &sh), &k);
        let Message::KeyRequest(r) = decode(&b).unwrap() else { panic!() };
        prop_assert_eq!((r.epoch, r.step, r.seq, r.member, r.share), (Epoch(epoch), s, seq, member, sh));
        let b = mac(resync(epoch.max(1), Epoch(epoch), seq, member), &k);
        let Message::Resync(x) = decode(&b).unwrap() else { panic!() };
        prop_assert_eq!((x.term, x.epoch, x.seq, x.member), (epoch.max(1), Epoch(epoch), seq, member));
        let uses: Vec<KeyUse> = uses.into_iter().map(|(e, s, o)| KeyUse { epoch: Epoch(e), seals: s, opens: o }).collect();
        let b = mac(usage_report(Epoch(epoch), seq, member, &uses), &k);
        let Message::UsageReport(u) = decode(&b).unwrap() else { panic!() };
        prop_assert_eq!((u.epoch, u.seq, u.member, u.uses), (Epoch(epoch), seq, member, uses));
    }

    #[test]
    fn beacon_round_trips(term in 1u32.., epoch in 0u32..u32::MAX, seq in any::<u64>(),
                          round in proptest::option::of(phase()), addr in address()) {
        let round = round.map(|p| (Epoch(epoch + 1), p));
        let bytes = sign(beacon(term, Epoch(epoch), seq, round, addr), &signing());
        let Message::Beacon(b) = decode(&bytes).unwrap() else { panic!("not a beacon") };
        prop_assert_eq!((b.term, b.epoch, b.seq, b.round, b.controller), (term, Epoch(epoch), seq, round, addr));
        prop_assert!(crate::crypto::verify(&signing().verifying_key(), b.auth.body, &b.auth.signature));
        prop_assert!(bytes.len() <= 2 + 4 + 4 + 8 + 1 + 4 + 1 + 16 + 2 + SIGNATURE_LEN);
        // Every truncation and every extension is refused.
        for cut in 0..bytes.len() {
            prop_assert!(decode(&bytes[..cut]).is_err(), "{} of {} bytes decoded", cut, bytes.len());
        }
        let mut long = bytes.clone();
        long.insert(bytes.len() - SIGNATURE_LEN, 0);
        prop_assert_eq!(decode(&long), Err(WireError::Trailing(1)));
    }

    #[test]
    fn share_notice_round_trips(term in 1u32.., epoch in any::<u32>(), seq in any::<u64>(), share in any::<[u8; 32]>()) {
        let bytes = sign(share_notice(term, Epoch(epoch), seq, &Share(share)), &signing());
        prop_assert_eq!(&bytes[..2], &[VERSION, kind::SHARE_NOTICE]);
        prop_assert_eq!(bytes.len(), 2 + 4 + 4 + 8 + SHARE_LEN + SIGNATURE_LEN);
        let Message::ShareNotice(n) = decode(&bytes).unwrap() else { panic!("not a share notice") };
        prop_assert_eq!((n.term, n.epoch, n.seq, n.share), (term, Epoch(epoch), seq, Share(share)));
        prop_assert!(crate::crypto::verify(&signing().verifying_key(), n.auth.body, &n.auth.signature));
        notice_framing_holds(&bytes)?;
    }

    #[test]
    fn round_notice_round_trips(term in 1u32.., epoch in any::<u32>(), seq in any::<u64>(), share in any::<[u8; 32]>(), commit in any::<[u8; 32]>()) {
        let bytes = sign(round_notice(term, Epoch(epoch), seq, &Share(share), &commit), &signing());
        prop_assert_eq!(&bytes[..2], &[VERSION, kind::ROUND_NOTICE]);
        prop_assert_eq!(bytes.len(), 2 + 4 + 4 + 8 + SHARE_LEN + 32 + SIGNATURE_LEN);
        let Message::ShareNotice(n) = decode(&bytes).unwrap() else { panic!("not a round notice") };
        prop_assert_eq!((n.term, n.epoch, n.seq, n.share, n.commit), (term, Epoch(epoch), seq, Share(share), Some(commit)));
        prop_assert!(crate::crypto::verify(&signing().verifying_key(), n.auth.body, &n.auth.signature));
        notice_framing_holds(&bytes)?;
        // A share notice's layout with a round notice's type: one field short.
        let mut short = sign(share_notice(term, Epoch(epoch), seq, &Share(share)), &signing());
        short[1] = kind::ROUND_NOTICE;
        prop_assert!(decode(&short).is_err());
    }

    #[test]
    fn timed_round_notice_round_trips(term in 1u32.., epoch in any::<u32>(), seq in any::<u64>(), share in any::<[u8; 32]>(), commit in any::<[u8; 32]>()) {
        let bytes = sign(timed_round_notice(term, Epoch(epoch), seq, &Share(share), &commit), &signing());
        prop_assert_eq!(&bytes[..2], &[VERSION, kind::TIMED_ROUND_NOTICE]);
        let Message::ShareNotice(n) = decode(&bytes).unwrap() else { panic!("not a round notice") };
        prop_assert_eq!((n.term, n.epoch, n.seq, n.share, n.commit, n.timed), (term, Epoch(epoch), seq, Share(share), Some(commit), true));
        prop_assert!(crate::crypto::verify(&signing().verifying_key(), n.auth.body, &n.auth.signature));
        notice_framing_holds(&bytes)?;
        // The round notice's bytes but for the type: the same fields, untimed.
        let mut plain = bytes.clone();
        plain[1] = kind::ROUND_NOTICE;
        let Message::ShareNotice(p) = decode(&plain).unwrap() else { panic!("not a round notice") };
        prop_assert_eq!((p.commit, p.timed), (Some(commit), false));
    }

    #[test]
    fn timed_first_reply_round_trips(epoch in any::<u32>(), seq in any::<u64>(), member in any::<u32>(), share in any::<[u8; 32]>(), held in any::<u32>()) {
        let bytes = mac(timed_first_ack(Epoch(epoch), seq, member, &Share(share), held), &keys());
        prop_assert_eq!(&bytes[..2], &[VERSION, kind::TIMED_FIRST_REPLY]);
        prop_assert_eq!(bytes.len(), 2 + 4 + 8 + 4 + SHARE_LEN + 4 + MAC_LEN);
        let Message::Ack(a) = decode(&bytes).unwrap() else { panic!("not a reply") };
        prop_assert_eq!((a.step, a.epoch, a.seq, a.member, a.share, a.held_us), (Step::FirstTransition, Epoch(epoch), seq, member, Share(share), Some(held)));
        prop_assert!(a.auth.verify(&keys()));
        // The held time is under the MAC: changed, the MAC fails.
        let mut moved = bytes.clone();
        moved[2 + 4 + 8 + 4 + SHARE_LEN] ^= 1;
        let Message::Ack(m) = decode(&moved).unwrap() else { panic!("not a reply") };
        prop_assert!(!m.auth.verify(&keys()));
        // An untimed reply's layout under the timed type: one field short.
        let mut short = mac(ack(Step::FirstTransition, Epoch(epoch), seq, member, &Share(share)), &keys());
        short[1] = kind::TIMED_FIRST_REPLY;
        prop_assert!(decode(&short).is_err());
        // A plain first reply decodes without a held time.
        let plain = mac(ack(Step::FirstTransition, Epoch(epoch), seq, member, &Share(share)), &keys());
        let Message::Ack(p) = decode(&plain).unwrap() else { panic!("not a reply") };
        prop_assert_eq!(p.held_us, None);
    }

    #[test]
    fn a_beacon_whose_round_is_not_for_the_next_epoch_is_refused(epoch in any::<u32>(), re in any::<u32>(), p in phase()) {
        prop_assume!(epoch.checked_add(1) != Some(re));
        let bytes = sign(beacon(1, Epoch(epoch), 9, Some((Epoch(re), p)), SocketAddr::from(([10, 0, 0, 1], 47800))), &signing());
        prop_assert_eq!(decode(&bytes), Err(WireError::Invalid { field: "round epoch", value: re.into() }));
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_refused(cut in 0usize..200) {
        let st = KeyState { current_epoch: Epoch(3), current: WrappedKey([1; WRAPPED_LEN]),
            round: Some(RoundState { epoch: Epoch(4), phase: RoundPhase::Draining, wrapped: WrappedKey([2; WRAPPED_LEN]) }) };
        let bytes = sign(key_response(1, 9, 2, 8, &Share([7; 32]), &st), &signing());
        let cut = cut.min(bytes.len() - 1);
        let short = &bytes[..cut];
        let decoded = decode(short);
        prop_assert!(decoded.is_err(), "{} of {} bytes decoded as {:?}", cut, bytes.len(), decoded);
    }
}

#[test]
fn batch_capacity_fits_a_datagram() {
    // The round's share (32 bytes) in the header costs one entry of 17.
    assert_eq!(MAX_BATCH_ENTRIES, 16);
    let entries: Vec<_> = (0..MAX_BATCH_ENTRIES as u32)
        .map(|m| (m, WrappedKey([0; WRAPPED_LEN])))
        .collect();
    let bytes = sign(
        key_update(1, Epoch(1), 1, &Share([1; 32]), &[0; 32], &entries),
        &signing(),
    );
    assert!(bytes.len() <= MAX_DATAGRAM, "{}", bytes.len());
}

/// Term 0 is no leader's: every controller message that carries it is
/// refused, whatever its type, before any signature or MAC is looked at.
#[test]
fn term_zero_is_refused_in_every_controller_message() {
    let st = KeyState {
        current_epoch: Epoch(3),
        current: WrappedKey([1; WRAPPED_LEN]),
        round: None,
    };
    let w = WrappedKey([0; WRAPPED_LEN]);
    let addr = SocketAddr::from(([10, 0, 0, 1], 47800));
    let zero = WireError::Invalid {
        field: "term",
        value: 0,
    };
    for bytes in [
        sign(
            key_update(0, Epoch(1), 1, &Share([1; 32]), &[0; 32], &[(1, w)]),
            &signing(),
        ),
        sign(
            transition(0, Step::FirstTransition, Epoch(1), 1, &[0; 32]),
            &signing(),
        ),
        sign(
            transition(0, Step::SecondTransition, Epoch(1), 1, &[0; 32]),
            &signing(),
        ),
        sign(key_response(0, 1, 1, 1, &Share([1; 32]), &st), &signing()),
        mac(resync(0, Epoch(1), 1, 1), &keys()),
        sign(beacon(0, Epoch(1), 1, None, addr), &signing()),
        sign(share_notice(0, Epoch(1), 1, &Share([1; 32])), &signing()),
    ] {
        assert_eq!(decode(&bytes), Err(zero.clone()), "type 0x{:02x}", bytes[1]);
    }
    // The handshake answer carries its term inside the Noise payload (authenticated there).
    let p = answer_payload(&AnswerPayload {
        term: 0,
        seq: 1,
        member: 1,
        controller_key: [3; 32],
        current: GroupKey::from_bytes(Epoch(1), [5; 32]),
        round: None,
    });
    assert_eq!(decode_answer_payload(&p), Err(zero));
}

#[test]
fn typed_errors_say_what_was_wrong() {
    assert_eq!(decode(&[]), Err(WireError::Empty));
    assert_eq!(decode(&[1, 1]), Err(WireError::Version(1)));
    assert_eq!(decode(&[4, 1]), Err(WireError::Version(4)));
    // Each message carries its own layout's version: 2 for data and most,
    // 3 for the key update and transition requests; the other is refused.
    assert_eq!(
        decode(&[VERSION, kind::DATA]),
        Err(WireError::Version(VERSION))
    );
    assert_eq!(
        decode(&[PREVIOUS_VERSION, kind::KEY_UPDATE]),
        Err(WireError::Version(PREVIOUS_VERSION))
    );
    assert!(WireError::Version(1).to_string().contains("version 3"));
    assert_eq!(decode(&[VERSION, 0x7f]), Err(WireError::UnknownType(0x7f)));
    assert_eq!(
        decode(&[PREVIOUS_VERSION, 0x7f]),
        Err(WireError::UnknownType(0x7f))
    );
    // Revision 1's join and join accept (authenticated by the label alone) are gone.
    assert_eq!(
        decode(&[PREVIOUS_VERSION, 0x15]),
        Err(WireError::UnknownType(0x15))
    );
    assert_eq!(
        decode(&[PREVIOUS_VERSION, 0x06]),
        Err(WireError::UnknownType(0x06))
    );
    let mut bytes = mac(
        ack(Step::KeyUpdate, Epoch(1), 1, 1, &Share([3; 32])),
        &keys(),
    );
    bytes.insert(10, 0);
    assert_eq!(decode(&bytes), Err(WireError::Trailing(1)));
    let mut j = handshake_init_header(1, &NodeId::parse("ok").unwrap());
    j.extend_from_slice(&[0; 48]);
    j[12] = b'/';
    assert!(
        matches!(
            decode(&j),
            Err(WireError::NodeId(NodeIdError::Character('/')))
        ),
        "{:?}",
        decode(&j)
    );
}

#[test]
fn handshake_messages_refuse_each_field_they_can_get_wrong() {
    let id = NodeId::parse("pump-07").unwrap();
    let mut init = handshake_init_header(7, &id);
    init.extend_from_slice(&[9; 48]);
    assert!(matches!(decode(&init), Ok(Message::HandshakeInit(_))));
    // Short or long Noise message.
    assert!(matches!(
        decode(&init[..init.len() - 1]),
        Err(WireError::Truncated { .. })
    ));
    let mut long = init.clone();
    long.push(0);
    assert_eq!(decode(&long), Err(WireError::Trailing(1)));
    // A node id length pointing past the end, an empty id, invalid UTF-8.
    let mut bad = init.clone();
    bad[10] = 200;
    assert!(matches!(decode(&bad), Err(WireError::Truncated { .. })));
    let mut empty = handshake_init_header(7, &id);
    empty[10] = 0;
    empty.truncate(11);
    empty.extend_from_slice(&[9; 48]);
    assert_eq!(
        decode(&empty),
        Err(WireError::NodeId(NodeIdError::Length(0)))
    );
    let mut utf = init.clone();
    utf[11] = 0xff;
    assert!(matches!(
        decode(&utf),
        Err(WireError::Invalid {
            field: "node id utf-8",
            ..
        })
    ));
    // Answer: Noise message outside its possible sizes.
    assert!(matches!(
        decode(&handshake_answer(1, &[0; 100])),
        Err(WireError::Invalid {
            field: "handshake answer length",
            value: 100
        })
    ));
    assert!(matches!(
        decode(&handshake_answer(1, &[0; 300])),
        Err(WireError::Invalid { .. })
    ));
    // Payload: bad round flag, bad phase, trailing bytes, truncation.
    let p = AnswerPayload {
        term: 1,
        seq: 1,
        member: 2,
        controller_key: [3; 32],
        current: GroupKey::from_bytes(Epoch(4), [5; 32]),
        round: Some((
            RoundPhase::Draining,
            GroupKey::from_bytes(Epoch(5), [6; 32]),
        )),
    };
    let b = answer_payload(&p).to_vec();
    let flag = 4 + 8 + 4 + 32 + 4 + 32;
    let mut x = b.clone();
    x[flag] = 2;
    assert!(matches!(
        decode_answer_payload(&x),
        Err(WireError::Invalid {
            field: "round flag",
            value: 2
        })
    ));
    let mut x = b.clone();
    x[flag + 5] = 9;
    assert!(matches!(
        decode_answer_payload(&x),
        Err(WireError::Invalid {
            field: "round phase",
            ..
        })
    ));
    let mut x = b.clone();
    x.push(0);
    assert_eq!(decode_answer_payload(&x), Err(WireError::Trailing(1)));
    for cut in 0..b.len() {
        assert!(decode_answer_payload(&b[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn shares_are_where_the_table_says() {
    // Key update: after epoch and seq; key response: after in_reply_to; replies
    // and key requests: after member (and step).
    let ku = key_update(
        1,
        Epoch(1),
        2,
        &Share([0xaa; 32]),
        &[0xcc; 32],
        &[(3, WrappedKey([0; 60]))],
    );
    assert_eq!(&ku[18..50], &[0xaa; 32]);
    // The transition commitment: after the member range and the entry count.
    assert_eq!(&ku[60..92], &[0xcc; 32]);
    let a = ack(Step::KeyUpdate, Epoch(1), 2, 3, &Share([0xbb; 32]));
    assert_eq!(&a[18..50], &[0xbb; 32]);
    let k = key_request(Epoch(1), Step::KeyUpdate, 2, 3, &Share([0xcc; 32]));
    assert_eq!(&k[19..51], &[0xcc; 32]);
    // A reply cut inside its share is refused.
    let b = mac(a, &keys());
    assert!(matches!(
        decode(&b[..b.len() - 20]),
        Err(WireError::Truncated { .. })
    ));
}

#[test]
fn key_update_header_range_must_match_entries() {
    let entries = [
        (5, WrappedKey([0; WRAPPED_LEN])),
        (9, WrappedKey([0; WRAPPED_LEN])),
    ];
    let mut body = key_update(1, Epoch(1), 1, &Share([0; 32]), &[0; 32], &entries);
    body[50..54].copy_from_slice(&4u32.to_be_bytes()); // first = 4, entries start at 5
    let bytes = sign(body, &signing());
    assert!(matches!(
        decode(&bytes),
        Err(WireError::BatchRange { first: 4, .. })
    ));
}

/// Found by the `wire_decode` fuzz target: a batch whose first and last
/// entries match its header but whose middle entry lies outside it (members
/// 3, 2, 9 under 3..=9) decoded, and a node's binary search could miss its
/// entry. Entries must rise strictly: unsorted or repeated members are refused.
#[test]
fn key_update_entries_must_rise_strictly() {
    let w = WrappedKey([0; WRAPPED_LEN]);
    for (members, previous, member) in [
        (&[3u32, 2, 9][..], 3, 2),
        (&[3, 10, 9][..], 10, 9),
        (&[3, 3, 9][..], 3, 3),
        (&[3, 9, 9][..], 9, 9),
    ] {
        let entries: Vec<_> = members.iter().map(|m| (*m, w)).collect();
        let bytes = sign(
            key_update(1, Epoch(1), 1, &Share([0; 32]), &[0; 32], &entries),
            &signing(),
        );
        assert_eq!(
            decode(&bytes),
            Err(WireError::BatchOrder { previous, member }),
            "{members:?}"
        );
    }
    let entries: Vec<_> = [3u32, 4, 9].iter().map(|m| (*m, w)).collect();
    let bytes = sign(
        key_update(1, Epoch(1), 1, &Share([0; 32]), &[0; 32], &entries),
        &signing(),
    );
    assert!(matches!(decode(&bytes), Ok(Message::KeyUpdate(_))));
}

#[test]
fn node_id_rules() {
    assert!(NodeId::parse("pump-7.hall_B").is_ok());
    assert_eq!(NodeId::parse(""), Err(NodeIdError::Length(0)));
    assert_eq!(NodeId::parse(&"a".repeat(65)), Err(NodeIdError::Length(65)));
    assert_eq!(NodeId::parse("a b"), Err(NodeIdError::Character(' ')));
    assert_eq!(NodeId::parse("é"), Err(NodeIdError::Character('é')));
}

/// Each field of a beacon that can be wrong is refused with its name.
#[test]
fn beacon_refusals_name_the_field() {
    let addr = SocketAddr::from(([10, 0, 0, 1], 47800));
    let good = beacon(1, Epoch(4), 7, Some((Epoch(5), RoundPhase::Draining)), addr);
    // layout: ver type | term 2..6 | epoch 6..10 | seq 10..18 | phase 18 | round epoch 19..23 | family 23 | addr 24..28 | port 28..30
    let refused = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut body = good.clone();
        edit(&mut body);
        decode(&sign(body, &signing())).map(|m| m.name())
    };
    assert_eq!(
        refused(&|b| b[18] = 5),
        Err(WireError::Invalid {
            field: "round phase",
            value: 5
        })
    );
    assert_eq!(
        refused(&|b| b[19..23].copy_from_slice(&4u32.to_be_bytes())),
        Err(WireError::Invalid {
            field: "round epoch",
            value: 4
        })
    );
    assert_eq!(
        refused(&|b| b[23] = 5),
        Err(WireError::Invalid {
            field: "address family",
            value: 5
        })
    );
    assert!(matches!(
        refused(&|b| b[23] = 6),
        Err(WireError::Truncated {
            what: "IPv6 address",
            ..
        })
    ));
    assert!(matches!(
        refused(&|b| {
            b.pop();
        }),
        Err(WireError::Truncated { what: "port", .. })
    ));
    assert_eq!(refused(&|_| {}), Ok("beacon"));
    // No round: the phase byte is 0 and no round epoch follows.
    let none = sign(beacon(1, Epoch(4), 7, None, addr), &signing());
    assert_eq!(none.len(), 2 + 4 + 4 + 8 + 1 + 1 + 4 + 2 + SIGNATURE_LEN);
    assert!(matches!(
        decode(&none),
        Ok(Message::Beacon(Beacon { round: None, .. }))
    ));
    // A signature too short to be one.
    assert!(matches!(
        decode(&sign(good.clone(), &signing())[..40]),
        Err(WireError::Truncated {
            what: "signature",
            ..
        })
    ));
}

/// A version 1 datagram (what the previous release sends) is refused, and the
/// error says what to do.
#[test]
fn older_versions_are_refused_with_advice_and_unchanged_layouts_are_read_across_one_revision() {
    // Revision 1: every message refused, with advice.
    let mut a = mac(
        ack(Step::KeyUpdate, Epoch(1), 1, 1, &Share([3; 32])),
        &keys(),
    );
    assert_eq!(
        a[0], PREVIOUS_VERSION,
        "an acknowledgement keeps revision 2's byte"
    );
    a[0] = 1;
    let e = decode(&a).unwrap_err();
    assert_eq!(e, WireError::Version(1));
    let text = e.to_string();
    assert!(
        text.contains("version 1") && text.contains("version 3") && text.contains("upgrade"),
        "{text}"
    );
    let mut b = sign(
        beacon(1, Epoch(1), 1, None, SocketAddr::from(([127, 0, 0, 1], 1))),
        &signing(),
    );
    b[0] = 1;
    assert_eq!(decode(&b), Err(WireError::Version(1)));
    // Revision 2's key update and transition requests (no commitment, no
    // reveal: what a controller not yet upgraded sends) are refused by their
    // version, not misread as short revision-3 ones.
    let w = WrappedKey([1; 60]);
    let mut ku = sign(
        key_update(1, Epoch(1), 1, &Share([1; 32]), &[0; 32], &[(1, w)]),
        &signing(),
    );
    assert_eq!(ku[0], VERSION);
    ku[0] = PREVIOUS_VERSION;
    ku.drain(60..92);
    assert_eq!(decode(&ku), Err(WireError::Version(PREVIOUS_VERSION)));
    for step in [Step::FirstTransition, Step::SecondTransition] {
        let mut t = sign(transition(1, step, Epoch(1), 1, &[0; 32]), &signing());
        assert_eq!(t[0], VERSION);
        t[0] = PREVIOUS_VERSION;
        t.drain(18..50);
        assert_eq!(decode(&t), Err(WireError::Version(PREVIOUS_VERSION)));
    }
    // Every other message is laid out as in revision 2 and carries its byte:
    // a program one revision behind reads it, and this one reads theirs
    // (group data across a fleet that upgrades one appliance at a time).
    let d = [data_header(3, 1, Some(Epoch(1)), &[0; 12]), vec![0; 16]].concat();
    assert_eq!(d[0], PREVIOUS_VERSION);
    assert!(matches!(decode(&d), Ok(Message::Data(_))));
}

#[test]
fn a_round_phase_has_one_name_in_text_and_json_and_reads_its_old_json_name() {
    let names: Vec<&str> = RoundPhase::ALL.iter().map(|p| p.as_str()).collect();
    assert_eq!(
        names,
        [
            "distributing",
            "first_transition",
            "draining",
            "second_transition"
        ]
    );
    let old = [
        "Distributing",
        "FirstTransition",
        "Draining",
        "SecondTransition",
    ];
    for (i, p) in RoundPhase::ALL.into_iter().enumerate() {
        assert_eq!(RoundPhase::from_u8(i as u8 + 1), Ok(p), "wire order");
        assert_eq!(p.to_string(), p.as_str());
        assert_eq!(RoundPhase::from_name(p.as_str()), Some(p));
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, format!("\"{}\"", p.as_str()));
        assert_eq!(serde_json::from_str::<RoundPhase>(&json).unwrap(), p);
        let written_before = format!("\"{}\"", old[i]);
        assert_eq!(
            serde_json::from_str::<RoundPhase>(&written_before).unwrap(),
            p
        );
    }
    assert_eq!(RoundPhase::from_name("Distribute"), None);
}

/// `KNOWN_KINDS` (the kinds whose version `decode` checks before reading a
/// field) is exactly the set of kinds `decode` reads: a kind added to one and
/// not the other would be read without its version check, or refused.
#[test]
fn the_kinds_whose_version_is_checked_are_the_kinds_decode_reads() {
    for ty in 0..=u8::MAX {
        let reads = [VERSION, PREVIOUS_VERSION]
            .iter()
            .any(|&v| decode(&[v, ty]) != Err(WireError::UnknownType(ty)));
        assert_eq!(
            super::KNOWN_KINDS.contains(&ty),
            reads,
            "type 0x{ty:02x}: listed {} but read {reads}",
            super::KNOWN_KINDS.contains(&ty)
        );
        if reads {
            let other = if version_of(ty) == VERSION {
                PREVIOUS_VERSION
            } else {
                VERSION
            };
            assert_eq!(
                decode(&[other, ty]),
                Err(WireError::Version(other)),
                "type 0x{ty:02x} under the other version"
            );
        }
    }
}
