//! The seven loops (DESIGN §1). Each is one room: it implements [`Loop`], and the supervisor drives
//! it — passes on an interval in the daemon, a single pass with `--once`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;

pub use crate::pass::{LoopError, PassContext};

pub mod backups;
pub mod copies;
pub mod propagations;
pub mod restores;
pub mod scheduler;
pub mod verifier;
pub mod wal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoopName {
    Scheduler,
    // Before the backups: a `--once` run creates a new stream's slot before its first base
    // backup starts, so the slot holds the WAL the base backup's chain begins with.
    Wal,
    Backups,
    Restores,
    Verifier,
    Propagations,
    Copies,
}

impl LoopName {
    /// Also the order of a `--once` run: the scheduler's rows are claimed in the same run.
    pub const ALL: [LoopName; 7] = [
        LoopName::Scheduler,
        LoopName::Wal,
        LoopName::Backups,
        LoopName::Copies,
        LoopName::Restores,
        LoopName::Verifier,
        LoopName::Propagations,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LoopName::Scheduler => "scheduler",
            LoopName::Backups => "backups",
            LoopName::Restores => "restores",
            LoopName::Verifier => "verifier",
            LoopName::Propagations => "propagations",
            LoopName::Copies => "copies",
            LoopName::Wal => "wal",
        }
    }
}

impl fmt::Display for LoopName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LoopName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LoopName::ALL
            .into_iter()
            .find(|l| l.as_str() == s.trim())
            .ok_or_else(|| {
                format!("unknown loop {s:?}: expected scheduler, wal, backups, copies, restores, verifier or propagations")
            })
    }
}

#[async_trait]
pub trait Loop: Send + Sync {
    fn name(&self) -> LoopName;

    /// Pause between passes in the daemon.
    fn interval(&self) -> Duration;

    /// How long without progress before /healthz calls the loop stalled: three missed passes,
    /// never under a minute.
    fn stall_after(&self) -> Duration {
        (self.interval() * 3).max(Duration::from_secs(60))
    }

    /// Does everything due now (claiming until nothing is due) and returns. Long work calls
    /// `ctx.heartbeat.progress()` so /healthz can tell slow from stuck.
    async fn pass(&self, ctx: &PassContext) -> Result<(), LoopError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for l in LoopName::ALL {
            assert_eq!(l.as_str().parse::<LoopName>(), Ok(l));
        }
        assert!("backup".parse::<LoopName>().is_err());
    }
}
