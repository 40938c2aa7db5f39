//! `keyfleet rekey` and `keyfleet remove`: through a running `keyfleet serve`
//! (its control socket), or by running the round here when none runs.
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use keyfleet::controller::control::{self, Reply, Request};
use keyfleet::controller::{Controller, ControllerError, RoundCommand, RoundReport, StateDir};
use keyfleet::secrets::SecretsError;
use keyfleet::wire::NodeId;

use crate::fleet::{self, GlobalArgs, NetFlags};

/// `keyfleet rekey`.
#[derive(Args, Debug)]
#[command(
    after_help = "Talks to a running `keyfleet serve` over its control socket; without one, runs the \
round here (after waiting up to rekey.join_wait_ms for enrolled nodes that never joined). \
Exit codes: 0 the round completed (see stale for nodes left out); 1 it could not run."
)]
pub struct RekeyArgs {
    /// Print {epoch, nodes, acked, stale, elapsed_ms, phases_ms, check, waited_ms} when done.
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

fn print_round(r: &RoundReport) {
    let p = &r.phases_ms;
    println!(
        "epoch {} (check {}): {} nodes, {} acknowledged, {} stale, in {} ms \
         (distribute {} ms, first transition {} ms, drain {} ms, second transition {} ms)",
        r.epoch,
        r.check,
        r.nodes,
        r.acked,
        r.stale,
        r.elapsed_ms,
        p.distributing,
        p.first_transition,
        p.draining,
        p.second_transition
    );
}

pub fn rekey(g: &GlobalArgs, a: RekeyArgs) -> anyhow::Result<()> {
    fleet::init_logging("warn");
    let st = g.state_dir()?;
    let rt = fleet::runtime()?;
    rt.block_on(fleet::refuse_other_network(&st, &a.net))?;
    let pb = fleet::progress_bar(a.json);
    let report = rt.block_on(async {
        match route(&st, || g.options(Some(&a.net))).await? {
            Route::Serve(s) => {
                match control::call(s, &Request::Rekey, |p| fleet::show_progress(&pb, p))
                    .await
                    .context("talking to keyfleet serve")?
                {
                    Reply::Rekeyed(r) => Ok(r),
                    Reply::Error { message } => bail!("keyfleet serve refused: {message}"),
                    other => bail!("keyfleet serve answered {other:?}"),
                }
            }
            Route::Here(mut c) => c
                .run_round(RoundCommand::Rekey, |p| fleet::show_progress(&pb, p))
                .await
                .context("while running the rekey round")?
                .context("no round was started"),
        }
    });
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let report = report?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_round(&report);
    }
    Ok(())
}

pub fn remove(g: &GlobalArgs, a: RemoveArgs) -> anyhow::Result<()> {
    fleet::init_logging("warn");
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
                match control::call(s, &req, |p| fleet::show_progress(&pb, p))
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
                    .run_round(RoundCommand::Remove(node_id.clone()), |p| {
                        fleet::show_progress(&pb, p)
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
    Ok(())
}
