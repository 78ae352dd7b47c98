//! The error dialect of Redis: one table of classes for redis-cli's stderr and for the worker's
//! own client (keyspace dump, restore, probes), so a wrong password is `auth` whichever of the
//! two met it.

use super::super::{fail, Failure};
use crate::classify::Dialect;
use crate::domain::FailureReason;

/// The phrases (lowercase) of redis-cli's stderr, of the server's error replies and of the
/// redis crate's own errors. The shared matcher adds what every network tool prints (refused,
/// DNS, timeouts, resets); authentication wins over reachability.
const DIALECT: Dialect = Dialect {
    auth: &[
        "wrongpass",
        "noauth",
        "invalid username-password pair",
        "auth failed",
        "invalid password",
        // The client's AUTH refused ("Password authentication failed- AuthenticationFailed").
        "authentication failed",
        "authentication required",
        "called without any password configured",
    ],
    unreachable: &["could not connect to redis", "loading redis is loading"],
};

/// Refusals of a command the mode needs (SCAN, RESTORE, FUNCTION RESTORE, SELECT): the resource's
/// user lacks a right, which no retry gives it. Checked after auth and reachability. Callers
/// that expect `NOPERM` for other tenants' keys (DUMP, UNLINK) handle it before classifying.
const CONFIG: &[&str] = &[
    "noperm",
    "db index is out of range",
    "refused to switch database",
];

/// The failure class of a Redis tool's non-zero exit, or of a server's error reply.
pub fn classify(text: &str) -> FailureReason {
    match crate::classify::classify(text, &DIALECT) {
        FailureReason::Dump if contains_any(text, CONFIG) => FailureReason::Config,
        reason => reason,
    }
}

fn contains_any(text: &str, phrases: &[&str]) -> bool {
    let text = text.to_ascii_lowercase();
    phrases.iter().any(|p| text.contains(p))
}

/// The class of an error of the worker's own client: the same table as redis-cli's stderr, with
/// the client's transport errors (whatever their wording) `unreachable`.
pub(super) fn client_class(e: &redis::RedisError) -> FailureReason {
    match classify(&describe(e)) {
        FailureReason::Dump
            if e.is_io_error()
                || e.is_connection_refusal()
                || e.is_timeout()
                || e.is_connection_dropped() =>
        {
            FailureReason::Unreachable
        }
        reason => reason,
    }
}

/// An error's text: the server's code and detail (`NOPERM: this user …`), or the client's own
/// description and kind.
fn describe(e: &redis::RedisError) -> String {
    e.to_string()
}

/// A failure of the worker's own client during `stage` (no secret: the client's errors carry
/// neither the URL nor the password).
pub(super) fn redis_failure(stage: &str, e: redis::RedisError) -> Failure {
    fail(client_class(&e), format!("{stage}: {}", describe(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One table for both paths: redis-cli's stderr lines and the client's errors, as each
    /// really prints them.
    #[test]
    fn one_table_for_redis_cli_and_the_client() {
        use FailureReason::*;
        let stderr: &[(&str, FailureReason)] = &[
            ("AUTH failed: WRONGPASS invalid username-password pair or user is disabled.", Auth),
            ("NOAUTH Authentication required.", Auth),
            ("Could not connect to Redis at 127.0.0.1:1: Connection refused", Unreachable),
            ("Could not connect to Redis at nohost:6379: Name or service not known", Unreachable),
            ("SYNC with master failed: -NOPERM this user has no permissions to run the 'sync' command", Config),
            ("Error: Server closed the connection", Dump),
            ("SYNC with master failed: -ERR unknown command 'SYNC'", Dump),
        ];
        for (line, want) in stderr {
            assert_eq!(classify(line), *want, "{line}");
        }
        let client: &[(redis::RedisError, FailureReason)] = &[
            (
                (
                    redis::ErrorKind::AuthenticationFailed,
                    "Password authentication failed",
                )
                    .into(),
                Auth,
            ),
            (
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
                Unreachable,
            ),
            (
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into(),
                Unreachable,
            ),
            (
                redis::RedisError::from((
                    redis::ErrorKind::ResponseError,
                    "Redis server refused to switch database",
                    "NOPERM this user has no permissions to run the 'select' command".to_string(),
                )),
                Config,
            ),
            (
                redis::make_extension_error(
                    "NOPERM".into(),
                    Some("this user has no permissions to run the 'scan' command".into()),
                ),
                Config,
            ),
            (
                redis::make_extension_error(
                    "WRONGPASS".into(),
                    Some("invalid username-password pair or user is disabled.".into()),
                ),
                Auth,
            ),
        ];
        for (e, want) in client {
            assert_eq!(client_class(e), *want, "{e} / {}", describe(e));
        }
    }
}
