//! Initial keys entered as an installer enters them: `keyfleet read-key` on
//! a terminal, from the keyboard and key-file fixtures, and from real
//! loop-mounted media.

#[path = "../support/mod.rs"]
pub mod support;

mod input_fixtures;
mod read_key;
mod read_key_media;
