//! HTTP on METRICS_ADDR: /metrics (Prometheus text), /healthz (every loop alive), /readyz
//! (Postgres answers and migrations are current).

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub health: Health,
    pub pool: PgPool,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn healthz(State(s): State<HttpState>) -> Response {
    let (ok, loops) = s.health.report();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({ "status": if ok { "ok" } else { "stalled" }, "loops": loops })),
    )
        .into_response()
}

async fn readyz(State(s): State<HttpState>) -> Response {
    let check = tokio::time::timeout(Duration::from_secs(3), async {
        sqlx::query("SELECT 1").execute(&s.pool).await?;
        crate::db::migrations_current(&s.pool).await
    })
    .await;
    let (code, status, detail) = match check {
        Ok(Ok(true)) => (StatusCode::OK, "ready", None),
        Ok(Ok(false)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "migrations_pending",
            Some("run `backup-worker migrate`".to_owned()),
        ),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "database_error",
            Some(crate::secret::redact_credentials(&e.to_string())),
        ),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database_timeout", None),
    };
    (code, Json(json!({ "status": status, "detail": detail }))).into_response()
}
