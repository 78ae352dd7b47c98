//! Postgres: the pool, the embedded migrations, and the readiness check.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::secret::Secret;

/// migrations/, embedded: `backup-worker migrate` and `sqlx migrate run` apply the same files and
/// share the `_sqlx_migrations` ledger, so either one run twice is a no-op.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL could not be parsed: {0}")]
    BadUrl(String),
    #[error("cannot connect to Postgres: {0}")]
    Connect(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Query(#[from] sqlx::Error),
}

/// Connects lazily-validated: the pool is built now, the first connection is tested so a wrong
/// URL or a down server fails the start with a clear line.
pub async fn connect(url: &Secret, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.expose().parse().map_err(|e: sqlx::Error| {
        DbError::BadUrl(crate::secret::redact_credentials(&e.to_string()))
    })?;
    let options = options.application_name("backup-worker");
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(DbError::Connect)
}

pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// True when every embedded migration is applied successfully (newer ones, from a newer release
/// rolling out beside us, are fine).
pub async fn migrations_current(pool: &PgPool) -> Result<bool, DbError> {
    let applied: Vec<i64> = match sqlx::query_scalar(
        "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(v) => v,
        // No ledger yet: nothing applied.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    Ok(MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .all(|m| applied.binary_search(&m.version).is_ok()))
}

/// Writes one audit_log row (the API's mailer and the support console read these).
pub async fn audit<'e, E>(
    executor: E,
    kind: &str,
    team_id: Option<uuid::Uuid>,
    resource_id: Option<uuid::Uuid>,
    subject_id: Option<uuid::Uuid>,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    sqlx::query(
        "INSERT INTO audit_log (kind, team_id, resource_id, subject_id, detail)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(kind)
    .bind(team_id)
    .bind(resource_id)
    .bind(subject_id)
    .bind(detail)
    .execute(executor)
    .await?;
    Ok(())
}
