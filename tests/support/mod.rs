pub mod adversary;
pub mod common;
pub mod netns;
pub mod wiretap;
