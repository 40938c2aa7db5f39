//! `Hash` for [`NodeMachine`]: two machines that hash equally behave alike on
//! every later input. The model check (tests/protocol/model_check.rs) identifies
//! states by it.
//!
//! Every field is named (no `..`): a field added to the machine fails to
//! compile here until its author decides whether it belongs in the hash.
//! Left out are only fields fixed for the machine's life (the configuration
//! and the per-node keys derived from the initial key) and counters kept for
//! the operator that no decision reads (`signature_checks`, `beacon_stats`). Group keys are hashed
//! by epoch and check value, never by their bytes.

use super::{Handshake, Joined, NodeMachine, NodeRatchet};
use std::hash::{Hash, Hasher};

impl Hash for Joined {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let Joined { member, controller } = self;
        member.hash(state);
        controller.to_bytes().hash(state);
    }
}

impl Hash for NodeRatchet {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let NodeRatchet { chain, secret } = self;
        chain.hash(state);
        secret.hash(state);
    }
}

/// The init's bytes (its seed made them), never the seed.
impl Hash for Handshake {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let Handshake {
            seq,
            seed: _,
            bytes,
            sent,
        } = self;
        (seq, bytes, sent).hash(state);
    }
}

impl Hash for NodeMachine {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let NodeMachine {
            cfg: _,
            node_id,
            keys: _,
            joined,
            keyring,
            seq,
            seq_reserved,
            term,
            ctl_replay,
            verified,
            failed,
            last_reanswer,
            last_gap,
            verify_tokens,
            verify_at,
            signature_checks: _,
            commit,
            reveal_checks: _,
            usage_reports: _,
            sync,
            queued,
            ahead,
            data_replay,
            usage_due,
            beacon_best,
            beacon_digest,
            beacon_arrival,
            beacon_tokens,
            beacon_refill,
            beacon_stats: _,
            last_nudge,
            ratchet,
            handshake,
            route,
            beacon_join,
            synced_by,
            last_request,
            prepared,
            announced,
            durable_announced,
            maybe_stepped,
        } = self;
        node_id.hash(state);
        joined.hash(state);
        keyring.hash(state);
        seq.hash(state);
        seq_reserved.hash(state);
        term.hash(state);
        ctl_replay.hash(state);
        verified.hash(state);
        failed.hash(state);
        last_reanswer.hash(state);
        last_gap.hash(state);
        verify_tokens.hash(state);
        verify_at.hash(state);
        commit.hash(state);
        sync.hash(state);
        queued.hash(state);
        ahead.hash(state);
        data_replay.hash(state);
        usage_due.hash(state);
        beacon_best.hash(state);
        beacon_digest.hash(state);
        beacon_arrival.hash(state);
        beacon_tokens.hash(state);
        beacon_refill.hash(state);
        last_nudge.hash(state);
        // The ratchet by check values; the handshake in flight by its init bytes.
        ratchet.hash(state);
        handshake.hash(state);
        route.hash(state);
        beacon_join.hash(state);
        synced_by.hash(state);
        last_request.hash(state);
        prepared.hash(state);
        (announced, durable_announced, maybe_stepped).hash(state);
    }
}
