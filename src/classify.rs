//! Failure classification of a dump/restore tool's stderr (DESIGN §5), in every engine's dialect:
//! libpq/pg_dump, mongodump/mongorestore (Go driver), redis-cli. Tools run with LC_ALL=C, so
//! messages are in English. Authentication wins over reachability: a rejected handshake often
//! ends with a closed socket too.

use crate::domain::FailureReason;

const AUTH: &[&str] = &[
    // libpq
    "password authentication failed",
    "no pg_hba.conf entry",
    "pg_hba.conf rejects connection",
    "no password supplied",
    "peer authentication failed",
    "role \"",
    "sasl authentication failed",
    // MongoDB Go driver / database tools
    "auth error",
    "unable to authenticate",
    "sasl conversation error",
    "authentication failed",
    "not authorized on",
    "requires authentication",
    // redis-cli
    "wrongpass",
    "noauth",
    "invalid username-password pair",
    "auth failed",
    "invalid password",
];

const UNREACHABLE: &[&str] = &[
    "connection refused",
    "could not connect to server",
    "could not translate host name",
    "name or service not known",
    "temporary failure in name resolution",
    "no such host",
    "could not resolve",
    "no route to host",
    "network is unreachable",
    "host is unreachable",
    "timeout expired",
    "timed out",
    "i/o timeout",
    "server selection error",
    "server selection timeout",
    "no reachable servers",
    "connection reset",
    "broken pipe",
    "server closed the connection unexpectedly",
    "the database system is starting up",
    "the database system is shutting down",
    "could not connect to redis",
    "loading redis is loading",
    "connection pool",
    "socket was unexpectedly closed",
    "error connecting to",
];

/// Classifies a non-zero exit of a dump tool from its stderr: `auth`, `unreachable`, or `dump`.
pub fn classify_tool_failure(stderr: &str) -> FailureReason {
    let text = stderr.to_ascii_lowercase();
    // libpq's `role "x" does not exist` is an auth failure; other quoted roles are not.
    let auth = AUTH.iter().any(|p| {
        if *p == "role \"" {
            text.contains("role \"") && text.contains("does not exist")
        } else {
            text.contains(p)
        }
    });
    if auth {
        FailureReason::Auth
    } else if UNREACHABLE.iter().any(|p| text.contains(p)) {
        FailureReason::Unreachable
    } else {
        FailureReason::Dump
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailureReason::*;

    #[test]
    fn lines_from_the_field() {
        let cases: &[(&str, FailureReason)] = &[
            // Postgres
            ("pg_dump: error: connection to server at \"10.0.0.5\", port 5432 failed: FATAL:  password authentication failed for user \"app\"", Auth),
            ("pg_dump: error: connection to server at \"db\" (10.1.2.3), port 5432 failed: FATAL:  no pg_hba.conf entry for host \"10.9.8.7\", user \"app\", database \"app\", no encryption", Auth),
            ("pg_dump: error: connection to server at \"db\", port 5432 failed: FATAL:  role \"ghost\" does not exist", Auth),
            ("pg_dump: error: connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?", Unreachable),
            ("pg_dump: error: could not translate host name \"db.invalid\" to address: Name or service not known", Unreachable),
            ("pg_dump: error: connection to server at \"10.0.0.9\", port 5432 failed: timeout expired", Unreachable),
            ("pg_dump: error: query failed: ERROR:  permission denied for table secrets", Dump),
            ("pg_dump: error: aborting because of server version mismatch", Dump),
            // MongoDB
            ("2026-11-21T03:00:01.123+0000\tFailed: can't create session: failed to connect to mongodb://db:27017/: connection() error occurred during connection handshake: auth error: sasl conversation error: unable to authenticate using mechanism \"SCRAM-SHA-256\": (AuthenticationFailed) Authentication failed. socket was unexpectedly closed: EOF", Auth),
            ("Failed: can't create session: could not connect to server: server selection error: server selection timeout, current topology: { Type: Single, Servers: [{ Addr: db:27017, Type: Unknown, Last error: dial tcp 10.0.0.3:27017: connect: connection refused }, ] }", Unreachable),
            ("Failed: error connecting to db server: no reachable servers", Unreachable),
            ("Failed: error writing data for collection `shop.orders` to disk: write /dev/stdout: broken pipe", Unreachable),
            ("Failed: (Unauthorized) not authorized on shop to execute command { find: \"orders\" }", Auth),
            ("Failed: error reading collection: (CursorNotFound) cursor id 123 not found", Dump),
            // Redis
            ("AUTH failed: WRONGPASS invalid username-password pair or user is disabled.", Auth),
            ("REPLCONF capa error: NOAUTH Authentication required.\nSYNC with master failed: -NOAUTH Authentication required.", Auth),
            ("Could not connect to Redis at 10.0.0.4:6379: Connection refused", Unreachable),
            ("Could not connect to Redis at cache:6379: Name or service not known", Unreachable),
            ("Error: Server closed the connection", Dump),
            ("SYNC with master failed: -ERR unknown command 'SYNC'", Dump),
        ];
        for (line, want) in cases {
            assert_eq!(classify_tool_failure(line), *want, "{line}");
        }
    }
}
