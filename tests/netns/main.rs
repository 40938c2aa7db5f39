//! Real processes in network namespaces: nftables packet loss, a link that
//! drops and returns, an isolated controller. Each test needs root and the
//! `ip` and `nft` tools; without them it says why and returns.

#[path = "../support/mod.rs"]
pub mod support;

mod controller_isolated;
mod controller_netns;
mod fleet_link;
mod fleet_netns;
mod netns;
