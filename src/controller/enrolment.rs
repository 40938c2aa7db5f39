//! Several installers at once (issue 16.4): an installer whose `keyfleet
//! enroll` finds another controller leading the shared management table
//! queues the enrolment in the table (`enrol_requests`, announced with
//! PostgreSQL's NOTIFY) and waits for the leader's answer; the leader takes
//! the open requests when told (LISTEN), and every [`POLL_MS`] besides,
//! enrolls each through its
//! machine as if it came from its own control socket, and writes the answer.
//! The member number is the leader's, so two installers never get the same.
//!
//! A request is sealed with the fleet's state key (the installer holds a copy
//! of `controller.secrets`, as a standby does): it carries the initial key,
//! which nobody without that key can read from the table, and only a holder
//! of the key can ask (a request that does not open is answered as refused).
//! The sealed body is erased when the request is answered.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::state::StateKey;
use super::{Controller, ControllerError, EnrollReport, Result};
use crate::store::{EnrolRequest, Store};
use keyfleet_core::crypto::InitialKey;
use keyfleet_core::wire::NodeId;

/// How often the leader looks for open requests besides their announcement
/// (PostgreSQL's NOTIFY, which a reconnect may miss).
pub const POLL_MS: u64 = 1000;
/// ... and right after it took some (more may have come meanwhile).
pub const BUSY_POLL_MS: u64 = 20;
/// How often an installer looks for the leader's answer.
const ANSWER_POLL_MS: u64 = 10;
/// Requests taken in one look.
const BATCH: u32 = 64;

/// A request older than this (by the time sealed inside it) is refused: a
/// writer of the table without the state key cannot replay an old request
/// (say, to enroll again a node removed since).
pub const MAX_AGE_MS: u64 = 10 * 60 * 1000;

/// What a request carries, sealed.
#[derive(Serialize, Deserialize)]
struct Sealed {
    key: InitialKey,
    addr: SocketAddr,
    force: bool,
    /// When the installer sealed it (its clock, ms since the Unix epoch).
    sealed_at_ms: u64,
}

/// The leader's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Enrolled(EnrollReport),
    Refused(String),
}

fn row(node_id: &str) -> Vec<u8> {
    format!("keyfleet enrol_request {node_id}").into_bytes()
}

/// One enrolment an installer asks for.
pub struct Ask<'a> {
    pub node_id: &'a NodeId,
    pub initial_key: &'a InitialKey,
    pub addr: SocketAddr,
    pub force: bool,
}

/// Queues an enrolment for the leader of `store`; the request's id.
pub fn request(
    store: &mut Store,
    key: &StateKey,
    ask: &Ask<'_>,
    by: &str,
    now_ms: u64,
) -> Result<i64> {
    let Ask {
        node_id,
        initial_key,
        addr,
        force,
    } = *ask;
    let plain = Zeroizing::new(
        serde_json::to_vec(&Sealed {
            key: initial_key.clone(),
            addr,
            force,
            sealed_at_ms: now_ms,
        })
        .expect("a request serializes"),
    );
    let body = key.seal(&row(node_id.as_str()), &plain);
    Ok(store.request_enrolment(node_id.as_str(), &body, by, now_ms)?)
}

/// Waits up to `timeout` for the leader's answer to request `id`.
pub async fn wait(store: &Store, id: i64, timeout: Duration) -> Result<EnrollReport> {
    let start = std::time::Instant::now();
    loop {
        if let Some(a) = store.enrolment_answer(id)? {
            return match serde_json::from_str::<Answer>(&a) {
                Ok(Answer::Enrolled(r)) => Ok(r),
                Ok(Answer::Refused(why)) => Err(ControllerError::EnrolmentRefused(why)),
                Err(e) => Err(ControllerError::EnrolmentRefused(format!(
                    "the leader's answer to enrolment request {id} does not parse ({e}): {a}"
                ))),
            };
        }
        if start.elapsed() >= timeout {
            return Err(ControllerError::NotAnswered {
                id,
                waited_ms: timeout.as_millis() as u64,
            });
        }
        tokio::time::sleep(Duration::from_millis(ANSWER_POLL_MS)).await;
    }
}

/// `keyfleet enroll` while another controller leads the shared table of
/// `opts`: queues the enrolment and waits up to `timeout` for the leader's answer.
pub async fn through_table(
    opts: &super::Options,
    ask: &Ask<'_>,
    timeout: Duration,
) -> Result<EnrollReport> {
    let st = &opts.state;
    if !st.initialised()? {
        return Err(ControllerError::NotInitialised {
            dir: st.dir.clone(),
        });
    }
    let at = st.table_at(opts.config.store.url.as_deref())?;
    let mut table = super::Table::new(Store::open_at(&at)?)?;
    let now = super::Clock::wall().now_ms();
    let key = super::state_key(opts, &mut table, now)?;
    let id = request(table.store_mut(), &key, ask, &super::lease_holder(st), now)?;
    tracing::info!(id, node = %ask.node_id, "enrolment queued for the leader");
    wait(table.store(), id, timeout).await
}

impl Controller {
    /// Takes the open enrolment requests of a shared table and answers each;
    /// how many were taken.
    pub(super) async fn take_enrolments(&mut self) -> Result<usize> {
        let open = match self.table.store().open_enrolments(BATCH) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "enrolment requests could not be read; asked again later");
                return Ok(0);
            }
        };
        for req in &open {
            let answer = match self.enrol_request(req).await {
                Ok(r) => {
                    tracing::info!(node = %r.node_id, member = r.member, by = %req.requested_by, "enrolled for an installer");
                    Answer::Enrolled(r)
                }
                Err(
                    e @ (ControllerError::LeaseLost { .. } | ControllerError::TableDown { .. }),
                ) => return Err(e),
                Err(e) => {
                    tracing::warn!(node = %req.node_id, by = %req.requested_by, error = %e, "an installer's enrolment refused");
                    Answer::Refused(e.to_string())
                }
            };
            let text = serde_json::to_string(&answer).expect("an answer serializes");
            let now = self.clock.now_ms();
            self.table
                .store_mut()
                .answer_enrolment(req.id, &text, now)?;
        }
        Ok(open.len())
    }

    async fn enrol_request(&mut self, req: &EnrolRequest) -> Result<EnrollReport> {
        let key = self.table.state_key().ok_or_else(|| {
            ControllerError::EnrolmentRefused("this controller holds no state key".into())
        })?;
        let plain = key.open(&row(&req.node_id), &req.body).map_err(|_| {
            ControllerError::EnrolmentRefused(format!(
                "the request of {} is not sealed with this fleet's key: its controller.secrets is \
                 not this fleet's",
                req.requested_by
            ))
        })?;
        let sealed: Sealed = serde_json::from_slice(&plain).map_err(|e| {
            ControllerError::EnrolmentRefused(format!("the request does not parse: {e}"))
        })?;
        let age = self.clock.now_ms().abs_diff(sealed.sealed_at_ms);
        if age > MAX_AGE_MS {
            return Err(ControllerError::EnrolmentRefused(format!(
                "the request of {} was sealed {} s from now (more than {} s): refused as stale or \
                 replayed; enroll the node again (check the installer's clock)",
                req.requested_by,
                age / 1000,
                MAX_AGE_MS / 1000
            )));
        }
        let node_id = NodeId::parse(&req.node_id).map_err(|e| {
            ControllerError::EnrolmentRefused(format!("{:?} is not a node id: {e}", req.node_id))
        })?;
        let Sealed {
            key: initial_key,
            addr,
            force,
            ..
        } = sealed;
        // Answered before, and the answer lost (the leader stopped between
        // the enrolment and the answer): the same node with the same key.
        let (same_key, _) = self.machine.enrolled_alike(&initial_key, addr);
        if same_key == Some(&node_id) {
            return Ok(EnrollReport {
                member: self.machine.member_number(&node_id).unwrap_or(0),
                node_id: node_id.to_string(),
                address: (addr.port() != 0).then(|| addr.to_string()),
                fingerprint: initial_key.fingerprint(),
            });
        }
        self.enroll(node_id, initial_key, addr, force).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::{init, Options, StateDir};
    use super::*;
    use crate::config::Config;

    fn answer(c: &Controller, id: i64) -> Answer {
        serde_json::from_str(&c.store().enrolment_answer(id).unwrap().unwrap()).unwrap()
    }

    /// The leader's side of the queue, on the embedded table: a request
    /// sealed with the fleet's key is enrolled (and answered alike when taken
    /// again); one sealed with another fleet's key, one replayed from long
    /// ago, and a label read twice are refused with the reason; every body
    /// is erased once answered.
    #[tokio::test]
    async fn queued_enrolments_are_answered_and_forged_or_replayed_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options::new(StateDir::new(dir.path().join("kf")), Config::default());
        init(&opts).unwrap();
        let mut c = Controller::open(opts).unwrap();
        let key = c.table.state_key().unwrap().clone();
        let now = c.clock.now_ms();
        let (a, b) = (NodeId::parse("a").unwrap(), NodeId::parse("b").unwrap());
        let (ka, kb) = (InitialKey([1; 16]), InitialKey([2; 16]));
        let addr: SocketAddr = "127.0.0.1:9100".parse().unwrap();
        let ask = |node_id, initial_key| Ask {
            node_id,
            initial_key,
            addr,
            force: false,
        };
        let store = c.table.store_mut();
        let good = request(store, &key, &ask(&a, &ka), "i1", now).unwrap();
        let foreign = request(store, &StateKey::generate(), &ask(&b, &kb), "i2", now).unwrap();
        let old = request(store, &key, &ask(&b, &kb), "i3", now - MAX_AGE_MS - 1).unwrap();
        let twice = request(store, &key, &ask(&b, &ka), "i4", now).unwrap();
        assert_eq!(c.take_enrolments().await.unwrap(), 4);
        let Answer::Enrolled(r) = answer(&c, good) else {
            panic!("{:?}", answer(&c, good))
        };
        assert_eq!((r.node_id.as_str(), r.member), ("a", 1));
        for (id, why) in [
            (foreign, "not sealed with this fleet's key"),
            (old, "stale or replayed"),
            (twice, "already enrolled with the same initial key"),
        ] {
            match answer(&c, id) {
                Answer::Refused(text) => assert!(text.contains(why), "{text}"),
                other => panic!("request {id}: {other:?}"),
            }
        }
        assert!(c.store().open_enrolments(10).unwrap().is_empty());
        let db = rusqlite::Connection::open(dir.path().join("kf").join("fleet.db")).unwrap();
        let bodies: i64 = db
            .query_row(
                "SELECT count(*) FROM enrol_requests WHERE body IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(bodies, 0, "an answered request keeps no sealed initial key");
        assert_eq!(c.machine().members().count(), 1);
        // The same request again (its answer lost): answered as enrolled.
        let store = c.table.store_mut();
        let again = request(store, &key, &ask(&a, &ka), "i1", now).unwrap();
        c.take_enrolments().await.unwrap();
        assert!(matches!(answer(&c, again), Answer::Enrolled(r) if r.member == 1));
        assert_eq!(c.machine().members().count(), 1);
    }
}
