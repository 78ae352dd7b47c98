//! The provisioner seam (DESIGN §7): `RegradeResource` over gRPC at PROVISIONER_ADDR, generated
//! from proto/provisioner.proto, behind a narrow trait so the loop can be driven by any
//! implementation (tests run a real tonic server on loopback).

use std::time::Duration;

use async_trait::async_trait;

/// Types generated from proto/provisioner.proto.
pub mod pb {
    tonic::include_proto!("provisioner.v1");
}

pub use pb::{RegradeResourceRequest, RegradeResourceResponse};

/// Per-call deadline: a provisioner that hangs fails the attempt, which is retried.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ProvisionerError {
    #[error("PROVISIONER_ADDR is not a valid endpoint: {0}")]
    BadAddress(String),
    #[error("provisioner call failed: {code:?}: {message}")]
    Call { code: tonic::Code, message: String },
}

#[async_trait]
pub trait Provisioner: Send + Sync {
    async fn regrade(
        &self,
        request: RegradeResourceRequest,
    ) -> Result<RegradeResourceResponse, ProvisionerError>;
}

pub struct GrpcProvisioner {
    client: pb::provisioner_client::ProvisionerClient<tonic::transport::Channel>,
}

impl GrpcProvisioner {
    /// Connects lazily: a provisioner that is down at start only fails calls (retried).
    pub fn new(addr: &str, deadline: Duration) -> Result<Self, ProvisionerError> {
        let endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
            .map_err(|e| ProvisionerError::BadAddress(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(deadline);
        Ok(Self {
            client: pb::provisioner_client::ProvisionerClient::new(endpoint.connect_lazy()),
        })
    }
}

#[async_trait]
impl Provisioner for GrpcProvisioner {
    async fn regrade(
        &self,
        request: RegradeResourceRequest,
    ) -> Result<RegradeResourceResponse, ProvisionerError> {
        let mut client = self.client.clone();
        client
            .regrade_resource(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| ProvisionerError::Call {
                code: s.code(),
                message: s.message().chars().take(500).collect(),
            })
    }
}
