//! Where a node sends what it has for the controller (issue 11.2).
//!
//! Acknowledgements, key requests, joins and usage reports used to go to the
//! group, where every other node received and ignored them: N² datagrams a
//! phase. A node configured with a multicast `controller` (the agent's
//! default, the group) sends them instead to the controller's unicast address
//! once it has learned it from an authenticated controller message:
//!
//! - a beacon whose signature it verified: the address the beacon announces
//!   (an unspecified IP there means the beacon's source);
//! - a freshly authenticated request or answer (key update, transition
//!   request, key response, join accept, resync request): its source address.
//!
//! A retransmission or replay (a copy already accepted, `ReplayVerdict::Again`) teaches
//! nothing, so someone who replays captured controller traffic from their own
//! address cannot draw the node's answers away. Until an address is known, and
//! as a fallback, the group is used: every second answer to a request the node
//! had already answered (the controller retried, so it did not hear the
//! earlier answer), and every second key-request retry, go to the group. A
//! `controller` configured as a unicast address is used as it is.

use core::net::SocketAddr;

/// The controller's address as the node knows it.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub(super) struct Route {
    /// Learned from an authenticated controller message; `None` until then.
    learned: Option<SocketAddr>,
    /// Answers to requests the node had already answered, since its last step.
    reanswers: u32,
}

impl Route {
    /// Takes `addr` as the controller's unicast address, unless `configured`
    /// (the node's `controller` setting) is a unicast address already, or
    /// `addr` is no usable unicast address.
    pub(super) fn learn(&mut self, configured: SocketAddr, addr: SocketAddr) {
        let usable = !addr.ip().is_multicast() && !addr.ip().is_unspecified() && addr.port() != 0;
        if configured.ip().is_multicast() && usable {
            self.learned = Some(addr);
        }
    }

    /// Where the next message goes: the learned unicast address, or
    /// `configured` when none is known or `fallback` asks for it.
    pub(super) fn dest(&self, configured: SocketAddr, fallback: bool) -> SocketAddr {
        match self.learned {
            Some(a) if configured.ip().is_multicast() && !fallback => a,
            _ => configured,
        }
    }

    /// The learned address, if any.
    pub(super) fn learned(&self) -> Option<SocketAddr> {
        self.learned
    }

    /// The node moved to a new step: its next answers are first answers.
    pub(super) fn stepped(&mut self) {
        self.reanswers = 0;
    }

    /// One more answer to a request already answered; whether it goes to
    /// the group (every second one).
    pub(super) fn reanswer(&mut self) -> bool {
        self.reanswers = self.reanswers.saturating_add(1);
        self.reanswers % 2 == 0
    }
}

/// The controller address a beacon announces: `announced`, or with an
/// unspecified IP, the beacon's source IP and the announced port.
pub(super) fn beacon_address(announced: SocketAddr, from: SocketAddr) -> SocketAddr {
    if announced.ip().is_unspecified() {
        SocketAddr::new(from.ip(), announced.port())
    } else {
        announced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_group_setting_learns_and_falls_back() {
        let group = a("239.255.77.77:7777");
        let mut r = Route::default();
        assert_eq!(r.dest(group, false), group, "nothing learned: the group");
        r.learn(group, a("10.0.0.1:47800"));
        assert_eq!(r.dest(group, false), a("10.0.0.1:47800"));
        assert_eq!(r.dest(group, true), group);
        // Nothing unusable is learned.
        for bad in ["0.0.0.0:47800", "239.1.1.1:7777", "10.0.0.2:0"] {
            r.learn(group, a(bad));
            assert_eq!(r.learned(), Some(a("10.0.0.1:47800")), "{bad}");
        }
        r.learn(group, a("10.0.0.9:47801"));
        assert_eq!(
            r.dest(group, false),
            a("10.0.0.9:47801"),
            "the controller moved"
        );
    }

    #[test]
    fn a_unicast_setting_is_kept() {
        let ctl = a("10.0.0.1:47800");
        let mut r = Route::default();
        r.learn(ctl, a("10.0.0.7:9999"));
        assert_eq!(r.learned(), None);
        assert_eq!(r.dest(ctl, false), ctl);
        assert_eq!(r.dest(ctl, true), ctl);
    }

    #[test]
    fn every_second_reanswer_goes_to_the_group() {
        let mut r = Route::default();
        let picks: Vec<bool> = (0..5).map(|_| r.reanswer()).collect();
        assert_eq!(picks, [false, true, false, true, false]);
        r.stepped();
        assert!(!r.reanswer());
    }

    #[test]
    fn an_unspecified_beacon_address_is_its_source() {
        let from = a("10.0.0.1:47800");
        assert_eq!(beacon_address(a("0.0.0.0:47800"), from), from);
        assert_eq!(
            beacon_address(a("10.0.0.5:47801"), from),
            a("10.0.0.5:47801")
        );
    }
}
