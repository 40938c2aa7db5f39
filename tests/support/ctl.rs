//! Test support for the controller's integration tests: the real `keyfleet`
//! binary in a temporary state directory, and the nodes' specs. The nodes
//! are usually the in-process ones of [`super::inproc::InProcFleet::nodes`]
//! (real `NodeMachine`s on real loopback multicast sockets, one tokio task
//! each), standing in for `keyfleet-agent` processes.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;

use rand::rngs::OsRng;
use rand::RngCore;

use super::{fleet, free_port};

/// One controller: [`fleet::Fleet`] without agent processes (its state
/// directory, config file and network; `Deref` to it for `keyfleet`
/// commands, `serve` and the logs). Its nodes are in-process
/// ([`super::inproc::InProcFleet::nodes`]) or none.
pub struct Ctl {
    pub fleet: fleet::Fleet,
}

impl std::ops::Deref for Ctl {
    type Target = fleet::Fleet;
    fn deref(&self) -> &fleet::Fleet {
        &self.fleet
    }
}

impl Ctl {
    /// A controller in a fresh state directory with `config` (TOML) as its config file.
    pub fn new(config: &str) -> Ctl {
        Ctl {
            fleet: fleet::Fleet::new(0, config),
        }
    }

    /// The controller's unicast address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ctl_ip, self.ctl_port))
    }

    /// `keyfleet ARGS` of this controller, not started.
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.fleet.keyfleet(args)
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
        self.fleet.json_exit(args, code).0
    }

    /// A standby controller of `leader`'s fleet: a state directory of its
    /// own with a copy of the leader's `controller.secrets` (its state key),
    /// the same group and config, its own unicast port.
    pub fn standby_of(leader: &Ctl, config: &str) -> Ctl {
        let c = Ctl {
            fleet: fleet::Fleet::in_group(leader.group, 0, config),
        };
        keyfleet::statefile::ensure_private_dir(&c.state()).unwrap();
        let to = c.state().join("controller.secrets");
        std::fs::copy(leader.state().join("controller.secrets"), &to).unwrap();
        c
    }

    /// Everything `keyfleet serve` logged, all its runs.
    pub fn serve_logs(&self) -> String {
        self.fleet.logs("serve")
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
