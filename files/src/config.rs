//! The controller's configuration file (TOML), with every default in one place.
//!
//! Which file ([`discover`]): `--config FILE`, else `$KEYFLEET_CONFIG`, else
//! `$XDG_CONFIG_HOME/keyfleet/config.toml` (`~/.config/keyfleet/config.toml`),
//! else `/etc/keyfleet/config.toml`, else none (the defaults). A file named by
//! `--config` or `$KEYFLEET_CONFIG` must exist; the other two are used when
//! they exist. Then the `KEYFLEET_*` variables of [`ENV_VARS`] override the
//! file ([`apply_env`]), and command-line flags override both; anything
//! left out takes the default below. `keyfleet config --print-default`
//! prints [`Config::default_toml`], the whole file with its defaults and
//! comments. Unknown keys are refused, so a typo is an error, not a silent default.
//!
//! Count and age triggers are switched off with `0`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use keyfleet_core::protocol::{ControllerConfig, TriggerConfig};

/// The group both programs use unless told otherwise: an administratively
/// scoped (organisation-local, RFC 2365) IPv4 multicast address.
pub const DEFAULT_GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 77), 7777);
/// The interface address unless told otherwise: `0.0.0.0`, the kernel picks the
/// interface by its routing table (the default route). On a host with several
/// interfaces, or without a default route, give the interface's address; for
/// tests on one host, `127.0.0.1` (loopback).
pub const DEFAULT_IFACE: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
/// The controller's unicast port unless told otherwise (the port the agents'
/// `NodeConfig::controller` names by default).
pub const DEFAULT_CONTROLLER_PORT: u16 = 47800;

/// What went wrong with the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not valid: {message}(`keyfleet config --print-default` shows every key)")]
    Parse { path: PathBuf, message: String },
    #[error("the configuration file {path} named by {by} does not exist; create it (`keyfleet config --print-default > FILE` writes the defaults) or name another")]
    Missing { path: PathBuf, by: &'static str },
    #[error("${var} = {value:?} is not valid: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{key} = {value} is not allowed: {reason}")]
    Value {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The controller's state directory (`--state`, `$KEYFLEET_STATE`);
    /// default `$XDG_DATA_HOME/keyfleet` (`~/.local/share/keyfleet`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    pub network: NetworkConfig,
    pub round: RoundConfig,
    pub triggers: TriggersConfig,
    pub secrets: SecretsConfig,
    pub rekey: RekeyConfig,
    pub audit: AuditConfig,
    pub limits: LimitsConfig,
    pub beacon: BeaconConfig,
    pub store: StoreConfig,
}

/// `[store]`: where the management table is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` for a PostgreSQL
    /// table (several controllers and installers can share it); unset: the
    /// embedded SQLite file `fleet.db` in the state directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How long `serve` goes on while the table cannot be written (ms): it
    /// holds back the sends of each pass whose rows were not written and
    /// retries the rows every second; past this it stops with an error.
    pub max_outage_ms: u64,
    /// The leader lease in a shared (PostgreSQL) table, in ms of the
    /// server's clock: the leader renews it every third of this.
    pub lease_ms: u64,
    /// The leader stops sending this many ms before its lease runs out (by
    /// its own clock, counted from when it asked), so that it is silent
    /// before a standby can take the lease.
    pub lease_margin_ms: u64,
}

/// What a `store.url` names; any other form is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreUrl<'a> {
    /// `postgres://...` or `postgresql://...`: the whole URL.
    Postgres(&'a str),
    /// `sqlite:PATH`: a SQLite file.
    Sqlite(&'a Path),
}

impl<'a> StoreUrl<'a> {
    /// The form of `url`, or `None` when it is neither a PostgreSQL URL nor
    /// `sqlite:` with a path.
    pub fn parse(url: &'a str) -> Option<StoreUrl<'a>> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Some(StoreUrl::Postgres(url));
        }
        match url.strip_prefix("sqlite:") {
            Some(p) if !p.is_empty() => Some(StoreUrl::Sqlite(Path::new(p))),
            _ => None,
        }
    }
}

/// `url` without its password (nor its query, which may hold one), for messages and logs.
pub fn redact_url(url: &str) -> String {
    let base = url.split('?').next().unwrap_or_default();
    if let Some((scheme, rest)) = base.split_once("://") {
        if let Some((auth, host)) = rest.rsplit_once('@') {
            if let Some((user, _)) = auth.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    base.to_owned()
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: None,
            max_outage_ms: 30_000,
            lease_ms: 6_000,
            lease_margin_ms: 2_000,
        }
    }
}

/// `[network]`: where the fleet is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// The multicast group and port the fleet shares (`--group`).
    pub group: SocketAddrV4,
    /// The local interface address to join the group on and send from (`--iface`);
    /// 0.0.0.0 lets the routing table choose, 127.0.0.1 is loopback (tests).
    pub iface: Ipv4Addr,
    /// The controller's unicast port, on `iface` (`--listen-port`); agents send
    /// their joins, replies and usage reports here or to the group.
    pub listen_port: u16,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            group: DEFAULT_GROUP,
            iface: DEFAULT_IFACE,
            listen_port: DEFAULT_CONTROLLER_PORT,
        }
    }
}

/// `[round]`: the timing of a rekey round (SPEC §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundConfig {
    /// A fixed wait after every node confirmed the first transition before the
    /// second (longer than any datagram stays in flight); unset (the default),
    /// the wait is measured: `drain_rtt_factor` times the first transition's
    /// longest time in flight, between `drain_floor_ms` and `max_flight_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_grace_ms: Option<u64>,
    /// The measured drain: this many times the first transition's longest
    /// time in flight (round trips less what requests and replies waited in
    /// the nodes' and the controller's sockets)…
    pub drain_rtt_factor: u32,
    /// …at least this long…
    pub drain_floor_ms: u64,
    /// …and at most this long: the longest any datagram stays in flight.
    pub max_flight_ms: u64,
    /// First retry of a request after this long, doubling…
    pub retry_initial_ms: u64,
    /// …up to this.
    pub retry_max_ms: u64,
    /// ± jitter on every retry, in percent.
    pub retry_jitter_pct: u8,
    /// Sends of each request to the whole group before per-node unicast.
    pub group_attempts: u32,
    /// A node that has not answered this long after a phase began is stale.
    pub stale_after_ms: u64,
    /// A phase ends, leaving silent nodes stale, only once at least this many
    /// nodes confirmed it; below that the round is paused and retried.
    pub min_acked: u32,
    /// …and more than half of the joined nodes, when true.
    pub min_acked_majority: bool,
}

impl Default for RoundConfig {
    fn default() -> Self {
        let c = ControllerConfig::default();
        RoundConfig {
            drain_grace_ms: c.drain_grace_ms,
            drain_rtt_factor: c.drain_rtt_factor,
            drain_floor_ms: c.drain_floor_ms,
            max_flight_ms: c.max_flight_ms,
            retry_initial_ms: c.retry_initial_ms,
            retry_max_ms: c.retry_max_ms,
            retry_jitter_pct: c.retry_jitter_pct,
            group_attempts: c.group_attempts,
            stale_after_ms: c.stale_after_ms,
            min_acked: c.min_acked,
            min_acked_majority: c.min_acked_majority,
        }
    }
}

/// `[triggers]`: when `keyfleet serve` rekeys by itself (SPEC §3); `0` is off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TriggersConfig {
    /// Fleet-wide encryptions under the current key above which to rekey.
    pub max_encryptions: u64,
    /// Fleet-wide decryptions under the current key above which to rekey.
    pub max_decryptions: u64,
    /// Encryptions + decryptions above which to rekey.
    pub max_total: u64,
    /// Rekey when the current key is older than this many ms.
    pub max_key_age_ms: u64,
    /// Rekey when group data comes from a sender not in the management table.
    pub on_unknown_sender: bool,
    /// Rekey when a node is removed, so that it does not get the new key.
    pub on_node_removed: bool,
    /// Allow `keyfleet rekey`.
    pub manual: bool,
}

impl Default for TriggersConfig {
    fn default() -> Self {
        let t = TriggerConfig::default();
        TriggersConfig {
            max_encryptions: t.max_encryptions.unwrap_or(0),
            max_decryptions: t.max_decryptions.unwrap_or(0),
            max_total: t.max_total.unwrap_or(0),
            max_key_age_ms: t.max_key_age_ms.unwrap_or(0),
            on_unknown_sender: t.on_unknown_sender,
            on_node_removed: t.on_node_removed,
            manual: t.manual,
        }
    }
}

/// `[secrets]`: the passphrase that seals the controller's secrets at rest.
///
/// With a passphrase, `keyfleet init` seals the secrets file (Argon2id +
/// AES-256-GCM) and every later command needs the same passphrase. Without one
/// the file is owner-only plaintext.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// Read the passphrase from this file (its first line; the file must be
    /// owner-only). `--passphrase-file` overrides it.
    pub passphrase_file: Option<PathBuf>,
    /// Otherwise read it from this environment variable, when set.
    pub passphrase_env: String,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        SecretsConfig {
            passphrase_file: None,
            passphrase_env: "KEYFLEET_PASSPHRASE".into(),
        }
    }
}

/// `[rekey]`: `keyfleet rekey` / `remove` when no `keyfleet serve` is running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RekeyConfig {
    /// Before the round, wait up to this long for enrolled nodes that have
    /// never joined to join (agents retry their join at most every ~10 s).
    pub join_wait_ms: u64,
    /// After a round some node missed (stale, or never joined), keep
    /// answering key requests this long; no wait when every node acknowledged.
    pub linger_ms: u64,
}

impl Default for RekeyConfig {
    fn default() -> Self {
        RekeyConfig {
            join_wait_ms: 12_000,
            linger_ms: 500,
        }
    }
}

/// `[beacon]`: the controller's signed beacon to the group (SPEC §5).
///
/// It tells the nodes the current epoch and the round's phase; a node that
/// finds itself behind asks for the current key at once, so a node that
/// missed something notices within about one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BeaconConfig {
    /// Send a beacon this often, in ms (0 = never; nodes then notice only at
    /// link changes, their usage reports and the next round).
    pub interval_ms: u64,
}

impl Default for BeaconConfig {
    fn default() -> Self {
        BeaconConfig {
            interval_ms: ControllerConfig::default().beacon_interval_ms,
        }
    }
}

/// `[audit]`: how refused datagrams reach the audit log and the log.
///
/// The first refusal of a kind from a source address in a window is written
/// in full; the rest are counted and summarized in one row when the window
/// closes (see [`keyfleet_core::ratecount`]), so a flood cannot fill the disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// The window, in ms; `0` writes every refusal in full (a flood then
    /// costs one row, about 320 bytes, per datagram).
    pub refusal_window_ms: u64,
    /// Source addresses tracked at once; refusals from further addresses in
    /// the same window share one "other sources" count per kind.
    pub refusal_max_sources: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            refusal_window_ms: keyfleet_core::ratecount::DEFAULT_WINDOW_MS,
            refusal_max_sources: keyfleet_core::ratecount::DEFAULT_MAX_SOURCES,
        }
    }
}

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--config FILE`.
    Flag(PathBuf),
    /// `$KEYFLEET_CONFIG`.
    Env(PathBuf),
    /// `$XDG_CONFIG_HOME/keyfleet/config.toml` (or `~/.config/...`).
    User(PathBuf),
    /// `/etc/keyfleet/config.toml`.
    System(PathBuf),
    /// No file: the defaults.
    Defaults,
}

impl Source {
    /// The file read, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Source::Flag(p) | Source::Env(p) | Source::User(p) | Source::System(p) => Some(p),
            Source::Defaults => None,
        }
    }
}

/// `[limits]`: what one node's keys can make the controller do (SECURITY.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Key requests and joins one member may send in a burst…
    pub member_request_burst: u32,
    /// …then one per this many ms; more are refused (`rate_limited`).
    pub member_request_interval_ms: u64,
    /// Rounds set off by what nodes send (usage counts, data from an unknown
    /// sender) start at most once per this many ms; later ones wait.
    pub node_trigger_min_interval_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let c = ControllerConfig::default();
        LimitsConfig {
            member_request_burst: c.member_request_burst,
            member_request_interval_ms: c.member_request_interval_ms,
            node_trigger_min_interval_ms: c.node_trigger_min_interval_ms,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag(p) => write!(f, "{} (--config)", p.display()),
            Source::Env(p) => write!(f, "{} ($KEYFLEET_CONFIG)", p.display()),
            Source::User(p) => write!(f, "{} (the user's configuration)", p.display()),
            Source::System(p) => write!(f, "{} (the system's configuration)", p.display()),
            Source::Defaults => f.write_str(
                "no file (none of --config, $KEYFLEET_CONFIG, $XDG_CONFIG_HOME/keyfleet/config.toml, \
                 /etc/keyfleet/config.toml): the defaults",
            ),
        }
    }
}

/// The system-wide configuration file.
pub const SYSTEM_CONFIG: &str = "/etc/keyfleet/config.toml";

/// The environment variables that override the file: (variable, key it sets).
pub const ENV_VARS: &[(&str, &str)] = &[
    ("KEYFLEET_STATE", "state_dir"),
    ("KEYFLEET_GROUP", "network.group"),
    ("KEYFLEET_IFACE", "network.iface"),
    ("KEYFLEET_LISTEN_PORT", "network.listen_port"),
];

/// The user's configuration file: `$XDG_CONFIG_HOME/keyfleet/config.toml`,
/// or `$HOME/.config/keyfleet/config.toml` (XDG base directories: a relative
/// `XDG_CONFIG_HOME` is ignored).
fn user_config(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let base = env("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            env("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| Path::new(&h).join(".config"))
        })?;
    Some(base.join("keyfleet").join("config.toml"))
}

/// Finds and reads the configuration (see the module docs for the order),
/// with the `KEYFLEET_*` variables applied. `env` reads the environment
/// (`|k| std::env::var(k).ok()`); `system` is [`SYSTEM_CONFIG`] outside tests.
pub fn discover(
    explicit: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    system: &Path,
) -> Result<(Config, Source), ConfigError> {
    let source = if let Some(p) = explicit {
        Source::Flag(p.to_path_buf())
    } else if let Some(p) = env("KEYFLEET_CONFIG").filter(|p| !p.is_empty()) {
        Source::Env(PathBuf::from(p))
    } else if let Some(p) = user_config(env).filter(|p| p.exists()) {
        Source::User(p)
    } else if system.exists() {
        Source::System(system.to_path_buf())
    } else {
        Source::Defaults
    };
    let mut cfg = match &source {
        Source::Flag(p) | Source::Env(p) if !p.exists() => {
            return Err(ConfigError::Missing {
                path: p.clone(),
                by: if matches!(source, Source::Flag(_)) {
                    "--config"
                } else {
                    "$KEYFLEET_CONFIG"
                },
            })
        }
        Source::Defaults => Config::default(),
        other => Config::load(other.path().unwrap_or(system))?,
    };
    apply_env(&mut cfg, env)?;
    cfg.validate()?;
    Ok((cfg, source))
}

/// Applies the `KEYFLEET_*` variables of [`ENV_VARS`] that are set (and not empty).
pub fn apply_env(
    cfg: &mut Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    fn parse<T: std::str::FromStr>(
        var: &'static str,
        v: &str,
        example: &str,
    ) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        v.trim().parse().map_err(|e: T::Err| ConfigError::Env {
            var,
            value: v.to_owned(),
            reason: format!("{e} (e.g. {example})"),
        })
    }
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(v) = get("KEYFLEET_STATE") {
        cfg.state_dir = Some(PathBuf::from(v));
    }
    if let Some(v) = get("KEYFLEET_GROUP") {
        cfg.network.group = parse("KEYFLEET_GROUP", &v, "239.255.77.77:7777")?;
    }
    if let Some(v) = get("KEYFLEET_IFACE") {
        cfg.network.iface = parse("KEYFLEET_IFACE", &v, "192.168.1.10")?;
    }
    if let Some(v) = get("KEYFLEET_LISTEN_PORT") {
        cfg.network.listen_port = parse("KEYFLEET_LISTEN_PORT", &v, "47800")?;
    }
    Ok(())
}

/// The `KEYFLEET_*` variables of [`ENV_VARS`] set in `env`, as (variable, value).
pub fn env_overrides(env: &dyn Fn(&str) -> Option<String>) -> Vec<(&'static str, String)> {
    ENV_VARS
        .iter()
        .filter_map(|(k, _)| env(k).filter(|v| !v.is_empty()).map(|v| (*k, v)))
        .collect()
}

fn off(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

impl Config {
    /// Reads `path`; every key left out takes its default.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what TOML types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.store.lease_margin_ms >= self.store.lease_ms || self.store.lease_ms < 300 {
            return Err(ConfigError::Value {
                key: "store.lease_ms",
                value: format!(
                    "{} (lease_margin_ms {})",
                    self.store.lease_ms, self.store.lease_margin_ms
                ),
                reason: "the lease must be at least 300 ms and longer than store.lease_margin_ms",
            });
        }
        if !self.network.group.ip().is_multicast() {
            return Err(ConfigError::Value {
                key: "network.group",
                value: self.network.group.to_string(),
                reason: "not an IPv4 multicast address (224.0.0.0/4), e.g. 239.255.77.77:7777",
            });
        }
        if self.network.iface.is_multicast() {
            return Err(ConfigError::Value {
                key: "network.iface",
                value: self.network.iface.to_string(),
                reason: "give the address of a local interface, e.g. 127.0.0.1",
            });
        }
        if self.round.retry_jitter_pct > 100 {
            return Err(ConfigError::Value {
                key: "round.retry_jitter_pct",
                value: self.round.retry_jitter_pct.to_string(),
                reason: "a percentage is at most 100",
            });
        }
        if let Some(u) = &self.store.url {
            if StoreUrl::parse(u).is_none() {
                return Err(ConfigError::Value {
                    key: "store.url",
                    value: redact_url(u),
                    reason: "not postgres://USER@HOST:PORT/DATABASE (leave it out for the embedded SQLite table)",
                });
            }
        }
        if self.round.drain_rtt_factor == 0 {
            return Err(ConfigError::Value {
                key: "round.drain_rtt_factor",
                value: "0".into(),
                reason:
                    "the drain must outlast the round trips it measured; use at least 1 (default 2)",
            });
        }
        if self.round.drain_floor_ms > self.round.max_flight_ms {
            return Err(ConfigError::Value {
                key: "round.drain_floor_ms",
                value: self.round.drain_floor_ms.to_string(),
                reason:
                    "the floor of the drain is above round.max_flight_ms, its ceiling; lower it",
            });
        }
        if self.audit.refusal_max_sources == 0 {
            return Err(ConfigError::Value {
                key: "audit.refusal_max_sources",
                value: "0".into(),
                reason: "track at least one source address, e.g. 256",
            });
        }
        if self.round.group_attempts == 0 {
            return Err(ConfigError::Value {
                key: "round.group_attempts",
                value: "0".into(),
                reason: "every request goes to the group at least once",
            });
        }
        Ok(())
    }

    /// The protocol core's settings.
    pub fn controller(&self) -> ControllerConfig {
        let (r, t, l) = (&self.round, &self.triggers, &self.limits);
        ControllerConfig {
            member_request_burst: l.member_request_burst,
            member_request_interval_ms: l.member_request_interval_ms,
            node_trigger_min_interval_ms: l.node_trigger_min_interval_ms,
            drain_grace_ms: r.drain_grace_ms,
            drain_rtt_factor: r.drain_rtt_factor,
            drain_floor_ms: r.drain_floor_ms,
            max_flight_ms: r.max_flight_ms,
            retry_initial_ms: r.retry_initial_ms,
            retry_max_ms: r.retry_max_ms,
            retry_jitter_pct: r.retry_jitter_pct,
            group_attempts: r.group_attempts,
            stale_after_ms: r.stale_after_ms,
            min_acked: r.min_acked,
            min_acked_majority: r.min_acked_majority,
            triggers: TriggerConfig {
                max_encryptions: off(t.max_encryptions),
                max_decryptions: off(t.max_decryptions),
                max_total: off(t.max_total),
                max_key_age_ms: off(t.max_key_age_ms),
                on_unknown_sender: t.on_unknown_sender,
                on_node_removed: t.on_node_removed,
                manual: t.manual,
            },
            beacon_interval_ms: self.beacon.interval_ms,
            address: std::net::SocketAddr::V4(SocketAddrV4::new(
                self.network.iface,
                self.network.listen_port,
            )),
        }
    }

    /// The default configuration as a commented TOML file.
    pub fn default_toml() -> String {
        let d = Config::default();
        let (n, r, t, s, k, a, st) = (
            &d.network,
            &d.round,
            &d.triggers,
            &d.secrets,
            &d.rekey,
            &d.audit,
            &d.store,
        );
        let b = &d.beacon;
        format!(
            r#"# keyfleet controller configuration (all defaults shown).
# Found as: --config FILE, else $KEYFLEET_CONFIG, else
# $XDG_CONFIG_HOME/keyfleet/config.toml (~/.config/keyfleet/config.toml), else
# /etc/keyfleet/config.toml. KEYFLEET_STATE, KEYFLEET_GROUP, KEYFLEET_IFACE and
# KEYFLEET_LISTEN_PORT override it; flags override both; a key left out takes
# its default.

# The controller's state directory (--state, $KEYFLEET_STATE); default
# $XDG_DATA_HOME/keyfleet (~/.local/share/keyfleet):
# state_dir = "/var/lib/keyfleet"

[network]
# Multicast group and port the fleet shares (--group).
group = "{group}"
# Local interface address to join the group on (--iface); 0.0.0.0 = by routing table.
iface = "{iface}"
# The controller's unicast port on that interface (--listen-port).
listen_port = {listen_port}

[round]
# After every node confirmed the first transition, wait for messages sealed
# with the old key still in flight before the second (S2): drain_rtt_factor
# times the first transition's longest time in flight (its round trips less
# what requests and replies waited in the sockets), at least
# drain_floor_ms, at most max_flight_ms (the longest any datagram stays in
# flight). A message delayed longer than that wait may become unreadable.
drain_rtt_factor = {drf}
drain_floor_ms = {dfl}
max_flight_ms = {mfl}
# Or a fixed wait (ms) instead of the measured one:
# drain_grace_ms = 2000
# Retries: first after retry_initial_ms, doubling up to retry_max_ms, ± jitter %.
retry_initial_ms = {ri}
retry_max_ms = {rm}
retry_jitter_pct = {rj}
# Sends of each request to the group before per-node unicast.
group_attempts = {ga}
# A node that has not answered this long after a phase began is marked stale (ms).
stale_after_ms = {stale}
# A round goes on (leaving silent nodes stale) only when at least min_acked
# nodes confirmed the phase and, with min_acked_majority, more than half of the
# joined nodes; otherwise it is paused (the old key stays current) and retried
# until nodes answer again. When no node answers, the controller is the one cut off.
min_acked = {mina}
min_acked_majority = {minm}

[triggers]
# Rekey when fleet-wide counts under the current key exceed these (0 = off).
max_encryptions = {me}
max_decryptions = {md}
max_total = {mt}
# Rekey when the current key is older than this (ms; 0 = off; default 7 days).
max_key_age_ms = {age}
# Rekey when group data comes from a sender not in the management table.
on_unknown_sender = {ous}
# Rekey when a node is removed (keyfleet remove).
on_node_removed = {onr}
# Allow keyfleet rekey.
manual = {manual}

[secrets]
# Seal the controller's secrets with a passphrase read from this file (first line):
# passphrase_file = "/path/to/passphrase"
# ...or from this environment variable when it is set.
passphrase_env = "{penv}"

[rekey]
# keyfleet rekey/remove without a running serve: wait up to this long for
# enrolled nodes that never joined (ms), and answer key requests this long after.
join_wait_ms = {jw}
linger_ms = {lg}

[audit]
# Refused datagrams: the first of a kind from a source address in this window
# (ms) is written to the audit log and the log in full; the rest are counted
# and summarized in one row when the window closes (0 = write every one).
refusal_window_ms = {rw}
# Source addresses tracked at once; beyond them, one "other sources" count per kind.
refusal_max_sources = {rms}

[limits]
# Key requests and joins one node may send in a burst, then one per
# member_request_interval_ms (ms); more are refused and rate-counted.
member_request_burst = {mrb}
member_request_interval_ms = {mri}
# Rekey rounds set off by what nodes send (usage counts, data from an unknown
# sender) start at most once per this many ms; a later trigger waits.
node_trigger_min_interval_ms = {ntm}
[beacon]
# Send a signed beacon (epoch, round phase) to the group this often (ms; 0 = never).
# A node behind it asks for the current key at once.
interval_ms = {bi}

[store]
# The management table. Left out: the embedded SQLite file fleet.db in the
# state directory (nothing to install). A PostgreSQL database instead:
# url = "postgres://keyfleet@db.example.lan:5432/keyfleet"
# serve goes on this long while the table cannot be written (ms), sending
# nothing whose rows were not written; then it stops with an error.
max_outage_ms = {mo}
# With a PostgreSQL table one controller leads at a time, by a lease in the
# table (ms of the server's clock), renewed every third of it; it stops
# sending lease_margin_ms before the lease runs out.
lease_ms = {lm}
lease_margin_ms = {lmm}
"#,
            mo = st.max_outage_ms,
            lm = st.lease_ms,
            lmm = st.lease_margin_ms,
            group = n.group,
            iface = n.iface,
            listen_port = n.listen_port,
            drf = r.drain_rtt_factor,
            dfl = r.drain_floor_ms,
            mfl = r.max_flight_ms,
            ri = r.retry_initial_ms,
            rm = r.retry_max_ms,
            rj = r.retry_jitter_pct,
            ga = r.group_attempts,
            stale = r.stale_after_ms,
            mina = r.min_acked,
            minm = r.min_acked_majority,
            me = t.max_encryptions,
            md = t.max_decryptions,
            mt = t.max_total,
            age = t.max_key_age_ms,
            ous = t.on_unknown_sender,
            onr = t.on_node_removed,
            manual = t.manual,
            penv = s.passphrase_env,
            jw = k.join_wait_ms,
            lg = k.linger_ms,
            rw = a.refusal_window_ms,
            rms = a.refusal_max_sources,
            mrb = d.limits.member_request_burst,
            mri = d.limits.member_request_interval_ms,
            ntm = d.limits.node_trigger_min_interval_ms,
            bi = b.interval_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_default_file_reads_back_as_the_defaults() {
        let c: Config = toml::from_str(&Config::default_toml()).unwrap();
        assert_eq!(c, Config::default());
        let core = c.controller();
        let want = ControllerConfig::default();
        assert_eq!(core.triggers, want.triggers);
        assert_eq!(core.drain_grace_ms, want.drain_grace_ms);
        assert_eq!(
            (
                core.drain_rtt_factor,
                core.drain_floor_ms,
                core.max_flight_ms
            ),
            (2, 2, 2000)
        );
        assert_eq!(core.stale_after_ms, want.stale_after_ms);
        assert_eq!(c.audit.refusal_window_ms, 60_000);
        assert_eq!(c.beacon.interval_ms, 1000);
        assert_eq!(core.beacon_interval_ms, want.beacon_interval_ms);
    }

    #[test]
    fn a_partial_file_keeps_other_defaults_and_zero_switches_a_trigger_off() {
        let c: Config = toml::from_str(
            "[network]\ngroup = \"239.255.1.2:9000\"\n[triggers]\nmax_key_age_ms = 0\nmax_total = 500\n",
        )
        .unwrap();
        assert_eq!(c.network.group, "239.255.1.2:9000".parse().unwrap());
        assert_eq!(c.network.listen_port, DEFAULT_CONTROLLER_PORT);
        let t = c.controller().triggers;
        assert_eq!(t.max_key_age_ms, None);
        assert_eq!(t.max_total, Some(500));
        assert_eq!(t.max_encryptions, TriggerConfig::default().max_encryptions);
    }

    #[test]
    fn typos_and_bad_values_are_refused_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.toml");
        std::fs::write(&p, "[round]\ndrain_grace = 5\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("drain_grace"), "{e}");
        std::fs::write(&p, "[network]\ngroup = \"10.0.0.1:7777\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("network.group") && e.contains("multicast"),
            "{e}"
        );
        std::fs::write(&p, "[audit]\nrefusal_max_sources = 0\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("audit.refusal_max_sources"), "{e}");
        // A store URL of another kind is refused without showing its password.
        std::fs::write(&p, "[store]\nurl = \"mysql://kf:s3cret@db/fleet\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("store.url") && !e.contains("s3cret"), "{e}");
        for url in [
            "postgresql://kf:s3cret@db/fleet",
            "sqlite:/var/lib/fleet.db",
        ] {
            std::fs::write(&p, format!("[store]\nurl = \"{url}\"\n")).unwrap();
            assert!(Config::load(&p).is_ok(), "{url}");
        }
        assert_eq!(StoreUrl::parse("sqlite:"), None);
        let e = Config::load(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }

    /// An environment made of `pairs`.
    fn env_of(pairs: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn write(p: &Path, group: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("[network]\ngroup = \"{group}\"\n")).unwrap();
    }

    #[test]
    fn discovery_order_flag_env_user_system_defaults() {
        let d = tempfile::tempdir().unwrap();
        let (flag, envf, xdg, home, sys) = (
            d.path().join("flag.toml"),
            d.path().join("env.toml"),
            d.path().join("xdg"),
            d.path().join("home"),
            d.path().join("etc/keyfleet/config.toml"),
        );
        write(&flag, "239.1.1.1:1");
        write(&envf, "239.1.1.2:1");
        write(&xdg.join("keyfleet/config.toml"), "239.1.1.3:1");
        write(&home.join(".config/keyfleet/config.toml"), "239.1.1.4:1");
        write(&sys, "239.1.1.5:1");
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let full = vec![
            ("KEYFLEET_CONFIG", s(&envf)),
            ("XDG_CONFIG_HOME", s(&xdg)),
            ("HOME", s(&home)),
        ];
        let group = |explicit: Option<&Path>, env: &[(&str, String)]| {
            let (c, src) = discover(explicit, &env_of(env), &sys).unwrap();
            (c.network.group.ip().octets()[3], src)
        };
        assert_eq!(group(Some(&flag), &full), (1, Source::Flag(flag.clone())));
        assert_eq!(group(None, &full), (2, Source::Env(envf.clone())));
        assert_eq!(
            group(None, &full[1..]),
            (3, Source::User(xdg.join("keyfleet/config.toml")))
        );
        assert_eq!(
            group(None, &full[2..]),
            (4, Source::User(home.join(".config/keyfleet/config.toml")))
        );
        assert_eq!(group(None, &[]), (5, Source::System(sys.clone())));
        let none = d.path().join("nowhere.toml");
        let (c, src) = discover(None, &env_of(&[]), &none).unwrap();
        assert_eq!((c, src), (Config::default(), Source::Defaults));
    }

    #[test]
    fn a_named_file_that_does_not_exist_is_an_error_not_the_defaults() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("typo.toml");
        let sys = d.path().join("none");
        let e = discover(Some(&missing), &env_of(&[]), &sys).unwrap_err();
        assert!(
            matches!(e, ConfigError::Missing { by: "--config", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("typo.toml"), "{e}");
        let env = [("KEYFLEET_CONFIG", missing.to_string_lossy().into_owned())];
        let e = discover(None, &env_of(&env), &sys).unwrap_err();
        assert!(e.to_string().contains("$KEYFLEET_CONFIG"), "{e}");
    }

    #[test]
    fn environment_variables_override_the_file_and_bad_ones_are_named() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(
            &f,
            "state_dir = \"/srv/from-file\"\n[network]\ngroup = \"239.1.1.1:1\"\niface = \"127.0.0.1\"\n",
        )
        .unwrap();
        let sys = d.path().join("none");
        let env = [
            ("KEYFLEET_GROUP", "239.9.9.9:9999".to_string()),
            ("KEYFLEET_STATE", "/srv/from-env".to_string()),
            ("KEYFLEET_LISTEN_PORT", "4000".to_string()),
        ];
        let (c, _) = discover(Some(&f), &env_of(&env), &sys).unwrap();
        assert_eq!(c.network.group, "239.9.9.9:9999".parse().unwrap());
        assert_eq!(
            c.network.iface,
            Ipv4Addr::LOCALHOST,
            "the file's, not overridden"
        );
        assert_eq!(c.network.listen_port, 4000);
        assert_eq!(c.state_dir.as_deref(), Some(Path::new("/srv/from-env")));
        for (var, bad) in [
            ("KEYFLEET_GROUP", "239.9.9.9"),
            ("KEYFLEET_IFACE", "eth0"),
            ("KEYFLEET_LISTEN_PORT", "70000"),
        ] {
            let e = discover(Some(&f), &env_of(&[(var, bad.to_string())]), &sys).unwrap_err();
            assert!(
                e.to_string().contains(var) && e.to_string().contains(bad),
                "{e}"
            );
        }
        // A unicast group from the environment is refused like one from the file.
        let e = discover(
            Some(&f),
            &env_of(&[("KEYFLEET_GROUP", "10.0.0.1:7777".to_string())]),
            &sys,
        )
        .unwrap_err();
        assert!(e.to_string().contains("network.group"), "{e}");
        assert_eq!(
            env_overrides(&env_of(&env)).len(),
            3,
            "the variables set are listed"
        );
    }
}
