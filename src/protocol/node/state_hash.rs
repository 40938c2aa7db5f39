//! `Hash` for [`NodeMachine`]: two machines that hash equally behave alike on
//! every later input. The model check (tests/model_check.rs) identifies
//! states by it.
//!
//! Every field is named (no `..`): a field added to the machine fails to
//! compile here until its author decides whether it belongs in the hash.
//! Left out are only fields fixed for the machine's life: the configuration
//! and the per-node keys derived from the initial key. Group keys are hashed
//! by epoch and check value, never by their bytes.

use super::{Joined, NodeMachine};
use std::hash::{Hash, Hasher};

impl Hash for Joined {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let Joined { member, controller } = self;
        member.hash(state);
        controller.to_bytes().hash(state);
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
            ctl_replay,
            last_verified,
            sync,
            queued,
            ahead,
            data_replay,
            data_replay_next,
            usage_due,
        } = self;
        node_id.hash(state);
        joined.hash(state);
        keyring.hash(state);
        seq.hash(state);
        seq_reserved.hash(state);
        ctl_replay.hash(state);
        last_verified.hash(state);
        sync.hash(state);
        queued.hash(state);
        ahead.hash(state);
        data_replay.hash(state);
        data_replay_next.hash(state);
        usage_due.hash(state);
    }
}
