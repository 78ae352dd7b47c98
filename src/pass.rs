//! What a loop's pass is handed, and how it fails: a leaf module shared by the loops, the queue
//! machinery (`jobs`) and the supervisor (`app`), so none of them depends on another for it.

use tokio_util::sync::CancellationToken;

use crate::health::Heartbeat;

pub type LoopError = Box<dyn std::error::Error + Send + Sync>;

/// What a pass gets from the supervisor.
#[derive(Clone)]
pub struct PassContext {
    /// Cancelled on SIGTERM: stop claiming new work, let running jobs finish.
    pub shutdown: CancellationToken,
    /// Cancelled when the shutdown grace runs out: kill children, abort uploads, release rows.
    pub abort: CancellationToken,
    pub heartbeat: Heartbeat,
}
