//! `keyfleet status` (the fleet table) and `keyfleet history` (keys, rounds,
//! audit), read from the management table; they work while `serve` runs.
use clap::Args;
use serde::Serialize;

use keyfleet::store::{
    AddressChange, AuditKind, AuditRecord, KeyRecord, NodeRecord, RecordedState, RoundRecord,
};

use crate::fleet::{when, GlobalArgs};
use keyfleet_core::wire::RoundPhase;

/// A round's phase in words, as `rekey` prints it (`finished` once it has none).
fn phase(r: &RoundRecord) -> String {
    r.phase
        .map_or("finished", RoundPhase::as_str)
        .replace('_', " ")
}

/// `keyfleet status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print {epoch, round, nodes, leader} as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Status {
    epoch: Option<u64>,
    round: Option<RoundRecord>,
    nodes: Vec<NodeRecord>,
    /// The leader lease: who leads, under which term (issue 16).
    leader: Option<keyfleet::store::LeaseRecord>,
}

fn ago(now: u64, ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(t) => {
            let s = now.saturating_sub(t) / 1000;
            match s {
                0..=119 => format!("{s}s ago"),
                120..=7199 => format!("{}m ago", s / 60),
                _ => format!("{}h ago", s / 3600),
            }
        }
    }
}

/// The fleet table: columns as wide as their longest cell (a long node id or
/// an IPv6 address widens its column instead of pushing the others out of line).
fn node_table(nodes: &[NodeRecord], now: u64) -> comfy_table::Table {
    use comfy_table::{CellAlignment, ColumnConstraint, Table};
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header([
            "NODE",
            "MEMBER",
            "ADDRESS",
            "STATE",
            "EPOCH",
            "LAST SEEN",
            "STALE",
            "KEY CHECK",
        ]);
    for n in nodes {
        t.add_row([
            n.node_id.clone(),
            n.member_no.to_string(),
            n.address
                .clone()
                .unwrap_or_else(|| "(not heard from yet)".into()),
            n.state.as_str().to_owned(),
            n.epoch.map_or("-".into(), |e| e.to_string()),
            ago(now, n.last_seen_ms),
            if n.stale { "stale" } else { "" }.to_owned(),
            n.key_check.clone(),
        ]);
    }
    for i in [1, 4] {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    if let Some(c) = t.column_mut(0) {
        c.set_constraint(ColumnConstraint::ContentWidth);
    }
    let last = t.column_count().saturating_sub(1);
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, if i == last { 0 } else { 2 }));
    }
    t
}

pub fn status(g: &GlobalArgs, a: StatusArgs) -> anyhow::Result<()> {
    let store = g
        .state_dir()?
        .open_table(g.config()?.store.url.as_deref())?;
    let st = Status {
        epoch: store.current_epoch()?,
        round: store.unfinished_round()?,
        nodes: store.nodes()?,
        leader: store.lease()?,
    };
    if a.json {
        println!("{}", serde_json::to_string(&st)?);
        return Ok(());
    }
    let now = keyfleet::net::Clock::wall().now_ms();
    match (&st.epoch, &st.round) {
        (e, Some(r)) => {
            println!(
                "group key epoch {}, rotating to {} (phase {} since {}{})",
                e.unwrap_or(0),
                r.epoch,
                phase(r),
                when(r.phase_started_at_ms),
                r.paused_at_ms
                    .map_or(String::new(), |t| format!("; paused since {}", when(t)))
            );
            if let (Some(_), Some(why)) = (r.paused_at_ms, &r.pause_detail) {
                println!("  {why}");
            }
        }
        (e, None) => println!("group key epoch {}; no round in progress", e.unwrap_or(0)),
    }
    // A shared table names its leader; the embedded one has only one.
    if let Some(l) = st.leader.as_ref().filter(|l| l.expires_in_ms.is_some()) {
        match l.expires_in_ms {
            Some(0) => println!(
                "no leader: the lease of {} (term {}) ran out",
                l.holder, l.term
            ),
            Some(ms) => println!("leader {} (term {}), lease {ms} ms left", l.holder, l.term),
            None => {}
        }
    }
    println!("{}", node_table(&st.nodes, now));
    let count = |f: &dyn Fn(&NodeRecord) -> bool| st.nodes.iter().filter(|n| f(n)).count();
    let not_joined = count(&|n| n.state == RecordedState::Enrolled);
    println!(
        "{} nodes enrolled: {} joined ({} stale), {} not joined",
        st.nodes.len(),
        st.nodes.len() - not_joined,
        count(&|n| n.stale),
        not_joined
    );
    Ok(())
}

/// `keyfleet history`.
#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// Print {keys, rounds, address_changes, audit} as JSON.
    #[arg(long)]
    pub json: bool,
    /// Audit entries to show, newest last (0: none).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub audit: u32,
}

#[derive(Serialize)]
struct History {
    keys: Vec<KeyRecord>,
    rounds: Vec<RoundRecord>,
    /// Every address change of a node, with the authenticated message that caused it.
    address_changes: Vec<AddressChange>,
    audit: Vec<AuditRecord>,
}

fn last_audit(store: &keyfleet::store::Store, n: u32) -> anyhow::Result<Vec<AuditRecord>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    // The log is read forward in pages; keep the last n.
    let mut out: std::collections::VecDeque<AuditRecord> = Default::default();
    let mut after = 0;
    loop {
        let page = store.audit_log(after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for r in page {
            if out.len() == n as usize {
                out.pop_front();
            }
            out.push_back(r);
        }
    }
    Ok(out.into())
}

pub fn history(g: &GlobalArgs, a: HistoryArgs) -> anyhow::Result<()> {
    let store = g
        .state_dir()?
        .open_table(g.config()?.store.url.as_deref())?;
    let h = History {
        keys: store.history()?,
        rounds: store.rounds()?,
        address_changes: store.address_changes()?,
        audit: last_audit(&store, a.audit)?,
    };
    if a.json {
        println!("{}", serde_json::to_string(&h)?);
        return Ok(());
    }
    println!("KEYS");
    for k in &h.keys {
        println!(
            "  epoch {:<4} created {}  check {}  trigger {}{}{}",
            k.epoch,
            when(k.created_at_ms),
            k.check_value,
            k.trigger,
            k.activated_at_ms
                .map_or("  not current (its round has not completed)".into(), |t| {
                    format!("  current from {}", when(t))
                }),
            k.retired_at_ms
                .map_or(String::new(), |t| format!("  retired {}", when(t)))
        );
        for d in &k.deliveries {
            println!(
                "    {:<20} sent {} ({} times)  acknowledged {}",
                d.node_id,
                d.first_sent_at_ms.map_or("-".into(), when),
                d.attempts,
                d.acked_at_ms.map_or("-".into(), when)
            );
        }
        for h in &k.handouts {
            let via = match h.via {
                keyfleet::store::Handout::Join => "join",
                keyfleet::store::Handout::KeyRequest => "key request",
            };
            println!(
                "    {:<20} handed out {} (answer to its {via})",
                h.node_id,
                when(h.at_ms)
            );
        }
    }
    println!("ROUNDS");
    for r in &h.rounds {
        let p = &r.phases_ms;
        println!(
            "  epoch {:<4} started {}  {}  nodes {} acked {} stale {}  {}",
            r.epoch,
            when(r.started_at_ms),
            match (r.outcome, r.paused_at_ms) {
                (Some(o), _) if r.pauses > 0 => format!("{o} after {} pause(s)", r.pauses),
                (Some(o), _) => o.to_string(),
                (None, Some(t)) => format!("PAUSED in phase {} since {}", phase(r), when(t)),
                (None, None) => format!("in progress, phase {}", phase(r)),
            },
            r.nodes,
            r.acked.map_or("-".into(), |v| v.to_string()),
            r.stale.map_or("-".into(), |v| v.to_string()),
            RoundPhase::ALL
                .map(|ph| format!("{} {} ms", ph.as_str().replace('_', " "), p.get(ph)))
                .join(", "),
        );
    }
    if !h.address_changes.is_empty() {
        println!("ADDRESS CHANGES");
        for c in &h.address_changes {
            println!(
                "  {}  {:<20} {} -> {}  (its {} #{})",
                when(c.at_ms),
                c.node_id,
                c.old_address.as_deref().unwrap_or("(none)"),
                c.new_address,
                c.message,
                c.seq
            );
        }
    }
    if a.audit > 0 {
        println!("AUDIT (last {})", a.audit);
        for e in &h.audit {
            println!(
                "  {}  {:<14} {:<20} {}",
                when(e.at_ms),
                e.kind.as_str(),
                e.node_id.as_deref().unwrap_or("-"),
                audit_text(e)
            );
        }
    }
    Ok(())
}

/// An audit entry's detail for a reader: refusals and their summaries in
/// words, anything else as its JSON.
fn audit_text(e: &AuditRecord) -> String {
    let d = &e.detail;
    let text = |k: &str| d[k].as_str().map(str::to_owned);
    match e.kind {
        AuditKind::RefusalSummary => {
            let (Some(count), Some(kind), Some(source), Some(first), Some(last)) = (
                d["count"].as_u64(),
                text("kind"),
                text("source"),
                d["first_ms"].as_u64(),
                d["last_ms"].as_u64(),
            ) else {
                return d.to_string();
            };
            let window = d["window_ms"].as_u64().map_or(String::new(), |w| {
                format!(" (counted in a {} s window)", w / 1000)
            });
            format!(
                "{count} more refusal{} of kind {kind} from {source} between {} and {}{window}",
                if count == 1 { "" } else { "s" },
                when(first),
                when(last),
            )
        }
        AuditKind::RoundPaused => text("text").unwrap_or_else(|| d.to_string()),
        AuditKind::Refusal => match (text("from"), text("reason")) {
            (Some(from), Some(reason)) => format!("from {from}: {reason}"),
            _ => d.to_string(),
        },
        _ => d.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_rows_read_as_a_sentence() {
        let sum = keyfleet_core::ratecount::Summary {
            source: keyfleet_core::ratecount::Source::Other,
            kind: "malformed",
            count: 19_999,
            window_start_ms: 1_764_083_000_000,
            window_ms: 60_000,
            first_ms: 1_764_083_000_010,
            last_ms: 1_764_083_004_990,
        };
        let e = AuditRecord {
            id: 7,
            at_ms: sum.last_ms,
            kind: AuditKind::RefusalSummary,
            node_id: None,
            detail: sum.detail(),
        };
        assert_eq!(
            audit_text(&e),
            "19999 more refusals of kind malformed from other sources between \
             2025-11-25T15:03:20Z and 2025-11-25T15:03:24Z (counted in a 60 s window)"
        );
        let r = AuditRecord {
            kind: AuditKind::Refusal,
            detail: serde_json::json!({"from": "192.0.2.1:4000", "reason": "malformed datagram: empty"}),
            ..e.clone()
        };
        assert_eq!(
            audit_text(&r),
            "from 192.0.2.1:4000: malformed datagram: empty"
        );
        let odd = AuditRecord {
            detail: serde_json::json!({"count": "many"}),
            ..e
        };
        assert_eq!(audit_text(&odd), r#"{"count":"many"}"#);
    }
}
