//! What is kept on disk: the management table (its rows, migrations, crash
//! safety, the fsyncs of a round) and the agent's state file on a full disk.

#[path = "../support/mod.rs"]
pub mod support;

mod fsync_count;
mod management_table;
mod migration_rev1;
mod statefile_enospc;
mod store_crash;
mod store_migration;
