//! `keyfleet rekey` and `keyfleet remove`: through a running `keyfleet serve`
//! (its control socket), or by running the round here when none runs.
use std::cell::RefCell;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use keyfleet::controller::control::{self, Reply, Request};
use keyfleet::controller::{
    CarriedOnBy, Command, Controller, ControllerError, Queued, RoundOutcome, RoundReport, StateDir,
};
use keyfleet::secrets::SecretsError;
use keyfleet_core::wire::{NodeId, RoundPhase};

use crate::fleet::{self, GlobalArgs, NetFlags};

/// `keyfleet rekey`.
#[derive(Args, Debug)]
#[command(
    after_help = "Talks to a running `keyfleet serve` over its control socket; without one, runs the \
round here (after waiting up to rekey.join_wait_ms for enrolled nodes that never joined). \
A round waiting behind another one says so. Exit codes: 0 the round completed and every joined \
node acknowledged it; 1 it could not run; 2 bad command line; 3 it completed but left stale nodes \
out (named); 4 it did not complete: too few nodes answered (named), the old key stays current and \
serve (or the next rekey) carries the round on; 130 interrupted (Ctrl-C; the round goes on in \
serve, or the next rekey finishes it)."
)]
pub struct RekeyArgs {
    /// Print the report as JSON: {outcome, epoch, current_epoch, nodes, joined, acked, stale,
    /// not_joined, stale_nodes, not_joined_nodes, silent_nodes, elapsed_ms, phases_ms, check,
    /// waited_ms, earlier, ...}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub net: NetFlags,
}

/// `keyfleet remove`.
#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// The node to remove; the next group key is not sent to it.
    #[arg(value_name = "NODE_ID")]
    pub node_id: String,
    /// Print {node_id, round} as JSON when done.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub net: NetFlags,
}

/// Where a command runs: in the daemon, or here.
pub enum Route {
    Serve(tokio::net::UnixStream),
    Here(Box<Controller>),
}

/// Connects to `keyfleet serve`, or takes the state directory to work here.
/// A daemon that is starting holds the lock before its socket is bound: retry a moment.
pub async fn route(
    st: &StateDir,
    opts: impl Fn() -> anyhow::Result<keyfleet::controller::Options>,
) -> anyhow::Result<Route> {
    for attempt in 0..25 {
        if let Some(s) = control::connect(&st.socket()).await {
            tracing::debug!("talking to keyfleet serve");
            return Ok(Route::Serve(s));
        }
        match Controller::open(opts()?) {
            Ok(c) => return Ok(Route::Here(Box::new(c))),
            Err(ControllerError::Busy { .. }) if attempt < 24 => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e @ ControllerError::Secrets(SecretsError::PassphraseRequired { .. })) => {
                return Err(e).context(
                    "the controller's secrets are sealed: set $KEYFLEET_PASSPHRASE or give --passphrase-file FILE",
                )
            }
            Err(e) => return Err(e).context("while opening the controller state"),
        }
    }
    unreachable!("the last attempt returns")
}

/// Exit codes of `rekey` and `remove` (README "Exit codes").
pub const EXIT_STALE: u8 = 3;
pub const EXIT_PAUSED: u8 = 4;
pub const EXIT_INTERRUPTED: u8 = 130;

fn names(v: &[String]) -> String {
    v.join(", ")
}

fn print_round(r: &RoundReport) {
    for e in &r.earlier {
        println!("first, the round already in progress:");
        print_round(e);
        println!("then the round of this command:");
    }
    let phases = RoundPhase::ALL
        .map(|ph| {
            let ms = r.phases_ms.get(ph);
            format!("{} {ms} ms", ph.as_str().replace('_', " "))
        })
        .join(", ");
    match r.outcome {
        RoundOutcome::Completed => println!(
            "epoch {} (check {}): completed in {} ms ({phases}){}",
            r.epoch,
            r.check,
            r.elapsed_ms,
            if r.pauses > 0 {
                format!(", after {} pause(s)", r.pauses)
            } else {
                String::new()
            }
        ),
        RoundOutcome::Paused => println!(
            "epoch {} (check {}): NOT completed: {} of {} joined nodes confirmed phase {}, {} needed; \
             the group key stays at epoch {}",
            r.epoch,
            r.check,
            r.acked,
            r.joined,
            r.phase.as_deref().unwrap_or("?").replace('_', " "),
            r.needed.unwrap_or(0),
            r.current_epoch
        ),
    }
    println!(
        "  {} enrolled: {} joined, {} acknowledged, {} stale, {} not joined",
        r.nodes, r.joined, r.acked, r.stale, r.not_joined
    );
    if !r.silent_nodes.is_empty() {
        println!("  did not answer: {}", names(&r.silent_nodes));
    }
    if !r.stale_nodes.is_empty() {
        println!(
            "  stale (left out; they catch up with a key request when they come back): {}",
            names(&r.stale_nodes)
        );
    }
    if !r.not_joined_nodes.is_empty() {
        println!(
            "  not joined (enrolled, never heard from; they get the key when they join): {}",
            names(&r.not_joined_nodes)
        );
    }
    if r.outcome == RoundOutcome::Paused {
        if r.acked == 0 {
            println!(
                "  no node answered: the controller itself may be cut off from the fleet \
                 (its interface, the group, --iface); nobody was marked stale"
            );
        }
        match r.carried_on_by {
            Some(CarriedOnBy::Serve) => println!(
                "  keyfleet serve carries the round on: it keeps retrying and completes it once \
                 nodes answer (keyfleet status shows it)"
            ),
            _ => println!(
                "  the round is left paused: the next keyfleet rekey or keyfleet serve carries \
                 it on"
            ),
        }
    }
}

/// The exit code a round report calls for: stale nodes or a round that did
/// not complete are failures (an earlier round's too).
pub fn exit_code(r: &RoundReport) -> ExitCode {
    if r.outcome != RoundOutcome::Completed {
        ExitCode::from(EXIT_PAUSED)
    } else if r.stale > 0 || r.earlier.iter().any(RoundReport::failed) {
        ExitCode::from(EXIT_STALE)
    } else {
        ExitCode::SUCCESS
    }
}

/// What the command knows of the round while it waits, for its messages.
#[derive(Default)]
struct Watch {
    /// The newest round epoch seen in progress.
    round: Option<u32>,
    queued: Option<Queued>,
}

/// The non-final replies: progress to the bar, a queued notice to stderr.
fn on_update(pb: &Option<indicatif::ProgressBar>, w: &RefCell<Watch>, r: &Reply) {
    match r {
        Reply::Progress(p) => {
            if p.phase != "waiting_for_joins" {
                w.borrow_mut().round = Some(p.epoch);
            }
            fleet::show_progress(pb, p);
        }
        Reply::Queued(q) => {
            let text = queued_text(q);
            match pb {
                Some(pb) => pb.suspend(|| eprintln!("{text}")),
                None => eprintln!("{text}"),
            }
            let mut w = w.borrow_mut();
            w.round = Some(q.running_epoch);
            w.queued = Some(q.clone());
        }
        _ => {}
    }
}

fn queued_text(q: &Queued) -> String {
    let running = format!(
        "the round for epoch {} is in progress ({}{}{})",
        q.running_epoch,
        q.running_phase.replace('_', " "),
        if q.paused {
            ", paused: retrying it now"
        } else {
            ""
        },
        if q.resumed {
            "; a controller that stopped left it"
        } else {
            ""
        }
    );
    if q.joined_queue {
        format!(
            "{running}; a rekey is already queued behind it: this one joins it (epoch {})",
            q.epoch
        )
    } else {
        format!(
            "{running}; this rekey is queued: the round for epoch {} follows it",
            q.epoch
        )
    }
}

/// Ctrl-C while waiting: say what becomes of the round.
fn interrupted(w: &Watch, serve: bool) -> String {
    let Some(e) = w.round else {
        return "interrupted before a round began: nothing changed".into();
    };
    let own = w.queued.as_ref().map_or(String::new(), |q| {
        format!(
            " (the round for epoch {} this command asked for follows it)",
            q.epoch
        )
    });
    if serve {
        format!(
            "interrupted: the round for epoch {e} goes on in keyfleet serve{own}; \
             keyfleet status shows it"
        )
    } else {
        format!(
            "interrupted: the round for epoch {e} is left unfinished; the next keyfleet rekey \
             or keyfleet serve finishes it (the old key stays current until then)"
        )
    }
}

pub fn rekey(g: &GlobalArgs, a: RekeyArgs) -> anyhow::Result<ExitCode> {
    fleet::init_logging("warn");
    let st = g.state_dir()?;
    let rt = fleet::runtime()?;
    rt.block_on(fleet::refuse_other_network(&st, &a.net))?;
    let pb = fleet::progress_bar(a.json);
    let watch = RefCell::new(Watch::default());
    let via_serve = std::cell::Cell::new(false);
    let report = rt.block_on(async {
        let work = async {
            match route(&st, || g.options(Some(&a.net))).await? {
                Route::Serve(s) => {
                    via_serve.set(true);
                    match control::call(s, &Request::Rekey, |r| on_update(&pb, &watch, r))
                        .await
                        .context("talking to keyfleet serve")?
                    {
                        Reply::Rekeyed(r) => Ok(r),
                        Reply::Error { message } => bail!("keyfleet serve refused: {message}"),
                        other => bail!("keyfleet serve answered {other:?}"),
                    }
                }
                Route::Here(mut c) => c
                    .run_round(Command::Rekey, |r| on_update(&pb, &watch, r))
                    .await
                    .context("while running the rekey round")?
                    .context("no round was started"),
            }
        };
        tokio::select! {
            r = work => r.map(Some),
            _ = tokio::signal::ctrl_c() => Ok(None),
        }
    });
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let Some(report) = report? else {
        eprintln!("{}", interrupted(&watch.borrow(), via_serve.get()));
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_round(&report);
    }
    if report.failed() {
        let mut why = Vec::new();
        if report.outcome == RoundOutcome::Paused {
            why.push(format!(
                "the round for epoch {} did not complete (nodes that did not answer: {})",
                report.epoch,
                if report.silent_nodes.is_empty() {
                    "none live".to_string()
                } else {
                    names(&report.silent_nodes)
                }
            ));
        }
        if !report.stale_nodes.is_empty() {
            why.push(format!("stale nodes: {}", names(&report.stale_nodes)));
        }
        eprintln!("keyfleet rekey: {}", why.join("; "));
    }
    Ok(exit_code(&report))
}

pub fn remove(g: &GlobalArgs, a: RemoveArgs) -> anyhow::Result<ExitCode> {
    fleet::init_logging("warn");
    let watch = RefCell::new(Watch::default());
    let node_id = NodeId::parse(&a.node_id)
        .map_err(|e| anyhow::anyhow!("{:?} is not a node id: {e}", a.node_id))?;
    let st = g.state_dir()?;
    let rt = fleet::runtime()?;
    rt.block_on(fleet::refuse_other_network(&st, &a.net))?;
    let pb = fleet::progress_bar(a.json);
    let report = rt.block_on(async {
        match route(&st, || g.options(Some(&a.net))).await? {
            Route::Serve(s) => {
                let req = Request::Remove {
                    node_id: a.node_id.clone(),
                };
                match control::call(s, &req, |r| on_update(&pb, &watch, r))
                    .await
                    .context("talking to keyfleet serve")?
                {
                    Reply::Removed(r) => Ok(r),
                    Reply::Error { message } => bail!("keyfleet serve refused: {message}"),
                    other => bail!("keyfleet serve answered {other:?}"),
                }
            }
            Route::Here(mut c) => {
                let round = c
                    .run_round(Command::Remove(node_id.clone()), |r| {
                        on_update(&pb, &watch, r)
                    })
                    .await
                    .with_context(|| format!("while removing {node_id}"))?;
                Ok(keyfleet::controller::RemoveReport {
                    node_id: node_id.to_string(),
                    round,
                })
            }
        }
    });
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let report = report?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{} removed", report.node_id);
        match &report.round {
            Some(r) => print_round(r),
            None => println!(
                "no rekey round (triggers.on_node_removed is off): it still holds the current key"
            ),
        }
    }
    Ok(report.round.as_ref().map_or(ExitCode::SUCCESS, exit_code))
}
