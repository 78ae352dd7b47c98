//! backup-worker: the daemon behind a database platform's automated backups, one-click restores
//! and plan-tier propagation. See README.md for the architecture and docs/contract.md for the contract.

pub mod alloc;
pub mod anomaly;
pub mod app;
pub mod classify;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod db;
pub mod deps;
pub mod domain;
pub mod engines;
pub mod gzip;
pub mod health;
pub mod http;
pub mod jobs;
pub mod logging;
pub mod loops;
pub mod metrics;
pub mod pass;
pub mod pipeline;
pub mod pitr;
pub mod plans;
pub mod process;
pub mod provisioner;
pub mod restore;
pub mod retention;
pub mod secret;
pub mod storage;

pub use app::{run, Deps, RunOptions};
