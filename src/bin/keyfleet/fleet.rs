//! What the controller commands share: `--state`, `--config`, the passphrase,
//! the network flags; and `init`, `config`, `serve`.
use std::io::IsTerminal;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use keyfleet::config::Config;
use keyfleet::controller::{self, Options, StateDir};
use keyfleet::secrets::Passphrase;
use zeroize::Zeroizing;

/// The global flags of the controller commands.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// The controller's state directory (secrets, management table, control
    /// socket) [default: $XDG_DATA_HOME/keyfleet, i.e. ~/.local/share/keyfleet].
    #[arg(long, global = true, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// TOML configuration file (`keyfleet config --print-default` shows every
    /// key and its default); flags override it.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Read the passphrase that seals the controller's secrets from this file
    /// (overrides `secrets.passphrase_file`; otherwise $KEYFLEET_PASSPHRASE).
    #[arg(long, global = true, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// The network flags of the commands that talk to the fleet; they override `[network]`.
#[derive(Args, Debug, Clone, Default)]
pub struct NetFlags {
    /// Multicast group and port the fleet shares [config: network.group; default 239.255.77.77:7777].
    #[arg(long, value_name = "ADDR:PORT")]
    pub group: Option<SocketAddrV4>,
    /// Local interface address to join the group on [config: network.iface; default 0.0.0.0].
    #[arg(long, value_name = "ADDR")]
    pub iface: Option<Ipv4Addr>,
    /// The controller's unicast port [config: network.listen_port; default 47800].
    #[arg(long, value_name = "PORT")]
    pub listen_port: Option<u16>,
    /// Drop this fraction of received datagrams (0 to 1), for tests.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub loss: f64,
    /// Seed of the loss injection.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub loss_seed: u64,
}

impl GlobalArgs {
    pub fn state_dir(&self) -> anyhow::Result<StateDir> {
        match &self.state {
            Some(d) => Ok(StateDir::new(d)),
            None => StateDir::default_dir()
                .map(StateDir::new)
                .context("no data directory for this user ($HOME unset?); give --state DIR"),
        }
    }

    pub fn config(&self) -> anyhow::Result<Config> {
        match &self.config {
            Some(p) => Ok(Config::load(p)?),
            None => Ok(Config::default()),
        }
    }

    /// The options for a controller, with the network flags applied.
    pub fn options(&self, net: Option<&NetFlags>) -> anyhow::Result<Options> {
        let mut cfg = self.config()?;
        if let Some(n) = net {
            if let Some(g) = n.group {
                cfg.network.group = g;
            }
            if let Some(i) = n.iface {
                cfg.network.iface = i;
            }
            if let Some(p) = n.listen_port {
                cfg.network.listen_port = p;
            }
            cfg.validate()?;
        }
        let mut opts = Options::new(self.state_dir()?, cfg);
        opts.passphrase = self.passphrase(&opts.config)?;
        if opts.passphrase.is_none()
            && std::io::stdin().is_terminal()
            && keyfleet::secrets::is_sealed(&opts.state.secrets())
                .ok()
                .flatten()
                == Some(true)
        {
            opts.passphrase = Some(prompt(&format!(
                "passphrase of the controller in {}: ",
                opts.state.dir.display()
            ))?);
        }
        if let Some(n) = net {
            if !(0.0..=1.0).contains(&n.loss) {
                bail!("--loss {} is not between 0 and 1", n.loss);
            }
            opts.loss = n.loss;
            opts.loss_seed = n.loss_seed;
        }
        Ok(opts)
    }

    /// The passphrase from the flag, the config file or the environment (not prompted).
    fn passphrase(&self, cfg: &Config) -> anyhow::Result<Option<Passphrase>> {
        let file = self
            .passphrase_file
            .as_ref()
            .or(cfg.secrets.passphrase_file.as_ref());
        if let Some(f) = file {
            keyfleet::statefile::check_private_file(f)
                .with_context(|| format!("the passphrase file {}", f.display()))?;
            let text = Zeroizing::new(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading the passphrase file {}", f.display()))?,
            );
            let line = text.lines().next().unwrap_or("");
            if line.is_empty() {
                bail!("the passphrase file {} is empty", f.display());
            }
            return Ok(Some(Zeroizing::new(line.to_owned())));
        }
        match std::env::var(&cfg.secrets.passphrase_env) {
            Ok(p) if !p.is_empty() => Ok(Some(Zeroizing::new(p))),
            _ => Ok(None),
        }
    }
}

/// Asks for a passphrase on the terminal, without echo.
fn prompt(question: &str) -> anyhow::Result<Passphrase> {
    let p = Zeroizing::new(rpassword::prompt_password(question).context("reading the passphrase")?);
    if p.is_empty() {
        bail!("an empty passphrase seals nothing; give one, or leave the secrets unsealed");
    }
    Ok(p)
}

/// Logs to stderr (colour only on a terminal); RUST_LOG overrides `default`.
pub fn init_logging(default: &str) {
    keyfleet::ops::init_logs(default, keyfleet::ops::LogFormat::Text);
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// `keyfleet init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Print {state, epoch, check, public_key, sealed} as JSON.
    #[arg(long)]
    pub json: bool,
    /// Seal the secrets with a passphrase asked for on the terminal (twice), when
    /// none comes from --passphrase-file, the config file or $KEYFLEET_PASSPHRASE.
    #[arg(long)]
    pub seal: bool,
}

pub fn init(g: &GlobalArgs, a: InitArgs) -> anyhow::Result<()> {
    init_logging("warn");
    let mut opts = g.options(None)?;
    if a.seal && opts.passphrase.is_none() {
        if !std::io::stdin().is_terminal() {
            bail!("--seal asks for the passphrase on a terminal; otherwise use --passphrase-file FILE or $KEYFLEET_PASSPHRASE");
        }
        let p = prompt("new passphrase for the controller's secrets: ")?;
        if *prompt("the same passphrase again: ")? != *p {
            bail!("the two passphrases differ; nothing was created");
        }
        opts.passphrase = Some(p);
    }
    let r = controller::init(&opts).context("while initialising the controller")?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "controller initialised in {}\n  group key epoch {} (check {})\n  controller public key {}\n  secrets {}",
            r.state.display(),
            r.epoch,
            r.check,
            r.public_key,
            if r.sealed {
                "sealed with the passphrase"
            } else {
                "owner-only, not sealed (set KEYFLEET_PASSPHRASE or --passphrase-file to seal)"
            }
        );
    }
    Ok(())
}

/// `keyfleet config`.
#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// Print the default configuration file, with comments, instead of the effective one.
    #[arg(long)]
    pub print_default: bool,
}

pub fn config(g: &GlobalArgs, a: ConfigArgs) -> anyhow::Result<()> {
    if a.print_default {
        print!("{}", Config::default_toml());
    } else {
        let c = g.config()?;
        print!(
            "{}",
            toml::to_string(&c).context("printing the configuration")?
        );
    }
    Ok(())
}

/// `keyfleet serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub net: NetFlags,
    /// Serve Prometheus metrics on http://ADDR/metrics and a health check on
    /// /healthz (200 while the loop runs and its table and network work, else 503).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Log lines on stderr: text (colour only on a terminal) or json (one object a line).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t)]
    pub log_format: keyfleet::ops::LogFormat,
}

pub fn serve(g: &GlobalArgs, a: ServeArgs) -> anyhow::Result<()> {
    keyfleet::ops::init_logs("info", a.log_format);
    let opts = g.options(Some(&a.net))?;
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = controller::Controller::open(opts).context("while starting keyfleet serve")?;
        // The handlers are installed now, before READY=1: a SIGTERM right
        // after readiness is a clean stop, not the default action.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term =
            signal(SignalKind::terminate()).context("while installing the SIGTERM handler")?;
        let mut int =
            signal(SignalKind::interrupt()).context("while installing the SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        };
        let extras = controller::ServeExtras {
            metrics: a.metrics,
            ready: Some(Box::new(|r: &controller::Ready| {
                keyfleet::ops::notify_ready(&format!(
                    "serving group {} on {}{}",
                    r.group,
                    r.listen,
                    r.metrics
                        .map_or(String::new(), |m| format!("; metrics on {m}"))
                ))
            })),
        };
        let r = c
            .serve_with(shutdown, extras)
            .await
            .context("keyfleet serve");
        keyfleet::ops::notify_stopping();
        r
    })
}

/// A progress bar on stderr when it is a terminal and no JSON was asked for.
pub fn progress_bar(json: bool) -> Option<indicatif::ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} epoch {prefix} {msg:18} [{bar:30}] {pos}/{len} acknowledged",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    Some(pb)
}

pub fn show_progress(pb: &Option<indicatif::ProgressBar>, p: &controller::Progress) {
    if let Some(pb) = pb {
        pb.set_prefix(p.epoch.to_string());
        pb.set_message(p.phase.replace('_', " "));
        pb.set_length(p.total.into());
        pb.set_position(p.acked.into());
    }
}

/// A time in the management table (ms since the Unix epoch) for people.
pub fn when(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}
