//! Issue 16.3 with real processes: a leader and a standby `keyfleet serve`
//! of one fleet on one PostgreSQL management table (a real server the test
//! starts), real `keyfleet-agent` processes on loopback multicast and an
//! application client per agent sending group messages all along. The
//! leader is killed with SIGKILL in each phase of a round (distributing, first
//! transition, draining, second transition) and once between rounds; each
//! time the standby takes the lease once it runs out, continues the round
//! from the table under the next term and finishes it: every node
//! acknowledges, no message is undecryptable or lost, and the table keeps
//! every node and key from before. The killed controller comes back as the
//! next standby. Figures: kill to the new leader's first message, and to the
//! round's end.

use crate::support;
use crate::support::{testpg, wiretap};

use keyfleet_core::wire::{self, Message, RoundPhase};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::fleet::{Fleet, Ledger};
use support::{wait_for, Proc};

const LEASE_MS: u64 = 1500;

/// One of the two controllers: its state directory and config file.
struct Controller {
    name: &'static str,
    state: PathBuf,
    config: PathBuf,
    port: u16,
}

impl Controller {
    fn cmd(&self, f: &Fleet, args: &[&str]) -> Command {
        f.keyfleet_at(&self.state, &self.config, args)
    }

    fn serve(&self, f: &Fleet) -> Proc {
        Proc::from(
            self.cmd(f, &["serve"])
                .stdout(Stdio::null())
                .stderr(f.log(&format!("serve-{}", self.name)))
                .spawn()
                .unwrap(),
        )
    }
}

/// The leader term and round phase a controller message shows.
fn seen(payload: &[u8]) -> Option<(u32, Option<RoundPhase>)> {
    match wire::decode(payload).ok()? {
        Message::Beacon(b) => Some((b.term, b.round.map(|(_, p)| p))),
        Message::KeyUpdate(k) => Some((k.term, None)),
        Message::Transition(t) => Some((t.term, None)),
        Message::KeyResponse(k) => Some((k.term, None)),
        Message::Resync(r) => Some((r.term, None)),
        _ => None,
    }
}

/// Where a kill happens.
#[derive(Clone, Copy, Debug)]
enum KillIn {
    Phase(RoundPhase),
    BetweenRounds,
}

#[test]
fn the_standby_finishes_a_round_whose_leader_was_killed_in_any_phase() {
    let _heavy = support::heavy();
    let Some(pg) = testpg::shared() else { return };
    let url = pg.create_db();
    // Each phase lasts long enough to kill the leader in it: node-00 holds
    // what it receives 600 ms (so every phase waits for its answer), and the
    // drain is a fixed 1.5 s.
    let store = format!(
        "[store]\nurl = \"{url}\"\nlease_ms = {LEASE_MS}\nlease_margin_ms = 500\n\
         [beacon]\ninterval_ms = 100\n[round]\ndrain_grace_ms = 1500\n"
    );
    let mut f = Fleet::new(5, &store);
    // The agents learn the leader's unicast address from its beacons, as
    // they must when it changes.
    f.controller_flag = false;
    f.nodes[0].args = ["--delay-ms", "600", "--data-delay-ms", "20"]
        .map(String::from)
        .to_vec();
    let a = Controller {
        name: "a",
        state: f.state(),
        config: f.dir.path().join("keyfleet.toml"),
        port: f.ctl_port,
    };
    let b_port = support::free_port();
    let b = Controller {
        name: "b",
        state: f.dir.path().join("standby"),
        config: f.dir.path().join("standby.toml"),
        port: b_port,
    };
    std::fs::write(
        &b.config,
        format!(
            "[network]\ngroup = \"{}\"\niface = \"127.0.0.1\"\nlisten_port = {b_port}\n{store}",
            f.group
        ),
    )
    .unwrap();
    f.init_and_enroll();
    keyfleet::statefile::ensure_private_dir(&b.state).unwrap();
    std::fs::copy(
        a.state.join("controller.secrets"),
        b.state.join("controller.secrets"),
    )
    .unwrap();

    let tap = wiretap::Tap::port(f.group.port());
    let mut leader = (a.serve(&f), &a);
    wait_for("a's beacons", 10_000, || {
        tap.heard()
            .iter()
            .any(|h| h.from.port() == a.port && seen(&h.payload).is_some())
    });
    let mut standby = (b.serve(&f), &b);
    let _agents = f.agents();
    let mut epoch = f.wait_converged(30_000);
    let before = f.status();
    let mut ledger = Ledger::start(&f, Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(300));

    let mut term = 1;
    let cases = [
        KillIn::Phase(RoundPhase::Distributing),
        KillIn::Phase(RoundPhase::FirstTransition),
        KillIn::Phase(RoundPhase::Draining),
        KillIn::Phase(RoundPhase::SecondTransition),
        KillIn::BetweenRounds,
    ];
    let mut figures = Vec::new();
    for case in cases {
        let (lp, lc) = (leader.1.port, leader.1);
        // The round, through the leader's control socket; its client learns
        // nothing more once the leader dies.
        let mut rekey = match case {
            KillIn::Phase(_) => Some(
                lc.cmd(&f, &["rekey", "--json"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            ),
            KillIn::BetweenRounds => None,
        };
        if let KillIn::Phase(phase) = case {
            wait_for(&format!("the leader's round in {phase:?}"), 15_000, || {
                tap.heard()
                    .iter()
                    .rev()
                    .take(50)
                    .any(|h| h.from.port() == lp && seen(&h.payload) == Some((term, Some(phase))))
            });
        }
        let heard_before = tap.heard().len();
        leader.0.kill9();
        let killed = Instant::now();
        if let Some(r) = rekey.as_mut() {
            let _ = r.wait();
        }
        let new_term = term + 1;
        let new_port = standby.1.port;
        wait_for(
            &format!("the standby's first message of term {new_term}"),
            10_000,
            || {
                tap.heard()[heard_before..].iter().any(|h| {
                    h.from.port() == new_port && seen(&h.payload).map(|s| s.0) == Some(new_term)
                })
            },
        );
        let first = killed.elapsed();
        // Nothing of the killed leader after the kill.
        assert!(
            tap.heard()[heard_before..]
                .iter()
                .all(|h| h.from.port() != lp),
            "the killed leader sent after its kill"
        );
        let want = match case {
            KillIn::Phase(_) => epoch + 1,
            KillIn::BetweenRounds => epoch,
        };
        let reached = f.wait_converged(20_000);
        assert_eq!(reached, want, "{case:?}");
        let done = killed.elapsed();
        println!(
            "{case:?}: leader {} killed; {} leads under term {new_term}: first message {} ms after \
             the kill (lease {LEASE_MS} ms), every node at epoch {want} {} ms after it",
            lc.name,
            standby.1.name,
            first.as_millis(),
            done.as_millis()
        );
        assert!(
            first <= Duration::from_millis(LEASE_MS + 2000),
            "{case:?}: the standby took {first:?}"
        );
        figures.push((case, first, done));
        epoch = want;
        term = new_term;
        // The killed one comes back as the standby.
        let back = lc;
        let restarted = back.serve(&f);
        std::mem::swap(&mut leader, &mut standby);
        standby = (restarted, back);
        std::thread::sleep(Duration::from_millis(300));
    }
    // One more round under the last leader: nothing left behind.
    let r: serde_json::Value = serde_json::from_slice(
        &leader
            .1
            .cmd(&f, &["rekey", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(r["outcome"], "completed", "{r}");
    assert_eq!(r["acked"], 5, "{r}");
    epoch += 1;
    assert_eq!(f.wait_converged(20_000), epoch);
    ledger.finish();

    // Every message reached every other application; none undecryptable.
    let (sent, missing) = ledger.missing(&f);
    let undecryptable = f.undecryptable();
    println!("{sent} messages sent, {missing} deliveries missing, {undecryptable} undecryptable");
    assert_eq!((missing, undecryptable), (0, 0));

    // The table kept every node and every key from before the kills.
    let after = f.status();
    assert_eq!(
        after["nodes"].as_array().unwrap().len(),
        before["nodes"].as_array().unwrap().len()
    );
    for n in before["nodes"].as_array().unwrap() {
        let row = after["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node_id"] == n["node_id"])
            .unwrap_or_else(|| panic!("{} lost: {after}", n["node_id"]));
        assert_eq!(row["member_no"], n["member_no"], "{row}");
        assert_eq!(row["key_check"], n["key_check"], "{row}");
        assert_eq!(row["epoch"].as_u64(), Some(epoch), "{row}");
    }
    let h = f.history();
    for e in 1..=epoch {
        assert!(
            h["keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["epoch"].as_u64() == Some(e)),
            "epoch {e} missing from the history"
        );
    }
    assert_eq!(
        after["leader"]["term"].as_u64(),
        Some(u64::from(term)),
        "{after}"
    );
    let _ = figures;
}
