//! What every loop is built from: configuration and the side-effect seams (database pool, object
//! store, tools, provisioner) plus the shared plans and metrics. A leaf module, so loops and the
//! supervisor both depend on it and not on each other.

use std::sync::Arc;

use sqlx::PgPool;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::plans::Plans;
use crate::process::Tools;
use crate::provisioner::Provisioner;
use crate::storage::ObjectStore;

/// Shared dependencies of every loop.
#[derive(Clone)]
pub struct Deps {
    pub config: Arc<Config>,
    pub pool: PgPool,
    pub store: Arc<dyn ObjectStore>,
    /// The copy destination (COPY_STORAGE_URL, DESIGN §13); `None`: backups exist once.
    pub copy_store: Option<Arc<dyn ObjectStore>>,
    pub plans: Arc<Plans>,
    pub metrics: Metrics,
    pub tools: Tools,
    /// `None` when PROVISIONER_ADDR is unset.
    pub provisioner: Option<Arc<dyn Provisioner>>,
}
