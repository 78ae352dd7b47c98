//! Failure classification of a tool's stderr (DESIGN §5). Each engine owns its dialect — the
//! phrases its tools print for rejected credentials and unreachable servers — in its own module;
//! this is the matcher they share, plus the phrases every network tool prints. Tools run with
//! LC_ALL=C, so messages are in English. Authentication wins over reachability: a rejected
//! handshake often ends with a closed socket too.

use crate::domain::FailureReason;

/// The phrases one engine's tools print, lowercase.
#[derive(Debug)]
pub struct Dialect {
    pub auth: &'static [&'static str],
    pub unreachable: &'static [&'static str],
}

/// What any tool that talks to a server over TCP says when it cannot reach it.
const NETWORK: &[&str] = &[
    "connection refused",
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
    "connection reset",
];

/// Classifies a non-zero exit of a tool from its stderr: `auth`, `unreachable`, or `dump`.
pub fn classify(stderr: &str, dialect: &Dialect) -> FailureReason {
    let text = stderr.to_ascii_lowercase();
    if dialect.auth.iter().any(|p| text.contains(p)) {
        FailureReason::Auth
    } else if NETWORK
        .iter()
        .chain(dialect.unreachable)
        .any(|p| text.contains(p))
    {
        FailureReason::Unreachable
    } else {
        FailureReason::Dump
    }
}
