//! The error dialect of Redis: redis-cli's stderr and the server's replies.

use super::super::{fail, Failure};
use crate::classify::Dialect;
use crate::domain::FailureReason;

/// redis-cli and the server's replies.
const DIALECT: Dialect = Dialect {
    auth: &[
        "wrongpass",
        "noauth",
        "invalid username-password pair",
        "auth failed",
        "invalid password",
    ],
    unreachable: &["could not connect to redis", "loading redis is loading"],
};

/// The failure class of a Redis tool's non-zero exit (or a server's error reply).
pub fn classify(stderr: &str) -> FailureReason {
    crate::classify::classify(stderr, &DIALECT)
}

pub(super) fn redis_failure(stage: &str, e: redis::RedisError) -> Failure {
    let text = e.to_string();
    let reason = if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() {
        FailureReason::Unreachable
    } else {
        match classify(&text) {
            FailureReason::Auth => FailureReason::Auth,
            _ => FailureReason::Dump,
        }
    };
    fail(reason, format!("{stage}: {text}"))
}
