//! Secrets: a wrapper whose Debug never shows the value, and redaction of credentials in free text
//! (tool stderr, error chains) before it reaches a log line or a row.

use std::fmt;

/// A secret string (a connection URL, a password). `Debug` prints a redacted form; the raw value
/// is reachable only through [`Secret::expose`], so every use is greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({:?})", redact_credentials(&self.0))
    }
}

const MASK: &str = "***";

/// Query parameters whose values are credentials in the URL dialects we handle.
const SECRET_PARAMS: &[&str] = &[
    "password",
    "pass",
    "pwd",
    "passwd",
    "secret",
    "token",
    "authtoken",
    "auth",
    "sslpassword",
];

/// Masks the password of every `scheme://user:password@host` URL in `text`, and the values of
/// credential-like query parameters (`password=`, `token=`, …). Text without URLs is unchanged.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (before, after) = rest.split_at(pos + 3);
        out.push_str(before);
        // The authority ends at the first '/', '?', '#' or whitespace; a '@' inside it ends the
        // userinfo. The last '@' wins so a password containing '@' is masked whole.
        let authority_end = after
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"')
            .unwrap_or(after.len());
        let authority = &after[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon + 1]);
                        out.push_str(MASK);
                    }
                    // A lone token in the user position (e.g. redis://token@host) is a secret too.
                    None if !userinfo.is_empty() => out.push_str(MASK),
                    None => {}
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[authority_end..];
    }
    out.push_str(rest);
    redact_params(&out)
}

fn redact_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let bytes = text.as_bytes();
    let mut last = 0;
    while let Some((i, _)) = chars.next() {
        // A parameter starts after '?', '&', ';' or whitespace (libpq keyword/value strings).
        let at_start = i == 0 || matches!(bytes[i - 1], b'?' | b'&' | b';' | b' ' | b'\t');
        if !at_start {
            continue;
        }
        let Some(eq) = text[i..].find('=') else { break };
        let name = &text[i..i + eq];
        if !SECRET_PARAMS.iter().any(|p| name.eq_ignore_ascii_case(p)) {
            continue;
        }
        let value_start = i + eq + 1;
        let value_end = text[value_start..]
            .find(|c: char| c == '&' || c == ';' || c.is_whitespace() || c == '"' || c == '\'')
            .map_or(text.len(), |n| value_start + n);
        out.push_str(&text[last..value_start]);
        out.push_str(MASK);
        last = value_end;
        while chars.peek().is_some_and(|(j, _)| *j < value_end) {
            chars.next();
        }
    }
    out.push_str(&text[last..]);
    out
}

/// Replaces every occurrence of each known secret (e.g. a decoded password) in `text`.
pub fn redact_known(text: &str, secrets: &[&str]) -> String {
    let mut out = redact_credentials(text);
    for s in secrets.iter().filter(|s| s.len() >= 3) {
        out = out.replace(*s, MASK);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_url_passwords() {
        assert_eq!(
            redact_credentials("postgres://app:s3cr%40t@db:5432/app?sslmode=require"),
            "postgres://app:***@db:5432/app?sslmode=require"
        );
        assert_eq!(
            redact_credentials(
                "failed: mongodb+srv://u:p@@x.example.net/db and redis://:pw@h:6379/0"
            ),
            "failed: mongodb+srv://u:***@x.example.net/db and redis://:***@h:6379/0"
        );
        assert_eq!(redact_credentials("redis://tok@h"), "redis://***@h");
        assert_eq!(redact_credentials("no urls here"), "no urls here");
        assert_eq!(
            redact_credentials("s3://bucket/prefix"),
            "s3://bucket/prefix"
        );
    }

    #[test]
    fn masks_credential_params() {
        assert_eq!(
            redact_credentials("host=db password=hunter2 user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(
            redact_credentials("mongodb://h/db?authSource=admin&password=x&tls=true"),
            "mongodb://h/db?authSource=admin&password=***&tls=true"
        );
    }

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("postgres://u:topsecret@h/db");
        let shown = format!("{s:?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(shown.contains("postgres://u:***@h/db"));
    }

    #[test]
    fn known_secrets_are_masked_anywhere() {
        assert_eq!(
            redact_known("AUTH hunter2 failed", &["hunter2"]),
            "AUTH *** failed"
        );
    }
}
