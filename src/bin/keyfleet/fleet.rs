//! What the controller commands share: `--state`, `--config`, the passphrase,
//! the network flags; and `init`, `config`, `serve`.
use std::io::IsTerminal;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use keyfleet::config::{self, Config};
use keyfleet::controller::{self, Options, StateDir};
use keyfleet::secrets::Passphrase;
use zeroize::Zeroizing;

/// The flags of the controller commands (init, enroll, status, rekey,
/// remove, history, serve, config), before or after the command name.
#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// The controller's state directory (secrets, management table, control
    /// socket) [env: KEYFLEET_STATE; config: state_dir; default:
    /// $XDG_DATA_HOME/keyfleet, i.e. ~/.local/share/keyfleet].
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// TOML configuration file; it must exist [default: $KEYFLEET_CONFIG, else
    /// $XDG_CONFIG_HOME/keyfleet/config.toml, else /etc/keyfleet/config.toml,
    /// when they exist]. `keyfleet config` shows which file is used.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Read the passphrase that seals the controller's secrets from this file
    /// (overrides `secrets.passphrase_file`; otherwise $KEYFLEET_PASSPHRASE).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// The configuration once found (see [`GlobalArgs::resolved`]).
    #[arg(skip)]
    resolved: std::sync::OnceLock<(Config, config::Source)>,
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

impl NetFlags {
    /// Whether a network flag (group, interface, port) was given.
    fn any(&self) -> bool {
        self.group.is_some() || self.iface.is_some() || self.listen_port.is_some()
    }
}

/// A command that goes through a running `keyfleet serve` cannot move it to
/// another group, interface or port: network flags that differ from what it
/// runs on are refused rather than silently ignored.
pub async fn refuse_other_network(st: &StateDir, net: &NetFlags) -> anyhow::Result<()> {
    use keyfleet::controller::control::{self, Reply, Request};
    if !net.any() {
        return Ok(());
    }
    let Some(s) = control::connect(&st.socket()).await else {
        return Ok(());
    };
    let info = match control::call(s, &Request::Info, |_| {}).await {
        Ok(Reply::Info(i)) => i,
        // An older serve without the request: cannot tell, so refuse to guess.
        Ok(other) => bail!(
            "keyfleet serve runs on {} and cannot say on which group ({other:?}); leave out \
             --group/--iface/--listen-port, which it would ignore",
            st.dir.display()
        ),
        Err(e) => return Err(e).context("asking keyfleet serve where it runs"),
    };
    let mut differ = Vec::new();
    if let Some(g) = net.group.filter(|g| *g != info.group) {
        differ.push(format!("--group {g} (it runs on {})", info.group));
    }
    if let Some(i) = net.iface.filter(|i| *i != info.iface) {
        differ.push(format!("--iface {i} (it runs on {})", info.iface));
    }
    if let Some(p) = net.listen_port.filter(|p| *p != info.listen_port) {
        differ.push(format!(
            "--listen-port {p} (it listens on {})",
            info.listen_port
        ));
    }
    if !differ.is_empty() {
        bail!(
            "keyfleet serve is running on {} and does this round on its own network, not on {}; \
             leave the flag out, or stop serve and start it on the network you want",
            st.dir.display(),
            differ.join(", ")
        );
    }
    Ok(())
}

impl GlobalArgs {
    /// These flags given after the command name, over those given before it.
    pub fn merge(self, after: GlobalArgs) -> GlobalArgs {
        GlobalArgs {
            state: after.state.or(self.state),
            config: after.config.or(self.config),
            passphrase_file: after.passphrase_file.or(self.passphrase_file),
            resolved: std::sync::OnceLock::new(),
        }
    }

    /// The first of these flags given, for the commands they do not apply to.
    pub fn given(&self) -> Option<&'static str> {
        [
            (self.state.is_some(), "--state"),
            (self.config.is_some(), "--config"),
            (self.passphrase_file.is_some(), "--passphrase-file"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }

    /// The configuration (found once: `--config`, `$KEYFLEET_CONFIG`, the
    /// user's, the system's, or none; `KEYFLEET_*` applied) and where it came from.
    pub fn resolved(&self) -> anyhow::Result<&(Config, config::Source)> {
        if let Some(r) = self.resolved.get() {
            return Ok(r);
        }
        let found = config::discover(
            self.config.as_deref(),
            &|k| std::env::var(k).ok(),
            std::path::Path::new(config::SYSTEM_CONFIG),
        )?;
        tracing::info!(config = %found.1, "configuration");
        let overrides = config::env_overrides(&|k| std::env::var(k).ok());
        if !overrides.is_empty() {
            let names: Vec<&str> = overrides.iter().map(|(k, _)| *k).collect();
            tracing::info!(variables = ?names, "configuration overridden by the environment");
        }
        Ok(self.resolved.get_or_init(|| found))
    }

    /// `--state`, else `$KEYFLEET_STATE`, else the config's `state_dir`, else
    /// `$XDG_DATA_HOME/keyfleet`.
    pub fn state_dir(&self) -> anyhow::Result<StateDir> {
        if let Some(d) = &self.state {
            return Ok(StateDir::new(d));
        }
        if let Some(d) = &self.resolved()?.0.state_dir {
            return Ok(StateDir::new(d));
        }
        StateDir::default_dir()
            .map(StateDir::new)
            .context("no data directory for this user ($HOME unset?); give --state DIR")
    }

    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(self.resolved()?.0.clone())
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
        let (c, source) = g.resolved()?;
        let mut c = c.clone();
        let st = g.state_dir()?;
        c.state_dir = Some(st.dir.clone());
        let mut head = format!("# configuration: {source}\n");
        for (var, value) in config::env_overrides(&|k| std::env::var(k).ok()) {
            head.push_str(&format!("# overridden by ${var} = {value:?}\n"));
        }
        if g.state.is_some() {
            head.push_str("# state_dir from --state\n");
        }
        print!(
            "{head}{}",
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
        // The handlers are installed first: a SIGTERM while waiting as a
        // standby, or right after readiness, is a clean stop, not the default action.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term =
            signal(SignalKind::terminate()).context("while installing the SIGTERM handler")?;
        let mut int =
            signal(SignalKind::interrupt()).context("while installing the SIGINT handler")?;
        // Another controller leads a shared table: wait as its standby.
        // A standby is a running service (systemd's start does not time out
        // on it); its status line says whom it stands by for.
        let standby = controller::Controller::open_standby(opts, |leader, term| {
            keyfleet::ops::notify_ready(&format!(
                "standby: {leader} leads under term {term}; taking over when its lease runs out"
            ))
        });
        let mut c = tokio::select! {
            c = standby => c.context("while starting keyfleet serve")?,
            _ = int.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
        };
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
    // Log lines (a WARN during the round) are written above the bar.
    keyfleet::logs::set_progress_bar(Some(pb.clone()));
    Some(pb)
}

pub fn show_progress(pb: &Option<indicatif::ProgressBar>, p: &controller::Progress) {
    if let Some(pb) = pb {
        pb.set_prefix(p.epoch.to_string());
        let phase = p.phase.replace('_', " ");
        pb.set_message(if p.paused {
            format!("{phase} (paused)")
        } else {
            phase
        });
        pb.set_length(p.total.into());
        pb.set_position(p.acked.into());
    }
}

/// A time in the management table (ms since the Unix epoch) for people.
pub fn when(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}
