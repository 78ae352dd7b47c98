//! The rewind's plan (DESIGN §6): from the dump's table of contents and what the target says
//! about roles, extensions and schemas, which entries pg_restore replays, and the SQL the worker
//! runs itself around that script, in the same transaction — the config rows it replaces, the
//! privileges (GRANT/REVOKE, column privileges, default privileges) and the owners.
//!
//! Why the worker applies privileges and owners itself rather than letting pg_restore do it: a
//! tenant's role may not act as every role named in a dump. A grant to a role missing on the
//! target, a grant made by a role the restoring role cannot act as, or an owner it may not
//! assign must be left out and listed — never fail the rewind, never vanish silently — and
//! pg_restore can only replay an entry whole. So the script is made `--no-owner` with the ACL
//! entries left out; afterwards, still before COMMIT, every object is owned by the restoring
//! role, which therefore may apply each ACL statement, filtered one by one; then ownership is
//! handed to each object's owner where the role may (a check the server makes, so each ALTER
//! runs in its own block that lists a refusal instead of failing).

use std::collections::{BTreeMap, BTreeSet};

use super::super::pg_archive::{TocEntry, OWNER_FROM_DROP};
use super::super::RestoreReport;

/// What the target database says, as the restoring role sees it (one probe query).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Target {
    pub superuser: bool,
    pub current_user: String,
    /// Installed extensions: name → (the restoring role may act as its owner, its schema).
    pub installed: BTreeMap<String, (bool, String)>,
    /// Extensions the role could create (available, and trusted or the role is a superuser).
    pub creatable: BTreeSet<String>,
    /// (extension, schema, relation) of every relation that belongs to an extension.
    pub members: BTreeSet<(String, String, String)>,
    /// Extensions' configuration tables: (schema, table) → (filter condition, writable).
    pub config: BTreeMap<(String, String), (String, bool)>,
    /// Roles the dump names: name → whether the restoring role may act as it (SET ROLE,
    /// ALTER … OWNER TO). Missing here: the role does not exist on the target.
    pub roles: BTreeMap<String, bool>,
    /// Schemas that exist on the target: name → whether one of its extensions belongs to
    /// another role (the platform's).
    pub schemas: BTreeMap<String, bool>,
}

/// The probe: one query, answered as hex-encoded fields separated by US (0x1f), one record a
/// line — so no name, however odd, can break the parse. `trusted` is read through to_jsonb: the
/// column exists from Postgres 13, and 12 has no trusted extensions. pg_has_role's `SET` (may
/// assign ownership to the role) exists from Postgres 16; before, membership is what counts.
pub(crate) fn probe_sql(roles: &BTreeSet<String>) -> String {
    let names = if roles.is_empty() {
        "SELECT NULL::text WHERE false".to_owned()
    } else {
        let values: Vec<String> = roles.iter().map(|r| format!("({})", literal(r))).collect();
        format!("VALUES {}", values.join(", "))
    };
    format!(
        r#"WITH me AS (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
ours(oid) AS (SELECT oid FROM pg_roles WHERE pg_has_role(oid, 'USAGE') AND rolname !~ '^pg_'),
f(kind, a, b, c, d) AS (
SELECT 'super', (SELECT rolsuper FROM me)::text, current_user::text, '', ''
UNION ALL
SELECT 'installed', e.extname::text, (e.extowner IN (SELECT oid FROM ours))::text, n.nspname::text, ''
  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
UNION ALL
SELECT 'creatable', a.name::text, '', '', '' FROM pg_available_extensions a
  JOIN pg_available_extension_versions v ON v.name = a.name AND v.version = a.default_version
 WHERE (SELECT rolsuper FROM me)
    OR (coalesce((to_jsonb(v) ->> 'trusted')::boolean, false)
        AND has_database_privilege(current_database(), 'CREATE'))
UNION ALL
SELECT 'member', e.extname::text, n.nspname::text, c.relname::text, '' FROM pg_depend d
  JOIN pg_class c ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_extension e ON d.refclassid = 'pg_extension'::regclass AND d.refobjid = e.oid
 WHERE d.deptype = 'e'
UNION ALL
SELECT 'config', n.nspname::text, c.relname::text, coalesce(x.cond, ''),
       (has_table_privilege(c.oid, 'DELETE') AND has_table_privilege(c.oid, 'INSERT')
        AND has_table_privilege(c.oid, 'SELECT'))::text
  FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS x(tab, cond)
  JOIN pg_class c ON c.oid = x.tab JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r'
UNION ALL
SELECT 'role', v.name, (r.oid IS NOT NULL)::text,
       coalesce(pg_has_role(r.oid, CASE WHEN current_setting('server_version_num')::int >= 160000
                                        THEN 'SET' ELSE 'MEMBER' END), false)::text, ''
  FROM ({names}) AS v(name) LEFT JOIN pg_roles r ON r.rolname = v.name
UNION ALL
SELECT 'schema', n.nspname::text,
       EXISTS (SELECT 1 FROM pg_extension e WHERE e.extnamespace = n.oid
                  AND e.extowner NOT IN (SELECT oid FROM ours)
                  AND NOT (SELECT rolsuper FROM me))::text, '', ''
  FROM pg_namespace n)
SELECT concat_ws(chr(31), encode(convert_to(kind, 'UTF8'), 'hex'), encode(convert_to(a, 'UTF8'), 'hex'),
       encode(convert_to(b, 'UTF8'), 'hex'), encode(convert_to(c, 'UTF8'), 'hex'),
       encode(convert_to(d, 'UTF8'), 'hex')) FROM f;
"#
    )
}

fn unhex(s: &str) -> String {
    let bytes: Vec<u8> = (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Target {
    pub(crate) fn parse(answer: &str) -> Self {
        let mut t = Target::default();
        for line in answer.lines() {
            let f: Vec<String> = line.trim().split('\x1f').map(unhex).collect();
            let [kind, a, b, c, d] = f.as_slice() else {
                continue;
            };
            match kind.as_str() {
                "super" => {
                    t.superuser = a == "true";
                    t.current_user = b.clone();
                }
                "installed" => {
                    t.installed.insert(a.clone(), (b == "true", c.clone()));
                }
                "creatable" => {
                    t.creatable.insert(a.clone());
                }
                "member" => {
                    t.members.insert((a.clone(), b.clone(), c.clone()));
                }
                "config" => {
                    t.config
                        .insert((a.clone(), b.clone()), (c.clone(), d == "true"));
                }
                "role" if b == "true" => {
                    t.roles.insert(a.clone(), c == "true" || t.superuser);
                }
                "schema" => {
                    t.schemas.insert(a.clone(), b == "true");
                }
                _ => {}
            }
        }
        t
    }

    fn exists(&self, role: &str) -> bool {
        self.roles.contains_key(role)
    }

    /// Whether the restoring role may act as `role` (become it, give it ownership).
    fn can_act_as(&self, role: &str) -> bool {
        self.superuser || role == self.current_user || self.roles.get(role) == Some(&true)
    }

    /// Extensions installed by another role (the platform's superuser): left as they are.
    fn foreign(&self) -> BTreeSet<&str> {
        if self.superuser {
            return BTreeSet::new();
        }
        self.installed
            .iter()
            .filter(|(_, (ours, _))| !ours)
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

/// The roles a dump names: owners, grantees and grantors.
pub(crate) fn named_roles(entries: &[TocEntry]) -> BTreeSet<String> {
    let mut roles = BTreeSet::new();
    for e in entries {
        if !e.owner.is_empty() {
            roles.insert(e.owner.clone());
        }
        if let Some(u) = mapped_user(e) {
            roles.insert(u);
        }
        if e.desc == "POLICY" {
            if let Some(p) = Policy::parse(&e.defn) {
                roles.extend(p.roles.into_iter().filter(|r| r != "public"));
            }
        }
        if e.desc == "ACL" || e.desc == "DEFAULT ACL" {
            for s in statements(&e.defn) {
                match Acl::parse(s) {
                    Acl::SetAuthorization(r) => {
                        roles.insert(r);
                    }
                    Acl::Grant { grantee, .. } => {
                        if let Some(g) = grantee {
                            roles.insert(g);
                        }
                    }
                    Acl::DefaultFor { role, grantee, .. } => {
                        roles.insert(role);
                        if let Some(g) = grantee {
                            roles.insert(g);
                        }
                    }
                    Acl::ResetAuthorization | Acl::Other => {}
                }
            }
        }
    }
    roles
}

/// What the rewind runs: the use-list for pg_restore, the entries left out (for the log), SQL
/// run before the script and after it (before COMMIT), and what was left out of privileges and
/// owners up front.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub use_list: String,
    pub skipped: Vec<String>,
    pub before: String,
    pub after: String,
    pub report: RestoreReport,
}

/// A problem that stops the rewind before anything is touched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refusal(pub String);

/// The setting the owner blocks append refusals to (transaction-local), read back at the end.
pub(crate) const OWNER_REPORT: &str = "backup_worker.owner_changed";
/// The first field of the lines the rewind's report prints on psql's stdout.
pub(crate) const REPORT_MARK: &str = "backup-worker-report";

/// Kinds pg_restore gives an owner (its `_printTocEntry`).
const OWNED_KINDS: &[&str] = &[
    "AGGREGATE",
    "BLOB",
    "COLLATION",
    "CONVERSION",
    "DOMAIN",
    "FOREIGN DATA WRAPPER",
    "FOREIGN TABLE",
    "FUNCTION",
    "MATERIALIZED VIEW",
    "OPERATOR",
    "OPERATOR CLASS",
    "OPERATOR FAMILY",
    "PROCEDURAL LANGUAGE",
    "PROCEDURE",
    "PUBLICATION",
    "SCHEMA",
    "SEQUENCE",
    "SERVER",
    "STATISTICS",
    "TABLE",
    "TEXT SEARCH CONFIGURATION",
    "TEXT SEARCH DICTIONARY",
    "TYPE",
    "VIEW",
];

/// The dump id of a `pg_restore --list` line, or None for comments.
fn line_id(line: &str) -> Option<i64> {
    let (id, _) = line.split_once(';')?;
    id.trim().parse().ok()
}

/// Plans the rewind. `lines` is `pg_restore --list` (its order is the restore's), `entries` the
/// archive's table of contents.
pub(crate) fn plan(
    lines: &[String],
    entries: &[TocEntry],
    target: &Target,
) -> Result<Plan, Refusal> {
    let by_id: BTreeMap<i64, &TocEntry> = entries.iter().map(|e| (e.id, e)).collect();
    let foreign = target.foreign();
    for e in entries.iter().filter(|e| e.desc == "EXTENSION") {
        let name = e.tag.as_str();
        if target.installed.contains_key(name) || target.creatable.contains(name) {
            continue;
        }
        return Err(Refusal(format!(
            "the backup needs the extension {name:?}, which is not installed in the target \
             database and which its role cannot create; install it (as a superuser) and retry"
        )));
    }
    // Schemas the platform made for its extensions: they stay, and so do their comment and grants.
    let platform_schema = |name: &str| !target.superuser && target.schemas.get(name) == Some(&true);
    let foreign_member = |ns: &str, name: &str| {
        target
            .members
            .iter()
            .any(|(ext, s, t)| foreign.contains(ext.as_str()) && s == ns && t == name)
    };

    let mut plan = Plan::default();
    let mut skipped_ids = BTreeSet::new();
    let mut acls: Vec<&TocEntry> = Vec::new();
    let mut policies: Vec<(&TocEntry, Policy)> = Vec::new();
    let mut restored: Vec<&TocEntry> = Vec::new();
    let mut config_rows = Vec::new();
    for line in lines {
        let Some(e) = line_id(line).and_then(|id| by_id.get(&id).copied()) else {
            plan.use_list.push_str(line);
            plan.use_list.push('\n');
            continue;
        };
        let desc = e.desc.as_str();
        let leave = match desc {
            "EXTENSION" => foreign.contains(e.tag.as_str()),
            "SCHEMA" => platform_schema(&e.tag),
            // A user mapping for a role the target lacks could never be used: listed, left out.
            "USER MAPPING" => match mapped_user(e).filter(|u| !target.exists(u)) {
                Some(u) => {
                    plan.report.skipped_grants.push(format!(
                        "{}: the role {u} does not exist on the target",
                        e.tag.replace('\n', " ")
                    ));
                    true
                }
                None => false,
            },
            "COMMENT" | "ACL" | "SECURITY LABEL" => {
                let present: Vec<&i64> = e.deps.iter().filter(|d| by_id.contains_key(d)).collect();
                if present.is_empty() {
                    // An object the dump does not create (an extension's member, `public`):
                    // applied only when the restoring role acts as its owner.
                    !target.can_act_as(&e.owner)
                        || (e.owner.is_empty() && platform_schema(&e.namespace))
                } else {
                    present.iter().all(|d| skipped_ids.contains(*d))
                }
            }
            "TABLE DATA" | "SEQUENCE SET" if foreign_member(&e.namespace, &e.tag) => {
                match target.config.get(&(e.namespace.clone(), e.tag.clone())) {
                    Some((cond, true)) if desc == "TABLE DATA" => {
                        config_rows.push(format!(
                            "DELETE FROM ONLY {}.{} {cond};\n",
                            ident(&e.namespace),
                            ident(&e.tag)
                        ));
                        false
                    }
                    _ => true,
                }
            }
            _ => false,
        };
        let policy = (desc == "POLICY")
            .then(|| Policy::parse(&e.defn))
            .flatten()
            .filter(|p| p.roles.iter().any(|r| r != "public" && !target.exists(r)));
        if leave {
            skipped_ids.insert(e.id);
            plan.skipped.push(line.clone());
            plan.use_list.push(';');
        } else if let Some(p) = policy {
            // Made by the worker after the script, without the roles the target lacks.
            policies.push((e, p));
            plan.use_list.push(';');
        } else if desc == "ACL" || desc == "DEFAULT ACL" {
            // Applied by the worker after the script, statement by statement.
            acls.push(e);
            plan.use_list.push(';');
        } else {
            restored.push(e);
        }
        plan.use_list.push_str(line);
        plan.use_list.push('\n');
    }
    if !config_rows.is_empty() {
        plan.before
            .push_str("-- Name: the rows of extensions' configuration tables; Type: DELETE\n");
        for d in config_rows {
            plan.before.push_str(&d);
        }
    }
    plan.after
        .push_str(&format!("SET LOCAL {OWNER_REPORT} = '';\n"));
    for (e, p) in policies {
        create_policy(e, &p, target, &mut plan);
    }
    for e in acls {
        apply_acl(e, target, &mut plan);
    }
    for e in restored {
        assign_owner(e, target, &mut plan);
    }
    plan.after.push_str(&format!(
        "COPY (SELECT {}, 'owner_changed', x FROM unnest(string_to_array(current_setting({}, true), chr(30))) AS x WHERE x <> '') TO STDOUT;\n",
        literal(REPORT_MARK),
        literal(OWNER_REPORT)
    ));
    Ok(plan)
}

/// ALTER … OWNER TO for one restored object: up front when the role may not act as the owner
/// (listed), otherwise in a block that lists the server's refusal (the owner lacks CREATE on
/// the schema, …) instead of failing. A lock timeout still fails the rewind.
fn assign_owner(e: &TocEntry, target: &Target, plan: &mut Plan) {
    if e.owner.is_empty()
        || !e.has_drop
        || !OWNED_KINDS.contains(&e.desc.as_str())
        || e.owner == target.current_user
    {
        return;
    }
    let Some(object) = describe(e) else { return };
    let instead = if target.superuser {
        "the connecting role"
    } else {
        target.current_user.as_str()
    };
    if !target.exists(&e.owner) || !target.can_act_as(&e.owner) {
        let why = if target.exists(&e.owner) {
            "the restoring role may not act as it"
        } else {
            "the role does not exist on the target"
        };
        plan.report.owner_changed.push(format!(
            "{object}: owned by {instead} instead of {} ({why})",
            e.owner
        ));
        return;
    }
    let alter = format!("ALTER {object} OWNER TO {}", ident(&e.owner));
    let note = literal(&format!(
        "{object}: owned by {instead} instead of {}: ",
        e.owner
    ));
    let tag = dollar_tag(&alter);
    plan.after.push_str(&format!(
        "-- Name: {object}; Type: OWNER\nDO {tag} BEGIN {alter}; EXCEPTION WHEN insufficient_privilege OR feature_not_supported THEN PERFORM set_config({rep}, current_setting({rep}, true) || chr(30) || {note} || SQLERRM, true); END {tag};\n",
        rep = literal(OWNER_REPORT),
    ));
}

/// The role of a `USER MAPPING <role> SERVER <server>` entry (pg_dump's tag); None for PUBLIC.
fn mapped_user(e: &TocEntry) -> Option<String> {
    if e.desc != "USER MAPPING" {
        return None;
    }
    let (user, _) = e
        .tag
        .strip_prefix("USER MAPPING ")?
        .rsplit_once(" SERVER ")?;
    let user = match user.strip_prefix('"').and_then(|u| u.strip_suffix('"')) {
        Some(q) => q.replace("\"\"", "\""),
        None => user.to_owned(),
    };
    (!user.eq_ignore_ascii_case("public")).then_some(user)
}

/// A policy whose roles do not all exist on the target: made without the missing ones, which
/// it could never apply to (so nothing changes for any role that exists), or — when none is
/// left — left out, since a policy without roles would apply to everyone. Listed either way.
fn create_policy(e: &TocEntry, p: &Policy, target: &Target, plan: &mut Plan) {
    let (present, missing): (Vec<&String>, Vec<&String>) = p
        .roles
        .iter()
        .partition(|r| *r == "public" || target.exists(r));
    // `"name" ON schema."table"` (and its AS/FOR clauses).
    let what = p.text[..p.roles_at.0 - 4]
        .strip_prefix("CREATE POLICY ")
        .unwrap_or(&p.text);
    for r in &missing {
        plan.report.skipped_grants.push(format!(
            "POLICY {what} TO {r}: the role {r} does not exist on the target{}",
            if present.is_empty() {
                " (the policy is left out: it applies to no role there)"
            } else {
                ""
            }
        ));
    }
    if present.is_empty() {
        return;
    }
    let roles: Vec<String> = present
        .iter()
        .map(|r| {
            if *r == "public" {
                "PUBLIC".to_owned()
            } else {
                ident(r)
            }
        })
        .collect();
    plan.after.push_str(&format!(
        "-- Name: {}; Type: POLICY; Schema: {}\n{}{}{};\n",
        e.tag.replace('\n', " "),
        e.namespace,
        &p.text[..p.roles_at.0],
        roles.join(", "),
        p.text[p.roles_at.1..].trim_end().trim_end_matches(';'),
    ));
}

/// `CREATE POLICY name ON table [AS …] [FOR …] TO role[, …] [USING (…)] [WITH CHECK (…)];` as
/// pg_dump writes it: the roles and where their list is.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Policy {
    text: String,
    roles_at: (usize, usize),
    /// Unquoted; `public` (unquoted in the dump) is PUBLIC.
    roles: Vec<String>,
}

impl Policy {
    pub(super) fn parse(defn: &str) -> Option<Policy> {
        let text = statements(defn).first()?.trim().to_owned();
        // Byte offsets of what lies outside double quotes (identifiers) and single quotes.
        let b = text.as_bytes();
        let mut outside = vec![false; b.len()];
        let mut quote: Option<u8> = None;
        for (i, c) in b.iter().enumerate() {
            match quote {
                Some(q) if *c == q => quote = None,
                Some(_) => {}
                None if *c == b'"' || *c == b'\'' => quote = Some(*c),
                None => outside[i] = true,
            }
        }
        let find = |pat: &str, from: usize| {
            (from..b.len().saturating_sub(pat.len() - 1))
                .find(|&i| outside[i] && b[i..].starts_with(pat.as_bytes()))
        };
        let start = find(" TO ", 0)? + 4;
        let end = [" USING (", " WITH CHECK ("]
            .iter()
            .filter_map(|p| find(p, start))
            .min()
            .unwrap_or(text.len());
        let mut roles = Vec::new();
        let mut from = start;
        for i in start..=end {
            if i == end || (outside[i] && b[i] == b',') {
                let r = text[from..i].trim();
                let r = match r.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                    Some(q) => q.replace("\"\"", "\""),
                    None if r.eq_ignore_ascii_case("public") => "public".to_owned(),
                    None => r.to_owned(),
                };
                roles.push(r);
                from = i + 1;
            }
        }
        Some(Policy {
            roles_at: (start, end),
            roles,
            text,
        })
    }
}

/// How `ALTER … OWNER TO` names an entry's object (pg_restore's `_getObjectDescription`, with
/// every identifier quoted).
fn describe(e: &TocEntry) -> Option<String> {
    let kind = match e.desc.as_str() {
        "VIEW" | "SEQUENCE" | "MATERIALIZED VIEW" => "TABLE",
        "BLOB" => return Some(format!("LARGE OBJECT {}", e.tag.trim())),
        k if OWNER_FROM_DROP.contains(&k) => {
            let d = e.drop_stmt.strip_prefix("DROP ")?;
            return Some(d.trim_end_matches(['\n', ';']).to_owned());
        }
        k => k,
    };
    Some(if e.namespace.is_empty() {
        format!("{kind} {}", ident(&e.tag))
    } else {
        format!("{kind} {}.{}", ident(&e.namespace), ident(&e.tag))
    })
}

/// One ACL or DEFAULT ACL entry, statement by statement: grants to roles that do not exist, and
/// grants made by (or default privileges of) roles the restoring role cannot act as, are left
/// out and listed; a grantor it can act as is become with SET ROLE (SET SESSION AUTHORIZATION
/// is for superusers).
fn apply_acl(e: &TocEntry, target: &Target, plan: &mut Plan) {
    plan.after.push_str(&format!(
        "-- Name: {}; Type: {}; Schema: {}\n",
        e.tag.replace('\n', " "),
        e.desc,
        if e.namespace.is_empty() {
            "-"
        } else {
            &e.namespace
        }
    ));
    // Some(grantor) while a grantor's block is left out.
    let mut blocked: Option<String> = None;
    let mut became = false;
    for s in statements(&e.defn) {
        let text = s.trim();
        match Acl::parse(s) {
            Acl::SetAuthorization(role) => {
                if target.superuser {
                    plan.after.push_str(&format!("{text};\n"));
                } else if role == target.current_user {
                } else if target.exists(&role) && target.can_act_as(&role) {
                    plan.after
                        .push_str(&format!("SET ROLE {};\n", ident(&role)));
                    became = true;
                } else {
                    blocked = Some(role);
                }
            }
            Acl::ResetAuthorization => {
                if target.superuser {
                    plan.after.push_str(&format!("{text};\n"));
                } else if became {
                    plan.after.push_str("RESET ROLE;\n");
                }
                became = false;
                blocked = None;
            }
            Acl::Grant { grant, grantee } => {
                let missing = grantee.as_ref().filter(|g| !target.exists(g));
                if let Some(grantor) = &blocked {
                    if grant {
                        plan.report.skipped_grants.push(format!(
                            "{text}: granted by {grantor}, whom the restoring role may not act as"
                        ));
                    }
                } else if let Some(g) = missing {
                    // A revoke from a role that does not exist has nothing to take away.
                    if grant {
                        plan.report
                            .skipped_grants
                            .push(format!("{text}: the role {g} does not exist on the target"));
                    }
                } else {
                    plan.after.push_str(&format!("{text};\n"));
                }
            }
            Acl::DefaultFor {
                role,
                grant,
                grantee,
            } => {
                let missing = grantee.as_ref().filter(|g| !target.exists(g));
                if !target.exists(&role) || !target.can_act_as(&role) {
                    if grant {
                        plan.report.skipped_grants.push(format!(
                            "{text}: the restoring role may not set default privileges for {role}"
                        ));
                    }
                } else if let Some(g) = missing {
                    if grant {
                        plan.report
                            .skipped_grants
                            .push(format!("{text}: the role {g} does not exist on the target"));
                    }
                } else {
                    plan.after.push_str(&format!("{text};\n"));
                }
            }
            Acl::Other => plan.after.push_str(&format!("{text};\n")),
        }
    }
    if became {
        plan.after.push_str("RESET ROLE;\n");
    }
}

/// One statement of an ACL entry, as pg_dump writes them.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Acl {
    SetAuthorization(String),
    ResetAuthorization,
    /// GRANT … TO / REVOKE … FROM; grantee None for PUBLIC.
    Grant {
        grant: bool,
        grantee: Option<String>,
    },
    /// ALTER DEFAULT PRIVILEGES FOR ROLE r … GRANT … TO / REVOKE … FROM.
    DefaultFor {
        role: String,
        grant: bool,
        grantee: Option<String>,
    },
    Other,
}

impl Acl {
    pub(super) fn parse(stmt: &str) -> Acl {
        let t = tokens(stmt);
        let kw = |i: usize, w: &str| {
            t.get(i)
                .is_some_and(|(s, quoted)| !quoted && s.eq_ignore_ascii_case(w))
        };
        let name = |i: usize| t.get(i).map(|(s, _)| s.clone());
        // The grantee follows the last unquoted TO or FROM; PUBLIC unquoted is everyone.
        let grantee = |word: &str| {
            let at = (0..t.len()).rev().find(|&i| kw(i, word))?;
            let (g, quoted) = t.get(at + 1)?;
            Some(
                (!quoted && g.eq_ignore_ascii_case("PUBLIC"))
                    .then_some(())
                    .map_or_else(|| Some(g.clone()), |()| None),
            )
        };
        if kw(0, "SET") && kw(1, "SESSION") && kw(2, "AUTHORIZATION") {
            return name(3).map_or(Acl::Other, Acl::SetAuthorization);
        }
        if kw(0, "RESET") && kw(1, "SESSION") && kw(2, "AUTHORIZATION") {
            return Acl::ResetAuthorization;
        }
        if kw(0, "GRANT") {
            return grantee("TO").map_or(Acl::Other, |grantee| Acl::Grant {
                grant: true,
                grantee,
            });
        }
        if kw(0, "REVOKE") {
            return grantee("FROM").map_or(Acl::Other, |grantee| Acl::Grant {
                grant: false,
                grantee,
            });
        }
        if kw(0, "ALTER") && kw(1, "DEFAULT") && kw(2, "PRIVILEGES") && kw(3, "FOR") {
            let Some(role) = name(5) else {
                return Acl::Other;
            };
            let grant = (0..t.len()).any(|i| kw(i, "GRANT"));
            let g = if grant {
                grantee("TO")
            } else {
                grantee("FROM")
            };
            return g.map_or(Acl::Other, |grantee| Acl::DefaultFor {
                role,
                grant,
                grantee,
            });
        }
        Acl::Other
    }
}

/// Words of a statement: (text, quoted). Quoted identifiers are unescaped; punctuation is left
/// out (it never holds a role name).
pub(super) fn tokens(stmt: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut chars = stmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            let mut s = String::new();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        s.push('"');
                    } else {
                        break;
                    }
                } else {
                    s.push(c);
                }
            }
            out.push((s, true));
        } else if c == '\'' {
            // A literal (never in an ACL statement's role positions): skipped whole.
            while let Some(c) = chars.next() {
                if c == '\'' {
                    if chars.peek() == Some(&'\'') {
                        chars.next();
                    } else {
                        break;
                    }
                }
            }
            out.push((String::new(), true));
        } else if c.is_alphanumeric() || c == '_' || c == '$' {
            let mut s = String::from(c);
            while let Some(&c) = chars.peek() {
                if c.is_alphanumeric() || c == '_' || c == '$' {
                    s.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push((s, false));
        }
    }
    out
}

/// SQL text split into statements at semicolons outside quotes and comments.
pub(super) fn statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quote, mut comment) = (0, None::<u8>, false);
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if comment {
            if c == b'\n' {
                comment = false;
                start = i + 1;
            }
        } else if let Some(q) = quote {
            if c == q {
                quote = None;
            }
        } else if c == b'"' || c == b'\'' {
            quote = Some(c);
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') && sql[start..i].trim().is_empty() {
            comment = true;
        } else if c == b';' {
            if !sql[start..i].trim().is_empty() {
                out.push(&sql[start..i]);
            }
            start = i + 1;
        }
        i += 1;
    }
    if !comment && !sql[start..].trim().is_empty() {
        out.push(&sql[start..]);
    }
    out
}

/// A quoted identifier (always quoted: valid whatever the name).
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal (standard_conforming_strings is on in the script).
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A dollar-quote tag the body does not contain.
fn dollar_tag(body: &str) -> String {
    let mut tag = "$backup_worker$".to_owned();
    let mut n = 0;
    while body.contains(&tag) {
        n += 1;
        tag = format!("$backup_worker_{n}$");
    }
    tag
}

/// The report lines psql printed (`<mark>\t<kind>\t<item>`, COPY text format).
pub(crate) fn read_report(stdout_line: &str, report: &mut RestoreReport) {
    let mut f = stdout_line.splitn(3, '\t');
    if f.next() != Some(REPORT_MARK) {
        return;
    }
    let (Some(kind), Some(item)) = (f.next(), f.next()) else {
        return;
    };
    let item = copy_unescape(item);
    match kind {
        "owner_changed" => report.owner_changed.push(item),
        "skipped_grants" => report.skipped_grants.push(item),
        _ => {}
    }
}

/// Undoes COPY's text-format escapes.
fn copy_unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            let c = b[i + 1];
            i += 2;
            match c {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'v' => out.push(11),
                b'0'..=b'7' => {
                    let mut v = u32::from(c - b'0');
                    let mut k = 0;
                    while k < 2 && i < b.len() && (b'0'..=b'7').contains(&b[i]) {
                        v = v * 8 + u32::from(b[i] - b'0');
                        i += 1;
                        k += 1;
                    }
                    out.push(v as u8);
                }
                other => out.push(other),
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: i64, desc: &str, ns: &str, tag: &str, owner: &str) -> TocEntry {
        TocEntry {
            id,
            desc: desc.into(),
            tag: tag.into(),
            namespace: ns.into(),
            owner: owner.into(),
            has_drop: !matches!(desc, "ACL" | "COMMENT" | "TABLE DATA" | "DEFAULT ACL"),
            ..TocEntry::default()
        }
    }

    fn acl(id: i64, dep: i64, ns: &str, tag: &str, owner: &str, defn: &str) -> TocEntry {
        TocEntry {
            deps: vec![dep],
            defn: defn.into(),
            ..entry(id, "ACL", ns, tag, owner)
        }
    }

    fn tenant() -> Target {
        let mut t = Target {
            current_user: "owner".into(),
            ..Target::default()
        };
        t.installed
            .insert("pg_partman".into(), (false, "partman".into()));
        t.installed.insert("citext".into(), (true, "public".into()));
        t.schemas.insert("partman".into(), true);
        t.schemas.insert("public".into(), false);
        t.members
            .insert(("pg_partman".into(), "partman".into(), "part_config".into()));
        t.members
            .insert(("pg_partman".into(), "partman".into(), "table_privs".into()));
        t.config.insert(
            ("partman".into(), "part_config".into()),
            (String::new(), true),
        );
        t.config.insert(
            ("partman".into(), "table_privs".into()),
            (String::new(), false),
        );
        for (r, act) in [
            ("owner", true),
            ("app", true),
            ("ro", false),
            ("postgres", false),
        ] {
            t.roles.insert(r.into(), act);
        }
        t
    }

    fn fixture() -> (Vec<String>, Vec<TocEntry>) {
        let entries = vec![
            entry(1, "SCHEMA", "", "app", "owner"),
            entry(2, "SCHEMA", "", "partman", "postgres"),
            acl(3, 2, "", "SCHEMA partman", "postgres", "GRANT ALL ON SCHEMA partman TO owner;\n"),
            entry(4, "EXTENSION", "", "pg_partman", ""),
            TocEntry { deps: vec![4], ..entry(5, "COMMENT", "", "EXTENSION pg_partman", "") },
            entry(6, "TABLE", "app", "my table", "app"),
            acl(7, 6, "app", "TABLE \"my table\"", "app",
                "GRANT SELECT ON TABLE app.\"my table\" TO ro;\nGRANT SELECT(id) ON TABLE app.\"my table\" TO ghost;\nREVOKE ALL ON TABLE app.\"my table\" FROM gone;\nSET SESSION AUTHORIZATION ro;\nGRANT SELECT ON TABLE app.\"my table\" TO app;\nRESET SESSION AUTHORIZATION;\n"),
            entry(8, "TABLE", "app", "theirs", "auditor"),
            acl(9, 0, "partman", "TABLE part_config", "postgres", "GRANT ALL ON TABLE partman.part_config TO owner;\n"),
            entry(10, "TABLE DATA", "partman", "part_config", "postgres"),
            entry(11, "TABLE DATA", "partman", "table_privs", "postgres"),
            TocEntry {
                defn: "ALTER DEFAULT PRIVILEGES FOR ROLE app IN SCHEMA app GRANT SELECT ON TABLES  TO ro;\nALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA app GRANT SELECT ON TABLES  TO ro;\n".into(),
                ..entry(12, "DEFAULT ACL", "app", "DEFAULT PRIVILEGES FOR TABLES", "app")
            },
            acl(13, 0, "", "SCHEMA public", "pg_database_owner", "GRANT USAGE ON SCHEMA public TO ro;\n"),
            TocEntry {
                drop_stmt: "DROP FUNCTION app.f(x integer);\n".into(),
                ..entry(14, "FUNCTION", "app", "f(x integer)", "app")
            },
        ];
        let lines = entries
            .iter()
            .map(|e| {
                format!(
                    "{}; 0 0 {} {} {} {}",
                    e.id, e.desc, e.namespace, e.tag, e.owner
                )
            })
            .chain([";".to_owned()])
            .collect();
        (lines, entries)
    }

    fn left_out(p: &Plan) -> Vec<i64> {
        p.use_list
            .lines()
            .filter_map(|l| l.strip_prefix(';'))
            .filter_map(line_id)
            .collect()
    }

    #[test]
    fn policies_and_user_mappings_lose_the_roles_the_target_lacks() {
        let policy = |id: i64, defn: &str| TocEntry {
            deps: vec![6],
            defn: defn.into(),
            ..entry(id, "POLICY", "app", "my table p", "app")
        };
        let (mut lines, mut entries) = fixture();
        entries.extend([
            policy(20, "CREATE POLICY \"ro, TO all\" ON app.\"my table\" AS RESTRICTIVE FOR SELECT TO ro, ghost, \"a \"\"b\" USING ((note <> ' TO x, y'::text));\n"),
            policy(21, "CREATE POLICY gone ON app.\"my table\" TO ghost WITH CHECK (true);\n"),
            policy(22, "CREATE POLICY fine ON app.\"my table\" TO ro, public USING (true);\n"),
            policy(23, "CREATE POLICY everyone ON app.\"my table\" USING (true);\n"),
        ]);
        lines.extend((20..24).map(|i| format!("{i}; 0 0 POLICY app my table p app")));
        for (id, user) in [(30, "ghost"), (31, "ro"), (32, "public")] {
            entries.push(entry(
                id,
                "USER MAPPING",
                "",
                &format!("USER MAPPING {user} SERVER remote"),
                "app",
            ));
            lines.push(format!(
                "{id}; 0 0 USER MAPPING - USER MAPPING {user} SERVER remote app"
            ));
        }
        let roles = named_roles(&entries);
        assert!(roles.contains("ghost") && roles.contains("a \"b") && !roles.contains("public"));
        let p = plan(&lines, &entries, &tenant()).unwrap();
        let out = left_out(&p);
        assert!(out.contains(&20) && out.contains(&21), "{out:?}");
        assert!(!out.contains(&22) && !out.contains(&23), "{out:?}");
        assert!(
            out.contains(&30) && !out.contains(&31) && !out.contains(&32),
            "{out:?}"
        );
        assert!(p.report.skipped_grants.contains(
            &"USER MAPPING ghost SERVER remote: the role ghost does not exist on the target"
                .to_owned()
        ));
        assert!(
            p.after.contains("CREATE POLICY \"ro, TO all\" ON app.\"my table\" AS RESTRICTIVE FOR SELECT TO \"ro\" USING ((note <> ' TO x, y'::text));\n"),
            "{}",
            p.after
        );
        assert!(!p.after.contains("CREATE POLICY gone"), "{}", p.after);
        let policies: Vec<&String> = p
            .report
            .skipped_grants
            .iter()
            .filter(|g| g.starts_with("POLICY"))
            .collect();
        assert_eq!(
            policies,
            [
                "POLICY \"ro, TO all\" ON app.\"my table\" AS RESTRICTIVE FOR SELECT TO ghost: the role ghost does not exist on the target",
                "POLICY \"ro, TO all\" ON app.\"my table\" AS RESTRICTIVE FOR SELECT TO a \"b: the role a \"b does not exist on the target",
                "POLICY gone ON app.\"my table\" TO ghost: the role ghost does not exist on the target (the policy is left out: it applies to no role there)",
            ]
        );
    }

    #[test]
    fn platform_objects_stay_and_privileges_and_owners_are_applied_by_the_worker() {
        let (lines, entries) = fixture();
        let mut t = tenant();
        t.roles.insert("pg_database_owner".into(), true);
        let p = plan(&lines, &entries, &t).unwrap();
        // Left out of pg_restore: the platform's schema, its grants, the foreign extension and
        // its comment, a member's grants, a config table the role may not write; every ACL.
        assert_eq!(left_out(&p), [2, 3, 4, 5, 7, 9, 11, 12, 13]);
        assert_eq!(p.skipped.len(), 6, "{:?}", p.skipped);
        assert_eq!(p.use_list.lines().count(), lines.len());
        assert!(
            p.before
                .contains("DELETE FROM ONLY \"partman\".\"part_config\" ;"),
            "{}",
            p.before
        );
        assert!(!p.before.contains("table_privs"));
        let after = &p.after;
        assert!(
            after.contains("GRANT SELECT ON TABLE app.\"my table\" TO ro;\n"),
            "{after}"
        );
        assert!(
            !after.contains("TO ghost") && !after.contains("FROM gone"),
            "{after}"
        );
        assert!(after.contains("GRANT USAGE ON SCHEMA public TO ro;"));
        assert!(after.contains(
            "ALTER DEFAULT PRIVILEGES FOR ROLE app IN SCHEMA app GRANT SELECT ON TABLES  TO ro;"
        ));
        assert!(!after.contains("FOR ROLE postgres"));
        assert!(!after.contains("partman"), "{after}");
        assert!(
            after.contains("ALTER TABLE \"app\".\"my table\" OWNER TO \"app\""),
            "{after}"
        );
        assert!(
            after.contains("ALTER FUNCTION app.f(x integer) OWNER TO \"app\""),
            "{after}"
        );
        assert!(
            !after.contains("ALTER SCHEMA \"app\""),
            "app's schema is the role's own"
        );
        assert_eq!(
            p.report.skipped_grants,
            [
                "GRANT SELECT(id) ON TABLE app.\"my table\" TO ghost: the role ghost does not exist on the target",
                "GRANT SELECT ON TABLE app.\"my table\" TO app: granted by ro, whom the restoring role may not act as",
                "ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA app GRANT SELECT ON TABLES  TO ro: the restoring role may not set default privileges for postgres",
            ]
        );
        assert_eq!(
            p.report.owner_changed,
            ["TABLE \"app\".\"theirs\": owned by owner instead of auditor (the role does not exist on the target)"]
        );
        assert!(after.trim_end().ends_with("TO STDOUT;"));
    }

    #[test]
    fn a_superuser_applies_everything() {
        let (lines, entries) = fixture();
        let mut t = tenant();
        t.superuser = true;
        t.current_user = "postgres".into();
        let p = plan(&lines, &entries, &t).unwrap();
        assert_eq!(
            left_out(&p),
            [3, 7, 9, 12, 13],
            "only the ACLs, applied afterwards"
        );
        assert!(p.after.contains("GRANT ALL ON SCHEMA partman TO owner;"));
        assert!(p.after.contains("SET SESSION AUTHORIZATION ro;\nGRANT SELECT ON TABLE app.\"my table\" TO app;\nRESET SESSION AUTHORIZATION;"), "{}", p.after);
        assert!(!p.after.contains("OWNER TO \"postgres\""));
    }

    #[test]
    fn a_missing_extension_the_role_cannot_create_is_refused_by_name() {
        let (lines, mut entries) = fixture();
        entries.push(entry(99, "EXTENSION", "", "postgis", ""));
        let err = plan(&lines, &entries, &tenant()).unwrap_err();
        assert!(err.0.contains("\"postgis\""), "{err}");
        let mut t = tenant();
        t.creatable.insert("postgis".into());
        assert!(plan(&lines, &entries, &t).is_ok());
    }

    #[test]
    fn acl_statements_parse() {
        assert_eq!(
            Acl::parse(
                "GRANT SELECT(\"to\") ON TABLE app.\"TO x\" TO \"Read Only\" WITH GRANT OPTION"
            ),
            Acl::Grant {
                grant: true,
                grantee: Some("Read Only".into())
            }
        );
        assert_eq!(
            Acl::parse("REVOKE ALL ON FUNCTION public.f() FROM PUBLIC"),
            Acl::Grant {
                grant: false,
                grantee: None
            }
        );
        assert_eq!(
            Acl::parse("GRANT USAGE ON SCHEMA s TO \"public\""),
            Acl::Grant {
                grant: true,
                grantee: Some("public".into())
            }
        );
        assert_eq!(
            Acl::parse("SET SESSION AUTHORIZATION \"a b\""),
            Acl::SetAuthorization("a b".into())
        );
        assert_eq!(
            Acl::parse("ALTER DEFAULT PRIVILEGES FOR ROLE app REVOKE ALL ON FUNCTIONS FROM PUBLIC"),
            Acl::DefaultFor {
                role: "app".into(),
                grant: false,
                grantee: None
            }
        );
        assert_eq!(
            statements("GRANT a ON TABLE \"x;y\" TO r;\n-- c;\nREVOKE b ON TABLE t FROM s;\n"),
            [
                "GRANT a ON TABLE \"x;y\" TO r",
                "REVOKE b ON TABLE t FROM s"
            ]
        );
    }

    #[test]
    fn probe_answers_and_report_lines_parse() {
        let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
        let rec = |f: [&str; 5]| f.map(hex).join("\x1f");
        let answer = [
            rec(["super", "false", "owner", "", ""]),
            rec(["installed", "postgis", "false", "public", ""]),
            rec([
                "config",
                "public",
                "spatial_ref_sys",
                "WHERE NOT (\nsrid = 1)",
                "true",
            ]),
            rec(["role", "my role", "true", "false", ""]),
            rec(["role", "ghost", "false", "false", ""]),
            rec(["schema", "partman", "true", "", ""]),
        ]
        .join("\n");
        let t = Target::parse(&answer);
        assert_eq!(t.current_user, "owner");
        assert_eq!(t.installed["postgis"], (false, "public".into()));
        assert_eq!(
            t.config[&("public".into(), "spatial_ref_sys".into())].0,
            "WHERE NOT (\nsrid = 1)"
        );
        assert!(t.exists("my role") && !t.can_act_as("my role") && !t.exists("ghost"));
        assert!(t.schemas["partman"]);
        let mut r = RestoreReport::default();
        read_report(
            "backup-worker-report\towner_changed\tTABLE \"a\\tb\": x\\\\y",
            &mut r,
        );
        read_report(" set_config ", &mut r);
        assert_eq!(r.owner_changed, ["TABLE \"a\tb\": x\\y"]);
        assert!(probe_sql(&["it's".to_owned()].into()).contains("('it''s')"));
    }
}
