//! Plan tiers (DESIGN §3): a typed loader for plans.yaml that rejects unknown fields and bad values
//! with a message naming the field, and tier resolution (`X_yearly` → `X`, unknown → `default`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

/// The plans.yaml at the repository root, compiled in; `PLANS_PATH` overrides it.
pub const EMBEDDED_PLANS: &str = include_str!("../plans.yaml");

/// Smallest non-zero RPO: the scheduler treats a resource as due once no backup exists within
/// `rpo_minutes - 10`, so anything at or under 10 minutes would enqueue on every tick.
pub const MIN_RPO_MINUTES: u32 = 15;
pub const MAX_RPO_MINUTES: u32 = 7 * 24 * 60;
/// A partial WAL segment is uploaded every `pitr_rpo_seconds`: under 10 s it would re-upload a
/// busy 16 MiB segment several times a minute; over a day it is not a point-in-time RPO.
pub const MIN_PITR_RPO_SECONDS: u32 = 10;
pub const MAX_PITR_RPO_SECONDS: u32 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum PlansError {
    #[error("plans file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// serde_yaml's message already carries the field path (e.g. `tiers.pro: unknown field …`).
    #[error("plans file {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("plans file {origin}: {field}: {problem}")]
    Invalid {
        origin: String,
        field: String,
        problem: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub connections: i64,
    pub memory_mb: i64,
    pub storage_mb: i64,
}

impl Limits {
    /// The `limits` map of RegradeResourceRequest.
    pub fn as_map(&self) -> HashMap<String, i64> {
        HashMap::from([
            ("connections".to_owned(), self.connections),
            ("memory_mb".to_owned(), self.memory_mb),
            ("storage_mb".to_owned(), self.storage_mb),
        ])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub rpo_minutes: u32,
    pub backup_retention_days: u32,
    pub backup_keep_last: u32,
    /// Point-in-time recovery (DESIGN §14): the WAL of a Postgres/vector resource is stored at
    /// least this often; 0 (the default) is no PITR.
    #[serde(default)]
    pub pitr_rpo_seconds: u32,
    pub limits: Limits,
}

impl Plan {
    /// Either zero vetoes automated backups.
    pub fn backs_up(&self) -> bool {
        self.rpo_minutes > 0 && self.backup_retention_days > 0
    }

    /// WAL is streamed only for plans that keep backups at all (the base backups follow the
    /// tier's retention).
    pub fn pitr(&self) -> bool {
        self.pitr_rpo_seconds > 0 && self.backup_retention_days > 0
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlansFile {
    tiers: BTreeMap<String, Plan>,
    default: Plan,
}

/// How a tier name was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierMatch {
    Exact,
    /// `X_yearly` resolved to `X`.
    Yearly,
    /// Not in the file: the `default` plan applies (callers warn and count it).
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plans {
    tiers: BTreeMap<String, Plan>,
    default: Plan,
}

impl Plans {
    /// Loads `path`, or the embedded plans.yaml when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, PlansError> {
        match path {
            None => Self::from_yaml(EMBEDDED_PLANS, "(embedded plans.yaml)"),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| PlansError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Self::from_yaml(&text, &p.display().to_string())
            }
        }
    }

    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, PlansError> {
        let file: PlansFile = serde_yaml::from_str(text).map_err(|e| PlansError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |field: String, problem: String| PlansError::Invalid {
            origin: origin.to_owned(),
            field,
            problem,
        };
        if file.tiers.is_empty() {
            return Err(invalid(
                "tiers".into(),
                "must list at least one tier".into(),
            ));
        }
        for (name, plan) in &file.tiers {
            let valid_name = name.starts_with(|c: char| c.is_ascii_lowercase())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid_name {
                return Err(invalid(
                    format!("tiers.{name}"),
                    "tier names are lowercase letters, digits and '_', starting with a letter"
                        .into(),
                ));
            }
            validate_plan(plan, &format!("tiers.{name}")).map_err(|(f, p)| invalid(f, p))?;
        }
        validate_plan(&file.default, "default").map_err(|(f, p)| invalid(f, p))?;
        Ok(Plans {
            tiers: file.tiers,
            default: file.default,
        })
    }

    /// The plan for a team's `plan_tier`: exact, else `X_yearly` → `X`, else `default`.
    pub fn resolve(&self, tier: &str) -> (&Plan, TierMatch) {
        if let Some(p) = self.tiers.get(tier) {
            return (p, TierMatch::Exact);
        }
        if let Some(base) = tier.strip_suffix("_yearly") {
            if let Some(p) = self.tiers.get(base) {
                return (p, TierMatch::Yearly);
            }
        }
        (&self.default, TierMatch::Default)
    }

    pub fn tiers(&self) -> impl Iterator<Item = (&str, &Plan)> {
        self.tiers.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn default_plan(&self) -> &Plan {
        &self.default
    }
}

/// plans.yaml flattened into parallel arrays for binding into SQL: every listed tier, plus
/// `X_yearly` for each listed `X` not listed itself. Tiers absent here take `default` in SQL
/// (`COALESCE(p.column, $default)`), so resolution matches [`Plans::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanArrays {
    pub tiers: Vec<String>,
    pub rpo_minutes: Vec<i32>,
    pub retention_days: Vec<i32>,
    pub keep_last: Vec<i32>,
    pub pitr_rpo_seconds: Vec<i32>,
    pub default: Plan,
}

impl Plans {
    pub fn sql_arrays(&self) -> PlanArrays {
        let mut map: BTreeMap<String, &Plan> = BTreeMap::new();
        for (name, plan) in &self.tiers {
            map.insert(name.clone(), plan);
        }
        for (name, plan) in &self.tiers {
            if !name.ends_with("_yearly") {
                map.entry(format!("{name}_yearly")).or_insert(plan);
            }
        }
        let mut a = PlanArrays {
            tiers: Vec::with_capacity(map.len()),
            rpo_minutes: Vec::with_capacity(map.len()),
            retention_days: Vec::with_capacity(map.len()),
            keep_last: Vec::with_capacity(map.len()),
            pitr_rpo_seconds: Vec::with_capacity(map.len()),
            default: self.default.clone(),
        };
        for (name, plan) in map {
            a.tiers.push(name);
            a.rpo_minutes.push(plan.rpo_minutes as i32);
            a.retention_days.push(plan.backup_retention_days as i32);
            a.keep_last.push(plan.backup_keep_last as i32);
            a.pitr_rpo_seconds.push(plan.pitr_rpo_seconds as i32);
        }
        a
    }
}

fn validate_plan(plan: &Plan, at: &str) -> Result<(), (String, String)> {
    let rpo = plan.rpo_minutes;
    if rpo != 0 && !(MIN_RPO_MINUTES..=MAX_RPO_MINUTES).contains(&rpo) {
        return Err((
            format!("{at}.rpo_minutes"),
            format!("must be 0 (never) or from {MIN_RPO_MINUTES} to {MAX_RPO_MINUTES}, got {rpo}"),
        ));
    }
    if plan.backup_retention_days > 3650 {
        return Err((
            format!("{at}.backup_retention_days"),
            format!("must be from 0 to 3650, got {}", plan.backup_retention_days),
        ));
    }
    if plan.backup_keep_last > 1000 {
        return Err((
            format!("{at}.backup_keep_last"),
            format!("must be from 0 to 1000, got {}", plan.backup_keep_last),
        ));
    }
    let pitr = plan.pitr_rpo_seconds;
    if pitr != 0 && !(MIN_PITR_RPO_SECONDS..=MAX_PITR_RPO_SECONDS).contains(&pitr) {
        return Err((
            format!("{at}.pitr_rpo_seconds"),
            format!(
                "must be 0 (no point-in-time recovery) or from {MIN_PITR_RPO_SECONDS} to \
                 {MAX_PITR_RPO_SECONDS}, got {pitr}"
            ),
        ));
    }
    for (name, value) in [
        ("connections", plan.limits.connections),
        ("memory_mb", plan.limits.memory_mb),
        ("storage_mb", plan.limits.storage_mb),
    ] {
        if value <= 0 {
            return Err((
                format!("{at}.limits.{name}"),
                format!("must be positive, got {value}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plans() -> Plans {
        Plans::load(None).expect("embedded plans.yaml is valid")
    }

    #[test]
    fn pitr_rpo_seconds_per_tier_and_validated() {
        let p = plans();
        for (tier, secs) in [
            ("growth", 60),
            ("team", 60),
            ("pro", 300),
            ("hobby", 0),
            ("free", 0),
        ] {
            assert_eq!(p.resolve(tier).0.pitr_rpo_seconds, secs, "{tier}");
        }
        assert!(p.resolve("team_yearly").0.pitr());
        assert!(!p.default_plan().pitr(), "absent means no PITR");
        let bad = EMBEDDED_PLANS.replace("pitr_rpo_seconds: 300", "pitr_rpo_seconds: 5");
        let err = Plans::from_yaml(&bad, "t").unwrap_err().to_string();
        assert!(err.contains("tiers.pro.pitr_rpo_seconds"), "{err}");
    }

    #[test]
    fn embedded_file_has_every_tier_of_the_contract() {
        let p = plans();
        for tier in [
            "anonymous",
            "free",
            "hobby",
            "hobby_plus",
            "pro",
            "growth",
            "team",
        ] {
            assert_eq!(p.resolve(tier).1, TierMatch::Exact, "{tier}");
        }
        for tier in ["pro", "growth", "team"] {
            assert_eq!(p.resolve(tier).0.rpo_minutes, 60);
        }
        for tier in ["hobby", "hobby_plus"] {
            assert_eq!(p.resolve(tier).0.rpo_minutes, 1440);
        }
        for tier in ["anonymous", "free"] {
            assert!(!p.resolve(tier).0.backs_up());
        }
        assert_eq!(p.default_plan().rpo_minutes, 1440);
    }

    #[test]
    fn sql_arrays_add_yearly_aliases_without_overriding_listed_ones() {
        let plans = plans();
        let a = plans.sql_arrays();
        let idx = |name: &str| a.tiers.iter().position(|x| x == name);
        let (pro, pro_yearly) = (idx("pro").unwrap(), idx("pro_yearly").unwrap());
        assert_eq!(a.rpo_minutes[pro], a.rpo_minutes[pro_yearly]);
        assert_eq!(a.keep_last[pro], a.keep_last[pro_yearly]);
        assert!(idx("free_yearly").is_some());
        assert!(idx("enterprise").is_none());
        assert_eq!(a.tiers.len(), a.retention_days.len());
        for (i, t) in a.tiers.iter().enumerate() {
            let (p, _) = plans.resolve(t);
            assert_eq!(a.rpo_minutes[i], p.rpo_minutes as i32, "{t}");
        }
    }

    #[test]
    fn yearly_and_unknown_tiers() {
        let p = plans();
        let (plan, how) = p.resolve("pro_yearly");
        assert_eq!(how, TierMatch::Yearly);
        assert_eq!(plan, p.resolve("pro").0);
        let (plan, how) = p.resolve("enterprise");
        assert_eq!(how, TierMatch::Default);
        assert_eq!(plan, p.default_plan());
        assert_eq!(p.resolve("nope_yearly").1, TierMatch::Default);
    }

    #[test]
    fn a_yearly_tier_listed_itself_wins() {
        let yaml = EMBEDDED_PLANS.replace(
            "tiers:\n",
            "tiers:\n  pro_yearly: { rpo_minutes: 30, backup_retention_days: 60, backup_keep_last: 3, limits: { connections: 1, memory_mb: 1, storage_mb: 1 } }\n",
        );
        let p = Plans::from_yaml(&yaml, "t").unwrap();
        assert_eq!(
            p.resolve("pro_yearly"),
            (p.resolve("pro_yearly").0, TierMatch::Exact)
        );
        assert_eq!(p.resolve("pro_yearly").0.rpo_minutes, 30);
    }

    fn err_of(yaml: &str) -> String {
        Plans::from_yaml(yaml, "plans.yaml")
            .unwrap_err()
            .to_string()
    }

    const LIMITS: &str = "limits: { connections: 1, memory_mb: 1, storage_mb: 1 }";

    #[test]
    fn errors_name_the_field() {
        let e = err_of(&format!(
            "tiers:\n  pro: {{ rpo_minute: 60, backup_retention_days: 1, backup_keep_last: 1, {LIMITS} }}\ndefault: {{ rpo_minutes: 60, backup_retention_days: 1, backup_keep_last: 1, {LIMITS} }}\n"
        ));
        assert!(e.contains("tiers.pro") && e.contains("rpo_minute"), "{e}");

        let e = err_of(&format!(
            "tiers:\n  pro: {{ rpo_minutes: -5, backup_retention_days: 1, backup_keep_last: 1, {LIMITS} }}\ndefault: {{ rpo_minutes: 60, backup_retention_days: 1, backup_keep_last: 1, {LIMITS} }}\n"
        ));
        assert!(e.contains("tiers.pro.rpo_minutes"), "{e}");

        let e = err_of(&format!(
            "tiers:\n  pro: {{ rpo_minutes: 5, backup_retention_days: 1, backup_keep_last: 1, {LIMITS} }}\ndefault: {{ rpo_minutes: 60, backup_retention_days: 1, backup_keep_last: 1, {LIMITS} }}\n"
        ));
        assert!(e.contains("tiers.pro.rpo_minutes: must be 0"), "{e}");

        let e = err_of(&format!(
            "tiers:\n  pro: {{ rpo_minutes: 60, backup_retention_days: 1, backup_keep_last: 1, limits: {{ connections: 0, memory_mb: 1, storage_mb: 1 }} }}\ndefault: {{ rpo_minutes: 60, backup_retention_days: 1, backup_keep_last: 1, {LIMITS} }}\n"
        ));
        assert!(e.contains("tiers.pro.limits.connections"), "{e}");

        let e = err_of(&format!(
            "tiers:\n  pro: {{ rpo_minutes: 60, backup_retention_days: 1, backup_keep_last: 1, {LIMITS} }}\n"
        ));
        assert!(e.contains("default"), "{e}");

        let e = err_of(&format!(
            "tiers:\n  Pro: {{ rpo_minutes: 60, backup_retention_days: 1, backup_keep_last: 1, {LIMITS} }}\ndefault: {{ rpo_minutes: 60, backup_retention_days: 1, backup_keep_last: 1, {LIMITS} }}\n"
        ));
        assert!(e.contains("tiers.Pro"), "{e}");
    }
}
