//! Rotation with Serf's keyring: N `serf agent` processes on 127.0.0.1 with
//! a shared keyring, joined into one cluster; a rotation is the three
//! cluster-wide `serf keys` operations (`-install NEW`, `-use NEW`,
//! `-remove OLD`), each of which returns once every member answered.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::procs::{tail, timed, timed_ok, wait_for, Fleet, PortPool};
use crate::stats::{median, Load};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SerfRep {
    pub install_ms: f64,
    pub use_ms: f64,
    pub remove_ms: f64,
    /// install + use + remove.
    pub total_ms: f64,
    /// Operations run again because not every member answered (what Serf said).
    #[serde(default)]
    pub retries: Vec<String>,
}

/// Attempts of one `serf keys` operation before the rotation counts as failed.
pub const ATTEMPTS: usize = 3;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SerfRun {
    pub n: usize,
    /// From starting the agents until agent 0 saw all N alive.
    pub join_ms: f64,
    pub reps: Vec<SerfRep>,
    /// After the last rotation, `serf keys -list` showed only the newest key, on N of N members.
    pub verified: bool,
    pub error: Option<String>,
    pub load: Load,
}

impl SerfRun {
    pub fn median_total_ms(&self) -> Option<f64> {
        median(&self.reps.iter().map(|r| r.total_ms).collect::<Vec<_>>())
    }
    pub fn median_of(&self, f: impl Fn(&SerfRep) -> f64) -> Option<f64> {
        median(&self.reps.iter().map(f).collect::<Vec<_>>())
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SerfResult {
    pub version: Option<String>,
    pub profile: String,
    pub runs: Vec<SerfRun>,
}

/// A fresh 32-byte Serf key, base64 (what `serf keygen` prints).
pub fn new_key() -> String {
    let mut k = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut k);
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// `serf version`'s first line, as "Serf 0.8.2-dev".
pub fn version(serf: &Path) -> Option<String> {
    let out = Command::new(serf).arg("version").output().ok()?;
    out.status
        .success()
        .then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .trim_start_matches("Serf ")
                .to_string()
        })
        .map(|v| format!("Serf {v}"))
}

/// The keys of `serf keys -list` output with how many members hold each:
/// lines like `KEY  [3/3]`.
pub fn parse_key_list(out: &str) -> Vec<(String, usize, usize)> {
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let key = it.next()?;
            let frac = it.next()?.strip_prefix('[')?.strip_suffix(']')?;
            let (a, b) = frac.split_once('/')?;
            Some((key.to_string(), a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

/// One cluster of `n` agents: started, joined, rotated `reps` times.
pub struct Cluster {
    serf: PathBuf,
    rpc0: String,
    fleet: Fleet,
    dir: tempfile::TempDir,
    pub key: String,
    pub n: usize,
    pub join_ms: f64,
}

impl Cluster {
    pub fn start(
        serf: &Path,
        n: usize,
        ports: &mut PortPool,
        profile: &str,
    ) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("kfb-serf-").tempdir()?;
        let key = new_key();
        let mut fleet = Fleet::default();
        let mut bind0 = String::new();
        let mut rpc0 = String::new();
        let t0 = Instant::now();
        for i in 0..n {
            let (bind, rpc) = (ports.take()?, ports.take()?);
            let keyring = dir.path().join(format!("keyring-{i}.json"));
            // With -keyring-file, Serf refuses -encrypt ("Encryption key not
            // allowed while using a keyring"): the keyring file carries the key.
            std::fs::write(&keyring, serde_json::to_string(&[&key])?)?;
            let mut cmd = Command::new(serf);
            cmd.arg("agent")
                .arg(format!("-node=s{i:04}"))
                .arg(format!("-bind=127.0.0.1:{bind}"))
                .arg(format!("-advertise=127.0.0.1:{bind}"))
                .arg(format!("-rpc-addr=127.0.0.1:{rpc}"))
                .arg(format!("-keyring-file={}", keyring.display()))
                .arg(format!("-profile={profile}"))
                .arg("-log-level=warn");
            if i == 0 {
                bind0 = format!("127.0.0.1:{bind}");
                rpc0 = format!("127.0.0.1:{rpc}");
            } else {
                cmd.arg(format!("-retry-join={bind0}"))
                    .arg("-retry-interval=1s");
            }
            fleet.spawn(
                &format!("serf s{i:04}"),
                cmd,
                &dir.path().join(format!("s{i:04}.log")),
            )?;
        }
        let mut c = Cluster {
            serf: serf.to_path_buf(),
            rpc0,
            fleet,
            dir,
            key,
            n,
            join_ms: 0.0,
        };
        let limit = Duration::from_secs(60 + n as u64);
        wait_for(
            &format!("{n} serf agents alive"),
            limit,
            Duration::from_millis(250),
            || {
                let dead = c.fleet.exited();
                if !dead.is_empty() {
                    let log = c.dir.path().join(format!("{}.log", &dead[0][5..]));
                    bail!("serf agent {} exited: {}", dead[0], tail(&log, 5));
                }
                Ok((c.alive()? >= n).then_some(()))
            },
        )?;
        c.join_ms = t0.elapsed().as_secs_f64() * 1000.0;
        Ok(c)
    }

    fn serf(&self) -> Command {
        let mut c = Command::new(&self.serf);
        c.env_remove("SERF_RPC_AUTH");
        c
    }

    /// Members agent 0 sees alive.
    pub fn alive(&self) -> anyhow::Result<usize> {
        let mut c = self.serf();
        c.args([
            "members",
            "-status=alive",
            &format!("-rpc-addr={}", self.rpc0),
        ]);
        let (_, out) = timed(c, Duration::from_secs(10))?;
        if !out.status.success() {
            return Ok(0);
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count())
    }

    /// `serf keys -OP=KEY`, run again (it is idempotent) when not every member
    /// answered, as an operator would, up to [`ATTEMPTS`] times. The time is
    /// that of every attempt; the failures are counted in `retries`.
    fn keys(&self, op: &str, key: &str, retries: &mut Vec<String>) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for attempt in 1..=ATTEMPTS {
            let mut c = self.serf();
            c.args([
                "keys",
                &format!("-{op}={key}"),
                &format!("-rpc-addr={}", self.rpc0),
            ]);
            let (d, out) = timed(c, Duration::from_secs(60))
                .with_context(|| format!("serf keys -{op} on {} members", self.n))?;
            total += d.as_secs_f64() * 1000.0;
            if out.status.success() {
                return Ok(total);
            }
            let said = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let why = said
                .lines()
                .filter(|l| !l.starts_with("==>") && !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            if attempt == ATTEMPTS {
                bail!(
                    "serf keys -{op} on {} members failed {ATTEMPTS} times: {why}",
                    self.n
                );
            }
            retries.push(format!("-{op}: {why}"));
        }
        Ok(total)
    }

    /// One full rotation to a fresh key.
    pub fn rotate(&mut self) -> anyhow::Result<SerfRep> {
        let new = new_key();
        let mut retries = Vec::new();
        let install_ms = self.keys("install", &new, &mut retries)?;
        let use_ms = self.keys("use", &new, &mut retries)?;
        let remove_ms = self.keys("remove", &self.key.clone(), &mut retries)?;
        self.key = new;
        Ok(SerfRep {
            install_ms,
            use_ms,
            remove_ms,
            total_ms: install_ms + use_ms + remove_ms,
            retries,
        })
    }

    /// The cluster's keys as `serf keys -list` reports them.
    pub fn list(&self) -> anyhow::Result<Vec<(String, usize, usize)>> {
        let mut c = self.serf();
        c.args(["keys", "-list", &format!("-rpc-addr={}", self.rpc0)]);
        let (_, out) = timed_ok(c, Duration::from_secs(60))?;
        Ok(parse_key_list(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Whether every member holds the current key and nothing else.
    pub fn verify(&self) -> anyhow::Result<bool> {
        let l = self.list()?;
        Ok(l.len() == 1 && l[0].0 == self.key && l[0].1 == self.n && l[0].2 == self.n)
    }

    pub fn processes(&self) -> usize {
        self.fleet.len()
    }
}

/// Start, join and rotate a cluster of each size `reps` times.
pub fn run(serf: &Path, sizes: &[usize], reps: usize, base_port: u16, profile: &str) -> SerfResult {
    let mut ports = PortPool::new(base_port);
    let runs = sizes
        .iter()
        .map(|&n| {
            let load = Load::start();
            let mut r = SerfRun {
                n,
                ..SerfRun::default()
            };
            let res = (|| -> anyhow::Result<()> {
                let mut c = Cluster::start(serf, n, &mut ports, profile)?;
                r.join_ms = c.join_ms;
                for i in 0..reps {
                    if i > 0 {
                        std::thread::sleep(std::time::Duration::from_millis(
                            crate::fleet::REP_PAUSE_MS,
                        ));
                    }
                    r.reps.push(c.rotate()?);
                }
                r.verified = c.verify()?;
                Ok(())
            })();
            r.error = res.err().map(|e| format!("{e:#}"));
            r.load = load.finish();
            eprintln!(
                "serf N={n}: median rotation {:?} ms over {} reps{}",
                r.median_total_ms().map(|m| m.round()),
                r.reps.len(),
                r.error
                    .as_deref()
                    .map(|e| format!("; error: {e}"))
                    .unwrap_or_default()
            );
            r
        })
        .collect();
    SerfResult {
        version: version(serf),
        profile: profile.to_string(),
        runs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_list_lines_are_parsed() {
        let out = "==> Asking all members for installed keys...\n==> Keys gathered, listing cluster keys...\n\nrUm6Al/Z4j0r6bxcgK+AuvKmzoKHZvSiy4kykuBt1qg=  [2/3]\nabc=  [3/3]\n";
        assert_eq!(
            parse_key_list(out),
            vec![
                (
                    "rUm6Al/Z4j0r6bxcgK+AuvKmzoKHZvSiy4kykuBt1qg=".to_string(),
                    2,
                    3
                ),
                ("abc=".to_string(), 3, 3)
            ]
        );
    }

    #[test]
    fn keys_are_32_bytes_base64() {
        let k = new_key();
        let b = base64::engine::general_purpose::STANDARD
            .decode(&k)
            .unwrap();
        assert_eq!(b.len(), 32);
        assert_ne!(new_key(), k);
    }
}
