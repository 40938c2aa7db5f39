pub mod adversary;
pub mod netns;
