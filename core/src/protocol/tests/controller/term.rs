//! Leader terms (issue 16).

use super::*;

/// The leader term of every controller message in `out` that carries one.
fn terms(bytes: &[u8]) -> Option<u32> {
    match wire::decode(bytes).ok()? {
        Message::KeyUpdate(k) => Some(k.term),
        Message::Transition(t) => Some(t.term),
        Message::KeyResponse(k) => Some(k.term),
        Message::Resync(r) => Some(r.term),
        Message::Beacon(b) => Some(b.term),
        _ => None,
    }
}

/// Issue 16: a standby restored from the shared state takes over a round in
/// each phase under term 2 and finishes it; from then on the deposed leader
/// (term 1) moves no node, whatever it sends; a live machine given a higher
/// term mid-phase sends nothing of the old term after it.
#[test]
fn a_leader_of_a_higher_term_finishes_the_round_and_the_deposed_one_moves_nobody() {
    for phase_at_takeover in [
        RoundPhase::Distributing,
        RoundPhase::FirstTransition,
        RoundPhase::SecondTransition,
    ] {
        let mut f = TestFleet::held_in(phase_at_takeover);
        assert_eq!(f.c.term(), TERM);
        let persist = f.persisted();
        let mut deposed = f.c.clone();
        f.c = ControllerMachine::restore(&persist, f.cfg.clone(), f.now).unwrap();
        let mut out = Vec::new();
        f.c.set_term(2, &mut out);
        f.apply(out);
        f.queue.clear();
        f.drop = Box::new(|_, _, b| terms(b).is_some_and(|t| t != 2));
        f.ctl(ControllerInput::Start).unwrap();
        let sent_terms: Vec<_> = f.queue.iter().filter_map(|(_, _, b)| terms(b)).collect();
        assert!(
            !sent_terms.is_empty() && sent_terms.iter().all(|t| *t == 2),
            "{phase_at_takeover:?}: {sent_terms:?}"
        );
        f.pump();
        f.advance(2_000);
        f.pump();
        assert_eq!(f.phase(), None, "{phase_at_takeover:?}");
        assert_eq!(f.states(), vec![UC2; 3], "{phase_at_takeover:?}");
        assert!(f.nodes.iter().all(|n| n.term() == 2));

        // The deposed leader wakes up: a rekey, its deadlines (retries, its
        // beacon). All it sends is refused as stale_term and no node moves.
        let before = f.states();
        let mut out = Vec::new();
        let _ = deposed.handle(f.now, ControllerInput::Rekey, &mut f.rng, &mut out);
        for _ in 0..2 {
            let _ = deposed.handle(
                f.now.plus(5_000),
                ControllerInput::Timeout,
                &mut f.rng,
                &mut out,
            );
        }
        let mut refused = 0;
        let mut stale = 0;
        for a in out {
            let bytes = match a {
                ControllerAction::SendGroup(b) | ControllerAction::SendTo { bytes: b, .. } => b,
                _ => continue,
            };
            assert_eq!(terms(&bytes), Some(1));
            for i in 0..f.nodes.len() {
                let got = f.node(
                    i,
                    NodeInput::Datagram {
                        from: ctl_addr(),
                        bytes: &bytes,
                    },
                );
                if let Some(r) = refusal(&got) {
                    refused += 1;
                    stale += usize::from(r.kind() == "stale_term");
                }
                assert!(sent(&got).is_empty(), "{got:?}");
            }
        }
        f.queue.clear();
        assert!(
            refused > 0 && refused == stale,
            "{refused} refused, {stale} stale_term"
        );
        assert_eq!(f.states(), before, "{phase_at_takeover:?}");
    }

    // A live machine given a higher term mid-phase: its resends carry it.
    let mut f = TestFleet::new(3, test_cfg());
    let blocked = is_ack_from(2, Step::FirstTransition);
    f.drop = Box::new(move |_, _, b| blocked(b));
    f.ctl(ControllerInput::Rekey).unwrap();
    f.pump();
    f.advance(300);
    assert_eq!(f.phase(), Some(RoundPhase::FirstTransition));
    let mut out = Vec::new();
    f.c.set_term(5, &mut out);
    f.apply(out);
    f.drop = Box::new(|_, _, b| terms(b).is_some_and(|t| t != 5));
    f.advance(2_000);
    f.pump();
    assert_eq!(f.phase(), None);
    assert_eq!(f.states(), vec![UC2; 3]);
    assert!(f.nodes.iter().all(|n| n.term() == 5));
}
