//! `keyfleet enroll`: add an appliance to the management table under its
//! node id, address and initial key (typed as a FORM, or read from a source).
use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{bail, Context};
use clap::Args;
use keyfleet::controller::control::{self, Reply, Request};
use keyfleet::controller::EnrollReport;
use keyfleet::controller::{enrolment, ControllerError};
use keyfleet_core::crypto::InitialKey;
use keyfleet_core::wire::NodeId;
use zeroize::Zeroizing;

use crate::fleet::{self, GlobalArgs};
use crate::rekey::{route, Route};

/// `keyfleet enroll`.
#[derive(Args, Debug)]
#[command(
    group(clap::ArgGroup::new("initial_key").args(["key", "from"]).required(true)),
    after_help = "The initial key comes from --key FORM (typed) or --from SOURCE (read from a \
peripheral, with that source's flags: --device, --replay, --timeout...). FORM is the hex form \
(36 hex digits: key + CRC-16), the decimal form (41 digits: key + 2 check digits) or a label \
KF1:<node-id>:<hex form>, whose node id stands in for --node-id. --addr is optional: the \
controller learns each node's address from its first authenticated message. A second node with \
the same initial key or the same address is refused (--force enrolls it anyway, with a warning). \
The node gets the group key when it joins (a running `keyfleet serve` answers at once; \
otherwise the next `keyfleet rekey`)."
)]
pub struct EnrollArgs {
    /// The node's id (1–64 of A-Z a-z 0-9 . _ -); a label's node id may supply it.
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Where the node's agent listens (its --listen), HOST:PORT [default: learned
    /// from the node's first authenticated message].
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: Option<String>,
    /// The initial key as printed on the appliance (hex form, decimal form or label).
    #[arg(long, value_name = "FORM")]
    pub key: Option<String>,
    /// Read the initial key from this source instead of --key (see `keyfleet read-key --help`).
    #[cfg(feature = "drivers")]
    #[arg(long = "from", value_enum, value_name = "SOURCE")]
    pub from: Option<crate::input::SourceKind>,
    #[cfg(feature = "drivers")]
    #[command(flatten)]
    pub source: crate::input::SourceFlags,
    /// Enroll even when another node has the same initial key or the same address (warns).
    #[arg(long)]
    pub force: bool,
    /// Print {node_id, member, address, fingerprint} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The key and the node id the input carried.
fn read_key(a: &EnrollArgs) -> anyhow::Result<(InitialKey, Option<String>)> {
    #[cfg(feature = "drivers")]
    {
        use keyfleet_core::label;
        let parsed = if let Some(form) = &a.key {
            tracing::warn!("the initial key on the command line is visible in the process list and the shell history; prefer --from (a file, a scanner, a prompt)");
            let form = Zeroizing::new(form.clone());
            label::parse(&form).context("the initial key (--key) was refused")?
        } else if let Some(from) = a.from {
            let src = crate::input::KeySourceArgs {
                from,
                flags: a.source.clone(),
            };
            crate::input::read_initial_key(&src, false)?.parsed
        } else {
            bail!("give the initial key: --key FORM, or --from SOURCE");
        };
        let key = parsed.key.clone();
        Ok((key, parsed.node_id.map(|n| n.as_str().to_owned())))
    }
    #[cfg(not(feature = "drivers"))]
    {
        let _ = (a, Zeroizing::new(()));
        bail!("this keyfleet was built without the key forms (feature `drivers`); rebuild with default features")
    }
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    let mut addrs = addr
        .to_socket_addrs()
        .with_context(|| format!("--addr {addr:?} is not HOST:PORT (e.g. 192.168.1.20:7778)"))?;
    addrs
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("--addr {addr:?} has no IPv4 address"))
}

/// How long `enroll` waits for the leader's answer to a queued enrolment.
const ENROL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub fn enroll(g: &GlobalArgs, a: EnrollArgs) -> anyhow::Result<()> {
    fleet::init_logging("warn");
    // Not known yet: the controller learns it when the node joins.
    let addr = match &a.addr {
        Some(a) => resolve(a)?,
        None => SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let (key, label_id) = read_key(&a)?;
    let node_id = match (&a.node_id, label_id) {
        (Some(given), Some(l)) if *given != l => {
            bail!(
                "--node-id {given} differs from the node id {l} on the label; check the appliance"
            )
        }
        (Some(given), _) => given.clone(),
        (None, Some(l)) => l,
        (None, None) => bail!("give --node-id ID (the key form carried no node id)"),
    };
    let node_id = NodeId::parse(&node_id)
        .map_err(|e| anyhow::anyhow!("{node_id:?} is not a node id: {e}"))?;
    let st = g.state_dir()?;
    let rt = fleet::runtime()?;
    let report: EnrollReport = rt.block_on(async {
        let route = match route(&st, || g.options(None)).await {
            Ok(r) => r,
            // Another controller leads the shared table: queue the enrolment
            // in it for the leader (several installers at once).
            Err(e)
                if matches!(
                    e.downcast_ref::<ControllerError>(),
                    Some(ControllerError::LeaseTaken { .. })
                ) =>
            {
                let ask = enrolment::Ask {
                    node_id: &node_id,
                    initial_key: &key,
                    addr,
                    force: a.force,
                };
                return enrolment::through_table(&g.options(None)?, &ask, ENROL_WAIT)
                    .await
                    .with_context(|| {
                        format!("while enrolling {node_id} through the shared table")
                    });
            }
            Err(e) => return Err(e),
        };
        match route {
            Route::Serve(s) => {
                let req = Request::Enroll {
                    node_id: node_id.to_string(),
                    addr: addr.to_string(),
                    key: Zeroizing::new(hex::encode(key.0)),
                    force: a.force,
                };
                match control::call(s, &req, |_| {})
                    .await
                    .context("talking to keyfleet serve")?
                {
                    Reply::Enrolled(r) => Ok(r),
                    Reply::Error { message } => bail!("keyfleet serve refused: {message}"),
                    other => bail!("keyfleet serve answered {other:?}"),
                }
            }
            Route::Here(mut c) => c
                .enroll(node_id.clone(), key, addr, a.force)
                .await
                .with_context(|| format!("while enrolling {node_id}")),
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let at = match &report.address {
            None => "with no address yet (learned when it joins)".to_owned(),
            Some(a) => format!("at {a}"),
        };
        println!(
            "enrolled {} as member {} {at} (initial key fingerprint {})",
            report.node_id, report.member, report.fingerprint
        );
    }
    Ok(())
}

/// `keyfleet rejoin`: let a node whose enrollment is pinned run the
/// enrollment handshake once more.
#[derive(Args, Debug)]
#[command(
    after_help = "A node's enrollment is pinned by its first handshake: the controller answers no \
other handshake under its id, so its printed label no longer lets anyone join in its place. When \
the node lost its state (replaced storage, factory reset), allow one new handshake with this \
command: it is accepted for 10 minutes, recorded in the audit log, and answered at most once per \
250 ms."
)]
pub struct RejoinArgs {
    /// The node id.
    #[arg(long, value_name = "ID")]
    pub node_id: String,
    #[arg(long)]
    pub json: bool,
}

pub fn rejoin(g: &GlobalArgs, a: RejoinArgs) -> anyhow::Result<()> {
    fleet::init_logging("warn");
    let node_id = NodeId::parse(&a.node_id)
        .map_err(|e| anyhow::anyhow!("{:?} is not a node id: {e}", a.node_id))?;
    let st = g.state_dir()?;
    let rt = fleet::runtime()?;
    let report = rt.block_on(async {
        match route(&st, || g.options(None)).await? {
            Route::Serve(s) => {
                let req = Request::Rejoin {
                    node_id: node_id.to_string(),
                };
                match control::call(s, &req, |_| {})
                    .await
                    .context("talking to keyfleet serve")?
                {
                    Reply::RejoinAllowed(r) => Ok(r),
                    Reply::Error { message } => bail!("keyfleet serve refused: {message}"),
                    other => bail!("keyfleet serve answered {other:?}"),
                }
            }
            Route::Here(mut c) => c
                .allow_rejoin(node_id.clone())
                .await
                .with_context(|| format!("while allowing {node_id} to re-join")),
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} may run the enrollment handshake again for 10 minutes (until {} ms); it is recorded in the audit log",
            report.node_id, report.until_ms
        );
    }
    Ok(())
}
