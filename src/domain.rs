//! The vocabulary shared with the platform API: resource types, statuses and failure classes.
//! One list each, used by the SQL, the runners and the metrics alike.

/// Resource types the worker backs up and restores, as stored in `resources.resource_type`.
pub const SUPPORTED_RESOURCE_TYPES: &[&str] = &["postgres", "vector", "mongodb", "redis"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceType {
    Postgres,
    /// pgvector: a Postgres database, dumped and restored like one.
    Vector,
    Mongodb,
    Redis,
}

impl ResourceType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "postgres" => Some(Self::Postgres),
            "vector" => Some(Self::Vector),
            "mongodb" => Some(Self::Mongodb),
            "redis" => Some(Self::Redis),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Vector => "vector",
            Self::Mongodb => "mongodb",
            Self::Redis => "redis",
        }
    }
}

/// `failure_reason` values (DESIGN §5, plus `integrity` for restores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    Auth,
    Unreachable,
    Dump,
    Sanity,
    Upload,
    Timeout,
    Config,
    Integrity,
    /// A restore that applied only part of the backup (DESIGN §6).
    Incomplete,
    /// The target rejected a statement of a restore deterministically (DESIGN §6).
    Conflict,
}

impl FailureReason {
    pub const BACKUP: &'static [FailureReason] = &[
        Self::Auth,
        Self::Unreachable,
        Self::Dump,
        Self::Sanity,
        Self::Upload,
        Self::Timeout,
        Self::Config,
    ];
    pub const RESTORE: &'static [FailureReason] = &[
        Self::Auth,
        Self::Unreachable,
        Self::Dump,
        Self::Sanity,
        Self::Upload,
        Self::Timeout,
        Self::Config,
        Self::Integrity,
        Self::Conflict,
        Self::Incomplete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::Unreachable => "unreachable",
            Self::Dump => "dump",
            Self::Sanity => "sanity",
            Self::Upload => "upload",
            Self::Timeout => "timeout",
            Self::Config => "config",
            Self::Integrity => "integrity",
            Self::Incomplete => "incomplete",
            Self::Conflict => "conflict",
        }
    }

    /// Transient classes go back to pending with backoff; the rest fail at once.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::Unreachable | Self::Dump | Self::Upload | Self::Timeout
        )
    }

    /// The customer-facing `error_summary` of a row that has failed for good: never a promise
    /// to retry (DESIGN §5).
    pub fn final_summary(self) -> &'static str {
        match self {
            Self::Unreachable => {
                "Your database was unreachable on every attempt; our team is alerted."
            }
            Self::Dump => "We couldn't read your database on any attempt; our team is alerted.",
            Self::Upload => "We hit a storage problem on every attempt; our team is alerted.",
            Self::Timeout => "The backup took too long on every attempt; our team is alerted.",
            other => other.customer_summary(),
        }
    }

    /// The customer-facing `error_summary` of a restore (DESIGN §6: restore texts, never a
    /// backup's), `final_` when the row has failed for good (never a promise to retry).
    pub fn restore_summary(self, final_: bool) -> &'static str {
        match (self, final_) {
            (Self::Auth, _) => "We couldn't restore your database: it rejected our credentials. Your database was not changed; our team is alerted.",
            (Self::Unreachable, false) => "We couldn't restore your database: it was briefly unreachable or busy; we'll retry.",
            (Self::Unreachable, true) => "We couldn't restore your database: it was unreachable or busy on every attempt; our team is alerted.",
            (Self::Dump, false) => "We couldn't restore your database: the restore stopped with an error; we'll retry.",
            (Self::Dump, true) => "We couldn't restore your database: the restore stopped with an error on every attempt; our team is alerted.",
            (Self::Upload, false) => "We couldn't restore your database: we couldn't read the backup from storage; we'll retry.",
            (Self::Upload, true) => "We couldn't restore your database: we couldn't read the backup from storage on any attempt; our team is alerted.",
            (Self::Timeout, false) => "We couldn't restore your database: the restore took too long; we'll retry.",
            (Self::Timeout, true) => "We couldn't restore your database: the restore took too long on every attempt; our team is alerted.",
            (Self::Sanity | Self::Integrity, _) => "We couldn't restore your database: the backup file failed its integrity check. Your database was not changed; our team is alerted.",
            (Self::Config, _) => "We couldn't restore your database: this restore can't be done as requested. Your database was not changed; our team is alerted.",
            (Self::Conflict, _) => self.customer_summary(),
            (Self::Incomplete, _) => self.customer_summary(),
        }
    }

    /// The customer-facing `error_summary` while the row will be retried (or for classes that
    /// never are): fixed text per class, never tool output.
    pub fn customer_summary(self) -> &'static str {
        match self {
            Self::Auth => "Your database rejected our backup credentials; our team is alerted.",
            Self::Unreachable => "Your database was briefly unreachable; we'll retry.",
            Self::Dump => "We couldn't read your database; we'll retry.",
            Self::Sanity => "The backup was incomplete; our team is alerted.",
            Self::Upload => "We hit a temporary storage problem; we'll retry.",
            Self::Timeout => "The backup took too long; we'll retry.",
            Self::Config => "There is a configuration problem with this resource; our team is alerted.",
            Self::Integrity => "The backup file failed its integrity check; your database was not changed and our team is alerted.",
            Self::Incomplete => "We couldn't restore your database completely: part of the backup was restored and some of it was rejected by your database; our team is alerted.",
            Self::Conflict => "We couldn't restore your database: it refused a step of the restore. Your database was not changed; our team is alerted.",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_list_and_enum_agree() {
        for t in SUPPORTED_RESOURCE_TYPES {
            assert_eq!(ResourceType::parse(t).map(ResourceType::as_str), Some(*t));
        }
        assert_eq!(ResourceType::parse("mysql"), None);
    }

    #[test]
    fn a_final_failure_never_promises_a_retry() {
        for r in FailureReason::RESTORE {
            assert!(!r.final_summary().contains("retry"), "{r:?}");
            if !r.retryable() {
                assert!(!r.customer_summary().contains("retry"), "{r:?}");
            }
        }
    }

    #[test]
    fn restore_texts_are_restore_texts() {
        for r in FailureReason::RESTORE {
            for final_ in [false, true] {
                let text = r.restore_summary(final_);
                assert!(
                    text.starts_with("We couldn't restore your database"),
                    "{r:?}: {text}"
                );
                assert!(!text.contains("couldn't read your database"), "{r:?}");
                if final_ || !r.retryable() {
                    assert!(!text.contains("retry"), "{r:?} {final_}: {text}");
                }
            }
        }
    }

    #[test]
    fn retry_policy_matches_the_contract() {
        let retried: Vec<_> = FailureReason::BACKUP
            .iter()
            .filter(|r| r.retryable())
            .map(|r| r.as_str())
            .collect();
        assert_eq!(retried, ["unreachable", "dump", "upload", "timeout"]);
    }
}
