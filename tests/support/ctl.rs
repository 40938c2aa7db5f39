//! Test support for the controller's integration tests: the real `keyfleet`
//! binary in a temporary state directory, and the nodes' specs. The nodes
//! are usually the in-process ones of [`super::inproc::InProcFleet::nodes`]
//! (real `NodeMachine`s on real loopback multicast sockets, one tokio task
//! each), standing in for `keyfleet-agent` processes.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use rand::rngs::OsRng;
use rand::RngCore;

use super::{free_port, fresh_group, wait_for, Proc, KEYFLEET};

/// One controller: its state directory, config file and network.
pub struct Ctl {
    pub dir: tempfile::TempDir,
    pub group: SocketAddrV4,
    pub port: u16,
}

impl Ctl {
    /// A controller in a fresh state directory with `config` (TOML) as its config file.
    pub fn new(config: &str) -> Ctl {
        Ctl::in_group(fresh_group(), config)
    }

    /// A controller on `group` (its own port), `config` in its config file.
    fn in_group(group: SocketAddrV4, config: &str) -> Ctl {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("keyfleet.toml"),
            format!(
                "[network]\ngroup = \"{group}\"\niface = \"127.0.0.1\"\nlisten_port = {port}\n{config}"
            ),
        )
        .unwrap();
        Ctl { dir, group, port }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(KEYFLEET);
        c.arg("--state")
            .arg(self.state())
            .arg("--config")
            .arg(self.dir.path().join("keyfleet.toml"))
            .args(args)
            .env_remove("KEYFLEET_PASSPHRASE")
            .env("RUST_LOG", "keyfleet=info")
            .env("RUST_BACKTRACE", "0");
        c
    }

    /// Runs a command to its end; panics with its stderr when it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "keyfleet {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `keyfleet enroll` of each node under its id, address and key form.
    pub fn enroll_all(&self, specs: &[NodeSpec]) {
        for s in specs {
            self.run(&[
                "enroll",
                "--node-id",
                &s.id,
                "--addr",
                &s.listen.to_string(),
                "--key",
                &s.form,
            ]);
        }
    }

    /// Runs `keyfleet ARGS`, which must exit with `code`; its JSON output.
    pub fn json_exit(&self, args: &[&str], code: i32) -> serde_json::Value {
        let out = self.cmd(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "keyfleet {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "keyfleet {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A standby controller of `leader`'s fleet: a state directory of its
    /// own with a copy of the leader's `controller.secrets` (its state key),
    /// the same group and config, its own unicast port.
    pub fn standby_of(leader: &Ctl, config: &str) -> Ctl {
        let c = Ctl::in_group(leader.group, config);
        keyfleet::statefile::ensure_private_dir(&c.state()).unwrap();
        let to = c.state().join("controller.secrets");
        std::fs::copy(leader.state().join("controller.secrets"), &to).unwrap();
        c
    }

    /// `keyfleet serve` in the background; waits until its control socket exists.
    pub fn serve(&self) -> Proc {
        let p = self.serve_waiting();
        wait_for("keyfleet serve's control socket", 10_000, || {
            std::os::unix::net::UnixStream::connect(self.state().join("control.sock")).is_ok()
        });
        p
    }

    /// `keyfleet serve` in the background, not waiting for anything (a standby).
    pub fn serve_waiting(&self) -> Proc {
        let log = std::fs::File::create(self.dir.path().join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        )))
        .unwrap();
        let child = self
            .cmd(&["serve"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc::from(child)
    }

    pub fn serve_logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("serve-") {
                out += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        out
    }
}

/// A node's id, initial key and the hex form printed on its label.
pub struct NodeSpec {
    pub id: String,
    pub key: [u8; 16],
    pub form: String,
    pub listen: SocketAddrV4,
}

pub fn node_specs(n: usize) -> Vec<NodeSpec> {
    (0..n)
        .map(|i| {
            let mut key = [0u8; 16];
            OsRng.fill_bytes(&mut key);
            let form =
                keyfleet_core::label::hex_form(&keyfleet_core::label::InitialKey::from_bytes(key));
            NodeSpec {
                id: format!("node-{i:03}"),
                key,
                form,
                listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port()),
            }
        })
        .collect()
}

/// The path of a file in the state directory.
pub fn in_state(ctl: &Ctl, name: &str) -> PathBuf {
    ctl.state().join(name)
}
