//! `keyfleet-agent`: the node agent on each appliance.
//!
//! `run` holds the group key and moves through the node states; `status`,
//! `send` and `recv` talk to it (or read its state file) from a shell. The
//! runtime is the library's [`keyfleet::agent`]; this file parses flags and
//! prints. Links no peripheral crate: only `keyfleet_core::label` (pure).
//!
//! Exit codes: 0 done; 1 error (the message on stderr says what to do);
//! 2 bad command line; 3 `recv --count N` timed out before N messages, or
//! `send` dropped the message (the agent's hold queue is full).
#![forbid(unsafe_code)]

/// stdout through [`keyfleet::logs::out`]: a closed pipe ends the program
/// quietly instead of with a panic.
macro_rules! println {
    () => { keyfleet::logs::out(format_args!(""), true) };
    ($($t:tt)*) => { keyfleet::logs::out(format_args!($($t)*), true) };
}

mod client;

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};
use zeroize::Zeroizing;

use keyfleet::agent::{self, AgentConfig};
use keyfleet::net::NetArgs;
use keyfleet_core::crypto::InitialKey;
use keyfleet_core::protocol::NodeConfig;
use keyfleet_core::wire::NodeId;

#[derive(Parser, Debug)]
#[command(
    name = "keyfleet-agent",
    version,
    about = "The node agent: holds the group key on an appliance, encrypts and decrypts group messages for local applications"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (until SIGTERM or SIGINT).
    Run(RunArgs),
    /// Show the node's state: from the running agent if it answers, else from the state file.
    Status {
        #[command(flatten)]
        state: StateArg,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Send TEXT to the group through the running agent.
    Send {
        #[command(flatten)]
        state: StateArg,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// The message (at most 1153 bytes).
        text: String,
    },
    /// Print group messages the running agent delivers, one per line.
    Recv {
        #[command(flatten)]
        state: StateArg,
        /// Stop after N messages (exit 3 if the timeout comes first).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after S seconds.
        #[arg(long, value_name = "S")]
        timeout: Option<f64>,
        /// At the end, one JSON object with every message on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (keyfleet-agent.1, keyfleet-agent-run.1, ...) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Args, Debug)]
struct StateArg {
    /// The agent's state directory (state.json, app.sock).
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("key").args(["initial_key", "initial_key_file"])))]
struct RunArgs {
    /// The state directory (created with mode 0700).
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// The node id this appliance is enrolled under.
    #[arg(long, value_name = "ID")]
    node_id: String,
    /// The initial key in the hex or decimal form (or a KF1: label). Visible in
    /// the process list: prefer --initial-key-file. Needed on the first start only.
    #[arg(long, value_name = "FORM")]
    initial_key: Option<String>,
    /// A file holding the initial key's hex or decimal form (or a KF1: label);
    /// it must be readable by its owner only.
    #[arg(long, value_name = "FILE")]
    initial_key_file: Option<PathBuf>,
    #[command(flatten)]
    net: NetArgs,
    /// The unicast socket for the controller's replies [default: IFACE:0, any free port].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddrV4>,
    /// Where joins, key requests, replies and usage reports go [default: the group,
    /// where the controller listens].
    #[arg(long, value_name = "ADDR:PORT")]
    controller: Option<SocketAddr>,
    /// Send a usage report (encryption and decryption counts) every S seconds; 0 = never.
    #[arg(long, value_name = "S", default_value_t = 60)]
    usage_interval: u64,
    /// Put the key's epoch in the header of the data this agent sends
    /// (`always`), or leave it out (`never`: receivers then try the keys they
    /// hold, claims 14-16; the epoch does not travel in clear).
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = EpochHint::Always)]
    epoch_hint: EpochHint,
    /// Refused datagrams: log the first of a kind from a source address in a
    /// window of S seconds, count the rest and log how many when it closes
    /// (0 = a line for every one).
    #[arg(long, value_name = "S", default_value_t = 60)]
    refusal_log_window: u64,
    /// Serve Prometheus metrics on http://ADDR/metrics and a health check on
    /// /healthz (200 while the agent's loop answers).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Log lines on stderr: text (colour only on a terminal) or json (one object a line).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t)]
    log_format: keyfleet::ops::LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum EpochHint {
    Always,
    Never,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Command::Run(args) => {
            keyfleet::ops::init_logs("info", args.log_format);
            rt.block_on(run(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            keyfleet::ops::print_completions(Cli::command(), shell);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => keyfleet::ops::write_man_pages(Cli::command(), &dir)
            .map(|()| ExitCode::SUCCESS)
            .with_context(|| format!("cannot write the man pages into {}", dir.display())),
        Command::Status { state, json } => rt
            .block_on(client::status(&state.state, json))
            .map(|()| ExitCode::SUCCESS),
        Command::Send { state, json, text } => rt.block_on(client::send(&state.state, &text, json)),
        Command::Recv {
            state,
            count,
            timeout,
            json,
        } => rt.block_on(client::recv(&state.state, count, timeout, json)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            keyfleet::logs::report("keyfleet-agent", &e);
            ExitCode::from(1)
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node_id = NodeId::parse(&args.node_id)
        .with_context(|| format!("--node-id {:?} is not a valid node id", args.node_id))?;
    let initial_key = initial_key(&args, &node_id)?;
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddrV4::new(args.net.iface, 0));
    let net = args.net.config(listen);
    let node = NodeConfig {
        controller: args.controller.unwrap_or(SocketAddr::V4(args.net.group)),
        usage_interval_ms: (args.usage_interval > 0)
            .then(|| args.usage_interval.saturating_mul(1000)),
        epoch_hint: args.epoch_hint == EpochHint::Always,
        ..NodeConfig::default()
    };
    let cfg = AgentConfig {
        state_dir: args.state.clone(),
        node_id,
        initial_key,
        net,
        node,
        refusal_log_window_ms: args.refusal_log_window.saturating_mul(1000),
    };
    // Set up the handlers before anything else, so no signal is missed.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).context("while installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("while installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    };
    let extras = agent::RunExtras {
        metrics: args.metrics,
        ready: Some(Box::new(|r: &agent::Ready| {
            keyfleet::ops::notify_ready(&format!(
                "listening on {}{}",
                r.listen,
                r.metrics
                    .map_or(String::new(), |m| format!("; metrics on {m}"))
            ))
        })),
    };
    let r = agent::run_with(cfg, extras, shutdown)
        .await
        .with_context(|| format!("keyfleet-agent --state {}", args.state.display()));
    keyfleet::ops::notify_stopping();
    r
}

/// The initial key from --initial-key or --initial-key-file, checked by `label::parse`.
fn initial_key(args: &RunArgs, node_id: &NodeId) -> anyhow::Result<Option<InitialKey>> {
    let (text, what) = match (&args.initial_key, &args.initial_key_file) {
        (Some(form), _) => {
            tracing::warn!("the initial key on the command line is visible in the process list; prefer --initial-key-file");
            (Zeroizing::new(form.clone()), "--initial-key".to_owned())
        }
        (None, Some(path)) => (read_key_file(path)?, path.display().to_string()),
        (None, None) => return Ok(None),
    };
    let parsed = keyfleet_core::label::parse(&text)
        .with_context(|| format!("the initial key in {what} is not valid"))?;
    if let Some(id) = &parsed.node_id {
        if id.as_str() != node_id.as_str() {
            bail!(
                "the label in {what} is for node {:?}, not --node-id {:?}",
                id.as_str(),
                node_id.as_str()
            );
        }
    }
    Ok(Some(parsed.key.clone()))
}

/// Reads a key file that only its owner may read (no symlink).
fn read_key_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    keyfleet::statefile::check_private_file(path).context("the initial key file is refused")?;
    let bytes = Zeroizing::new(
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    let text = std::str::from_utf8(&bytes).with_context(|| {
        format!(
            "{} is not text (expected the hex or decimal form)",
            path.display()
        )
    })?;
    Ok(Zeroizing::new(text.to_owned()))
}
