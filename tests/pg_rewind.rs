//! Postgres rewinds of a tenant database as the platform makes them (DESIGN §6, issue 23):
//! superuser-created extensions (pg_partman in a schema of its own, PostGIS, citext, pg_trgm)
//! granted to the tenant's owner role; an application role and a read-only role with grants,
//! column grants, RLS policies to roles, default privileges; a pg_partman-managed table, PostGIS
//! geometry with a GiST index, a trigger, a populated materialized view, identity and generated
//! columns, identifiers with spaces, 100k rows. Back up, damage, rewind in place (through the
//! tenant's role), compare catalogue-level fingerprints; clone into an empty database of the team.
//! Real parts: a private Postgres, pg_dump/pg_restore/psql, the Debian extension packages.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use backup_worker::deps::Deps;
use backup_worker::domain::ResourceType;
use backup_worker::engines::{self, BackupFile, RestoreReport, RestoreTarget};
use backup_worker::loops::restores::Restores;
use backup_worker::loops::Loop;
use backup_worker::process::Tools;
use backup_worker::secret::Secret;
use backup_worker::storage::{LocalStore, ObjectStore};
use backup_worker_testkit::{
    back_up, insert_resource, insert_team, pass_ctx, test_config, test_deps, PgServer,
};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

const OWNER_PW: &str = "tenant-owner-pw-77";

/// What the platform does for a tenant database: roles, the database owned by the tenant's
/// owner role, the extensions (pg_partman in its own schema) and the owner's use of them.
async fn platform_database(pg: &PgServer, db: &str) -> String {
    let mut admin = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    for role in [
        format!("CREATE ROLE tenant_owner LOGIN PASSWORD '{OWNER_PW}'"),
        "CREATE ROLE tenant_app".into(),
        "CREATE ROLE tenant_ro".into(),
        "CREATE ROLE \"tenant auditor\"".into(),
        "GRANT tenant_app TO tenant_owner".into(),
    ] {
        // The roles are the cluster's: a second database of the team finds them there.
        let _ = admin.execute(role.as_str()).await;
    }
    admin
        .execute(format!("CREATE DATABASE {db} OWNER tenant_owner").as_str())
        .await
        .unwrap();
    PgConnection::connect(&pg.url(db))
        .await
        .unwrap()
        .execute(
            "CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman;
             CREATE EXTENSION postgis; CREATE EXTENSION citext; CREATE EXTENSION pg_trgm;
             COMMENT ON SCHEMA partman IS 'the platform''s partition manager';
             GRANT ALL ON SCHEMA partman TO tenant_owner;
             GRANT ALL ON ALL TABLES IN SCHEMA partman TO tenant_owner;
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA partman TO tenant_owner;
             GRANT ALL ON TABLE public.spatial_ref_sys TO tenant_owner;",
        )
        .await
        .unwrap();
    format!(
        "postgres://tenant_owner:{OWNER_PW}@127.0.0.1:{}/{db}",
        pg.port
    )
}

/// The tenant's own objects, made through its owner role (and one by the superuser, owned by a
/// role the owner may not act as).
async fn tenant_objects(pg: &PgServer, db: &str, url: &str) {
    let mut admin = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    let _ = admin.execute("CREATE ROLE tenant_temp").await;
    PgConnection::connect(url)
        .await
        .unwrap()
        .execute(
            r#"
        CREATE SCHEMA app;
        GRANT USAGE ON SCHEMA app TO tenant_app, tenant_ro;
        GRANT CREATE ON SCHEMA app TO tenant_app;
        GRANT USAGE ON SCHEMA public TO tenant_ro;
        CREATE TYPE app.status AS ENUM ('new', 'paid', 'shipped');
        REVOKE USAGE ON TYPE app.status FROM PUBLIC;
        GRANT USAGE ON TYPE app.status TO tenant_app, tenant_ro;
        CREATE TABLE app."order lines" (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            "customer name" citext NOT NULL,
            qty int NOT NULL,
            total int GENERATED ALWAYS AS (qty * 3) STORED,
            status app.status NOT NULL DEFAULT 'new',
            location geometry(Point, 4326),
            note text,
            touched int NOT NULL DEFAULT 0
        );
        COMMENT ON TABLE app."order lines" IS 'one line of an order';
        CREATE INDEX "order lines by place" ON app."order lines" USING gist (location);
        CREATE INDEX "order lines by note" ON app."order lines" USING gin (note gin_trgm_ops);
        INSERT INTO app."order lines" ("customer name", qty, status, location, note)
             SELECT 'Customer ' || (i % 997), i % 50, (ARRAY['new', 'paid', 'shipped'])[1 + i % 3]::app.status,
                    ST_SetSRID(ST_MakePoint((i % 360) - 180, (i % 180) - 90), 4326),
                    'note number ' || i
               FROM generate_series(1, 100000) AS i;
        CREATE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN NEW.touched := OLD.touched + 1; RETURN NEW; END $$;
        REVOKE EXECUTE ON FUNCTION app.touch() FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION app.touch() TO tenant_app;
        CREATE TRIGGER "touch on update" BEFORE UPDATE ON app."order lines"
            FOR EACH ROW EXECUTE FUNCTION app.touch();
        ALTER TABLE app."order lines" ENABLE ROW LEVEL SECURITY;
        CREATE POLICY "read-only sees big orders" ON app."order lines" FOR SELECT TO tenant_ro
            USING (qty > 5);
        CREATE POLICY "app does all" ON app."order lines" TO tenant_app USING (true);
        GRANT SELECT ON app."order lines" TO tenant_ro;
        GRANT UPDATE (note) ON app."order lines" TO tenant_ro;
        GRANT SELECT, INSERT, UPDATE ON app."order lines" TO tenant_app;
        GRANT SELECT ON app."order lines" TO tenant_temp;
        CREATE SEQUENCE app.invoice_no START 1000;
        SELECT setval('app.invoice_no', 1234);
        GRANT USAGE ON SEQUENCE app.invoice_no TO tenant_app;
        CREATE MATERIALIZED VIEW app.totals AS
            SELECT status, count(*) AS n, sum(qty) AS qty FROM app."order lines" GROUP BY status;
        GRANT SELECT ON app.totals TO tenant_ro;
        ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO tenant_ro;
        ALTER DEFAULT PRIVILEGES FOR ROLE tenant_app IN SCHEMA app GRANT SELECT ON TABLES TO tenant_ro;
        SET ROLE tenant_app;
        CREATE TABLE app.cache (k text PRIMARY KEY, v text);
        INSERT INTO app.cache VALUES ('a', '1'), ('b', '2');
        RESET ROLE;
        CREATE TABLE public.measurements (id bigint, at timestamptz NOT NULL, v double precision)
            PARTITION BY RANGE (at);
        SELECT partman.create_parent('public.measurements', 'at', 'native', 'monthly',
                                     p_premake := 2, p_start_partition := '2026-01-01');
        INSERT INTO public.measurements SELECT i, timestamptz '2026-01-01' + i * interval '1 hour', i / 7.0
          FROM generate_series(1, 2000) AS i;
        INSERT INTO public.spatial_ref_sys (srid, auth_name, auth_srid, srtext, proj4text)
             VALUES (990001, 'tenant', 990001, '', '+proj=longlat +datum=WGS84 +no_defs');
        "#,
        )
        .await
        .unwrap();
    // An object of the tenant's database owned by a role its owner may not act as.
    PgConnection::connect(&pg.url(db))
        .await
        .unwrap()
        .execute(
            "CREATE TABLE app.audit (at timestamptz DEFAULT now(), what text);
             INSERT INTO app.audit (what) VALUES ('created');
             ALTER TABLE app.audit OWNER TO \"tenant auditor\";
             GRANT SELECT ON app.audit TO tenant_owner, tenant_ro;",
        )
        .await
        .unwrap();
}

/// Catalogue-level fingerprint of everything the tenant owns and of what the platform made,
/// read as the superuser: ACLs, owners, policies, triggers, sequences, default privileges,
/// partman's config, custom SRIDs, extensions, comments, indexes and rows.
async fn fingerprint(pg: &PgServer, db: &str) -> BTreeMap<String, String> {
    let mut c = PgConnection::connect(&pg.url(db)).await.unwrap();
    let queries: &[(&str, &str)] = &[
        (
            "relations",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s.%s %s owner=%s acl=%s rls=%s', n.nspname, c.relname, c.relkind,
                c.relowner::regrole, coalesce(c.relacl::text, '-'), c.relrowsecurity) AS v
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname IN ('app', 'public', 'partman') AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
            AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                              AND d.objid = c.oid AND d.deptype = 'e')) s"#,
        ),
        (
            "members' acl",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s %s', c.oid::regclass, coalesce(c.relacl::text, '-')) AS v
           FROM pg_class c JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
          WHERE c.relkind = 'r') s"#,
        ),
        (
            "column acl",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s.%s %s', attrelid::regclass, attname, attacl) AS v
           FROM pg_attribute WHERE attacl IS NOT NULL AND attrelid::regclass::text LIKE 'app.%') s"#,
        ),
        (
            "schemas",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s owner=%s acl=%s comment=%s', nspname, nspowner::regrole,
                coalesce(nspacl::text, '-'), coalesce(obj_description(oid, 'pg_namespace'), '-')) AS v
           FROM pg_namespace WHERE nspname !~ '^pg_' AND nspname <> 'information_schema') s"#,
        ),
        (
            "functions",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s owner=%s acl=%s', p.oid::regprocedure, p.proowner::regrole,
                coalesce(p.proacl::text, '-')) AS v
           FROM pg_proc p WHERE p.pronamespace = 'app'::regnamespace) s"#,
        ),
        (
            "types",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s owner=%s acl=%s', t.oid::regtype, t.typowner::regrole,
                coalesce(t.typacl::text, '-')) AS v
           FROM pg_type t WHERE t.typnamespace = 'app'::regnamespace AND t.typtype = 'e') s"#,
        ),
        (
            "default acl",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s %s %s %s', defaclrole::regrole, defaclnamespace::regnamespace,
                defaclobjtype, defaclacl) AS v FROM pg_default_acl) s"#,
        ),
        (
            "policies",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s %s %s %s %s', tablename, policyname, cmd, roles, qual) AS v
           FROM pg_policies) s"#,
        ),
        (
            "triggers",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT pg_get_triggerdef(oid) AS v FROM pg_trigger WHERE NOT tgisinternal) s"#,
        ),
        (
            "indexes",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT indexdef AS v FROM pg_indexes WHERE schemaname = 'app') s"#,
        ),
        (
            "sequences",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s.%s %s', schemaname, sequencename, last_value) AS v
           FROM pg_sequences WHERE schemaname = 'app') s"#,
        ),
        (
            "extensions",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s %s %s %s %s', extname, extowner::regrole, extnamespace::regnamespace,
                extversion, obj_description(oid, 'pg_extension')) AS v FROM pg_extension) s"#,
        ),
        (
            "comments",
            r#"SELECT coalesce(obj_description('app."order lines"'::regclass, 'pg_class'), '-')"#,
        ),
        (
            "partman",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s %s %s %s', parent_table, control, partition_interval, premake) AS v
           FROM partman.part_config) s"#,
        ),
        (
            "custom srids",
            r#"SELECT string_agg(v, E'\n' ORDER BY v) FROM (SELECT format('%s %s', srid, proj4text) AS v FROM public.spatial_ref_sys WHERE srid > 900000) s"#,
        ),
        (
            "srids",
            r#"SELECT count(*)::text FROM public.spatial_ref_sys"#,
        ),
        (
            "order lines",
            r#"SELECT count(*) || ' ' || md5(string_agg(x::text, '|' ORDER BY x.id)) FROM app."order lines" x"#,
        ),
        (
            "measurements",
            r#"SELECT count(*) || ' ' || md5(string_agg(x::text, '|' ORDER BY x.id)) FROM public.measurements x"#,
        ),
        (
            "partitions",
            r#"SELECT string_agg(v, ',' ORDER BY v) FROM (SELECT c.relname::text AS v FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'public.measurements'::regclass) s"#,
        ),
        (
            "totals",
            r#"SELECT (SELECT relispopulated::text FROM pg_class WHERE oid = 'app.totals'::regclass) || ' ' ||
                string_agg(x::text, '|' ORDER BY x.status) FROM app.totals x"#,
        ),
        (
            "cache",
            r#"SELECT string_agg(x::text, '|' ORDER BY x.k) FROM app.cache x"#,
        ),
        ("audit", r#"SELECT string_agg(what, '|') FROM app.audit"#),
    ];
    let mut out = BTreeMap::new();
    for (name, q) in queries {
        let v: Option<String> = sqlx::query_scalar(q)
            .fetch_one(&mut c)
            .await
            .unwrap_or_else(|e| Some(format!("error: {e}")));
        out.insert((*name).to_owned(), v.unwrap_or_else(|| "-".into()));
    }
    out
}

/// What the tenant (and the platform) do to the database after the backup.
async fn damage(pg: &PgServer, db: &str, url: &str) {
    PgConnection::connect(url)
        .await
        .unwrap()
        .execute(
            r#"
        REVOKE SELECT ON app."order lines" FROM tenant_ro;
        REVOKE UPDATE (note) ON app."order lines" FROM tenant_ro;
        GRANT DELETE ON app."order lines" TO tenant_ro;
        DROP POLICY "read-only sees big orders" ON app."order lines";
        DROP TRIGGER "touch on update" ON app."order lines";
        DELETE FROM app."order lines" WHERE id % 10 = 0;
        UPDATE app."order lines" SET note = 'overwritten' WHERE id % 7 = 0;
        SELECT setval('app.invoice_no', 9999);
        SELECT setval(pg_get_serial_sequence('app."order lines"', 'id'), 500000);
        REFRESH MATERIALIZED VIEW app.totals;
        ALTER DEFAULT PRIVILEGES IN SCHEMA app REVOKE SELECT ON TABLES FROM tenant_ro;
        ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO tenant_app;
        GRANT CREATE ON SCHEMA public TO tenant_app;
        CREATE TABLE app."new since" (x int);
        CREATE TABLE public.intruder (x int);
        UPDATE partman.part_config SET premake = 9;
        DELETE FROM public.spatial_ref_sys WHERE srid = 990001;
        INSERT INTO public.spatial_ref_sys (srid, auth_name, auth_srid, srtext, proj4text)
             VALUES (990002, 'tenant', 990002, '', '+proj=longlat');
        DELETE FROM public.measurements WHERE id < 100;
        SET ROLE tenant_app;
        DELETE FROM app.cache;
        "#,
        )
        .await
        .unwrap();
    // The platform drops a role the backup granted to.
    PgConnection::connect(&pg.url(db))
        .await
        .unwrap()
        .execute("REVOKE SELECT ON app.\"order lines\" FROM tenant_temp; DROP ROLE tenant_temp;")
        .await
        .unwrap();
}

/// The fingerprint a rewind through the tenant's role must give: the backup's, less the grant
/// to the role dropped since, with the auditor's table owned by the tenant's owner.
fn expected(before: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut want = before.clone();
    let relations = want["relations"]
        .replace(",tenant_temp=r/tenant_owner", "")
        .lines()
        .map(|l| {
            if l.starts_with("app.audit ") {
                "app.audit r owner=tenant_owner acl={tenant_owner=arwdDxt/tenant_owner,tenant_ro=r/tenant_owner} rls=f".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    want.insert("relations".into(), relations);
    want
}

async fn local_deps(pool: &PgPool) -> (tempfile::TempDir, Deps) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::new(dir.path().to_path_buf()).await.unwrap());
    let d = test_deps(pool.clone(), store, test_config(&[]).unwrap()).unwrap();
    (dir, d)
}

/// The engine's rewind of `url` from a stored backup, as the restores loop calls it.
async fn rewind(
    store: &Path,
    pool: &PgPool,
    backup: Uuid,
    url: &str,
) -> Result<RestoreReport, engines::Failure> {
    let key: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(pool)
        .await
        .unwrap();
    let file = BackupFile {
        path: store.join(key),
        identity: None,
    };
    let temp = tempfile::tempdir().unwrap();
    let url = Secret::new(url.to_owned());
    let tools = Tools::default();
    let target = RestoreTarget {
        tools: &tools,
        url: &url,
        source_url: &url,
        temp: temp.path(),
    };
    engines::restore(ResourceType::Postgres, &target, &file).await
}

#[sqlx::test]
async fn a_platform_made_tenant_database_rewinds_with_its_privileges_owners_and_extension_rows(
    pool: PgPool,
) {
    let pg = PgServer::start().await.unwrap();
    let url = platform_database(&pg, "tenant").await;
    tenant_objects(&pg, "tenant", &url).await;
    let before = fingerprint(&pg, "tenant").await;
    for (k, v) in &before {
        assert!(!v.starts_with("error") && v != "-", "{k}: {v}");
    }
    assert!(
        before["relations"].contains("app.cache r owner=tenant_app"),
        "{before:?}"
    );
    assert!(
        before["partman"].contains("public.measurements"),
        "{before:?}"
    );

    let (dir, d) = local_deps(&pool).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    let backup = back_up(&d, res).await.unwrap();
    damage(&pg, "tenant", &url).await;
    let damaged = fingerprint(&pg, "tenant").await;
    for k in [
        "relations",
        "column acl",
        "policies",
        "triggers",
        "sequences",
        "default acl",
        "partman",
        "custom srids",
        "order lines",
        "totals",
        "cache",
        "schemas",
    ] {
        assert_ne!(damaged[k], before[k], "{k} was damaged");
    }

    let started = std::time::Instant::now();
    let report = rewind(dir.path(), &pool, backup, &url).await.unwrap();
    println!("in-place rewind took {:?}", started.elapsed());
    let after = fingerprint(&pg, "tenant").await;
    let want = expected(&before);
    for k in want.keys() {
        assert_eq!(after[k], want[k], "{k} is the backup's");
    }
    assert_eq!(
        report.skipped_grants,
        ["GRANT SELECT ON TABLE app.\"order lines\" TO tenant_temp: the role tenant_temp does not exist on the target"],
        "{report:?}"
    );
    assert_eq!(
        report.owner_changed,
        ["TABLE \"app\".\"audit\": owned by tenant_owner instead of tenant auditor (the restoring role may not act as it)"],
        "{report:?}"
    );
    // The roles can use what they were granted again: RLS and grants work together.
    let mut c = PgConnection::connect(&pg.url("tenant")).await.unwrap();
    c.execute("SET ROLE tenant_ro").await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM app.\"order lines\"")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(seen, 100_000 - 100_000 / 50 * 6, "the policy's rows");
    c.execute("RESET ROLE").await.unwrap();

    // Rewinding again over the restored database changes nothing (nothing trips on what the
    // first rewind left: the platform's schema, the config rows, the SRIDs).
    let again = rewind(dir.path(), &pool, backup, &url).await.unwrap();
    assert_eq!(again, report);
    assert_eq!(fingerprint(&pg, "tenant").await, after);

    // A clone into an empty database of the team, into which the platform created only the
    // extensions (and partman's schema), through the restores loop.
    let clone_url = platform_database(&pg, "tenant_clone").await;
    let clone = insert_resource(&pool, team, "postgres", &clone_url)
        .await
        .unwrap();
    let id = backup_worker::commands::enqueue_restore(&pool, backup, Some(clone))
        .await
        .unwrap();
    Restores::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    let (status, reason, detail): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT status, failure_reason, internal_detail FROM resource_restores WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(status, "succeeded", "{reason:?} {detail:?}");
    // What the clone could not take as it was is listed, never silent: in internal_detail and
    // in the restore.succeeded audit row.
    let detail = detail.unwrap_or_default();
    assert!(
        detail.contains("skipped grant: GRANT SELECT ON TABLE app.\"order lines\" TO tenant_temp")
            && detail.contains("owner changed: TABLE \"app\".\"audit\""),
        "{detail}"
    );
    let audit: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM audit_log WHERE kind = 'restore.succeeded' AND subject_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        audit["skipped_grants"],
        serde_json::json!(report.skipped_grants),
        "{audit}"
    );
    assert_eq!(
        audit["owner_changed"],
        serde_json::json!(report.owner_changed),
        "{audit}"
    );
    let cloned = fingerprint(&pg, "tenant_clone").await;
    for k in want.keys() {
        assert_eq!(cloned[k], want[k], "the clone's {k} is the backup's");
    }
}

/// Deps whose VERIFY_DATABASE_URL is `verify_url`, over the local store `dir`.
async fn verifier_deps(pool: &PgPool, dir: &Path, verify_url: &str) -> Deps {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.to_path_buf()).await.unwrap());
    test_deps(
        pool.clone(),
        store,
        test_config(&[("VERIFY_DATABASE_URL", verify_url)]).unwrap(),
    )
    .unwrap()
}

/// Exact row counts of the tenant's tables (not the extensions'), read as the superuser: what
/// the verifier must report.
async fn row_counts(url: &str) -> BTreeMap<String, i64> {
    let mut c = PgConnection::connect(url).await.unwrap();
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT n.nspname || '.' || c.relname, format('%I.%I', n.nspname, c.relname)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
            AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                              AND d.objid = c.oid AND d.deptype = 'e')",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    let mut out = BTreeMap::new();
    for (label, q) in tables {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM ONLY {q}"))
            .fetch_one(&mut c)
            .await
            .unwrap();
        out.insert(label, n);
    }
    out
}

/// Scratch databases and roles left on a server.
async fn scratch_leftovers(pg: &PgServer) -> Vec<String> {
    let mut c = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'bw\\_verify\\_%'
          UNION ALL SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'bw\\_verify\\_%'",
    )
    .fetch_all(&mut c)
    .await
    .unwrap()
}

/// A tenant function in a CHECK constraint that tries what only a superuser may: create a
/// superuser role, run a program on the server. Refused, it says nothing (so the tenant's own
/// inserts, as its role, work).
fn sneaky_table(marker: &Path) -> String {
    format!(
        r#"
        CREATE FUNCTION app.sneaky() RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
          BEGIN
            EXECUTE 'CREATE ROLE tenant_escaped SUPERUSER LOGIN';
          EXCEPTION WHEN insufficient_privilege OR duplicate_object THEN NULL;
          END;
          BEGIN
            EXECUTE format('COPY (SELECT 1) TO PROGRAM %L', 'touch {marker}');
          EXCEPTION WHEN insufficient_privilege THEN NULL;
          END;
          RETURN true;
        END $$;
        CREATE TABLE app.guarded (id int PRIMARY KEY, CONSTRAINT "checked by tenant code" CHECK (app.sneaky()));
        INSERT INTO app.guarded SELECT generate_series(1, 3);
        "#,
        marker = marker.display()
    )
}

#[sqlx::test]
async fn the_verifier_replays_the_tenants_restore_as_an_unprivileged_role_twice(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    // The platform's scratch server is its own: none of the tenant's roles exist there.
    let scratch = PgServer::start().await.unwrap();
    let url = platform_database(&pg, "tenant").await;
    tenant_objects(&pg, "tenant", &url).await;
    let marker_dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        // Writable by the server's OS user, so only a refusal keeps the program from running.
        std::fs::set_permissions(marker_dir.path(), std::fs::Permissions::from_mode(0o777))
            .unwrap();
    }
    let marker = marker_dir.path().join("tenant-code-ran-a-program");
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute(sneaky_table(&marker).as_str())
        .await
        .unwrap();
    // A foreign server the tenant made with the platform's postgres_fdw, and a user mapping for
    // its owner role (missing on the scratch server: left out there, and listed).
    PgConnection::connect(&pg.url("tenant"))
        .await
        .unwrap()
        .execute(
            "CREATE EXTENSION postgres_fdw;
             GRANT USAGE ON FOREIGN DATA WRAPPER postgres_fdw TO tenant_owner;",
        )
        .await
        .unwrap();
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute(
            "CREATE SERVER elsewhere FOREIGN DATA WRAPPER postgres_fdw
                 OPTIONS (host 'db.invalid', dbname 'reports');
             CREATE USER MAPPING FOR tenant_owner SERVER elsewhere OPTIONS (user 'reporter');",
        )
        .await
        .unwrap();
    let want = row_counts(&pg.url("tenant")).await;
    assert_eq!(want["app.guarded"], 3);
    assert_eq!(want["app.order lines"], 100_000);

    let dir = tempfile::tempdir().unwrap();
    let d = verifier_deps(&pool, dir.path(), &scratch.url("postgres")).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    let backup = back_up(&d, res).await.unwrap();

    backup_worker::loops::verifier::Verifier::new(d.clone())
        .pass(&pass_ctx())
        .await
        .unwrap();
    let (status, reason, internal, detail): (
        String,
        Option<String>,
        Option<String>,
        serde_json::Value,
    ) = sqlx::query_as(
        "SELECT status, failure_reason, internal_detail, detail FROM backup_verifications
              WHERE backup_id = $1",
    )
    .bind(backup)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(status, "verified", "{reason:?} {internal:?} {detail}");
    assert_eq!(detail["level"], "restore", "{detail}");
    let counted: BTreeMap<String, i64> = serde_json::from_value(detail["tables"].clone()).unwrap();
    assert_eq!(counted, want, "rows per table after the second rewind");
    let rewinds = detail["rewind_seconds"].as_array().unwrap();
    assert_eq!(rewinds.len(), 2, "{detail}");
    assert!(
        rewinds.iter().all(|s| s.as_f64().unwrap() > 0.0),
        "{detail}"
    );

    // The tenant's code ran (its CHECK held every row) with the throwaway role's rights only.
    let mut su = PgConnection::connect(&scratch.url("postgres"))
        .await
        .unwrap();
    let escaped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = 'tenant_escaped'")
            .fetch_one(&mut su)
            .await
            .unwrap();
    assert_eq!(
        escaped, 0,
        "tenant code created a role on the scratch server"
    );
    assert!(
        !marker.exists(),
        "tenant code ran a program on the scratch server"
    );
    assert!(scratch_leftovers(&scratch).await.is_empty());

    // What the old verifier did — restore as the superuser into an empty database — runs the
    // same tenant code with the superuser's rights: the test above can fail.
    let obj: String = sqlx::query_scalar("SELECT object_key FROM resource_backups WHERE id = $1")
        .bind(backup)
        .fetch_one(&pool)
        .await
        .unwrap();
    let old_url = scratch.create_database("old_way").await.unwrap();
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            "gunzip -c \"$OBJ\" | pg_restore --no-owner --no-privileges -d \"$DST\"",
        ])
        .env("OBJ", dir.path().join(&obj))
        .env("DST", &old_url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let escaped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = 'tenant_escaped'")
            .fetch_one(&mut su)
            .await
            .unwrap();
    assert_eq!(
        escaped, 1,
        "as a superuser the tenant's CHECK creates its role: {stderr}"
    );
    assert!(
        marker.exists(),
        "as a superuser the tenant's CHECK runs its program"
    );
}

#[sqlx::test]
async fn a_backup_the_tenants_own_restore_cannot_apply_fails_verification(pool: PgPool) {
    let pg = PgServer::start().await.unwrap();
    let scratch = PgServer::start().await.unwrap();
    let mut admin = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    for sql in [
        "CREATE ROLE shop_owner LOGIN PASSWORD 'shop-pw'",
        "CREATE DATABASE shop OWNER shop_owner",
    ] {
        admin.execute(sql).await.unwrap();
    }
    // The platform's schema, which the tenant may use but not create in — and a table in it
    // the platform made for the tenant and handed over. The tenant's restore drops that table
    // (it is the tenant's) and cannot create it again.
    PgConnection::connect(&pg.url("shop"))
        .await
        .unwrap()
        .execute(
            "CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman;
             GRANT USAGE ON SCHEMA partman TO shop_owner;
             GRANT SELECT ON ALL TABLES IN SCHEMA partman TO shop_owner;
             CREATE TABLE partman.shop_jobs (id int PRIMARY KEY, what text);
             INSERT INTO partman.shop_jobs VALUES (1, 'nightly');
             ALTER TABLE partman.shop_jobs OWNER TO shop_owner;",
        )
        .await
        .unwrap();
    let url = format!("postgres://shop_owner:shop-pw@127.0.0.1:{}/shop", pg.port);
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute("CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders SELECT generate_series(1, 10);")
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let d = verifier_deps(&pool, dir.path(), &scratch.url("postgres")).await;
    let team = insert_team(&pool, "pro").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    let backup = back_up(&d, res).await.unwrap();

    // The customer's restore fails, and leaves the database as it was.
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute("INSERT INTO orders VALUES (11)")
        .await
        .unwrap();
    let failure = rewind(dir.path(), &pool, backup, &url).await.unwrap_err();
    assert_eq!(
        failure.reason,
        backup_worker::domain::FailureReason::Conflict,
        "{}",
        failure.detail
    );
    assert_eq!(row_counts(&pg.url("shop")).await["public.orders"], 11);

    // So does the verification: the backup is at fault, not the scratch server.
    let report = backup_worker::loops::verifier::Verifier::new(d.clone())
        .verify_now(backup)
        .await
        .unwrap();
    assert_eq!(report.status, "failed", "{report:?}");
    assert_eq!(
        report.failure_reason.as_deref(),
        Some("conflict"),
        "{report:?}"
    );
    let internal = report.internal_detail.clone().unwrap_or_default();
    assert!(
        internal.contains("the first rewind")
            && internal.contains("permission denied for schema partman")
            && internal.contains("TABLE partman.shop_jobs"),
        "{internal}"
    );
    assert!(!internal.contains("shop-pw") && !internal.contains(&scratch.password));
    let verify_status: Option<String> =
        sqlx::query_scalar("SELECT verify_status FROM resource_backups WHERE id = $1")
            .bind(backup)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(verify_status.as_deref(), Some("failed"));
    let fresh: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM resource_backups WHERE resource_id = $1 AND status = 'pending'",
    )
    .bind(res)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(fresh, 1, "a fresh backup is enqueued at once");
    assert!(scratch_leftovers(&scratch).await.is_empty());
}

/// A restore to an instant (DESIGN §14) of the platform-made tenant: the base backup replayed in a
/// private server, dumped through the tenant's role and rewound in place, with the same result as
/// the rewind from a dump taken at that instant — privileges, owners, policies, partman's
/// configuration and custom SRIDs included, 100k rows of PostGIS geometry.
#[sqlx::test(migrations = "./migrations")]
async fn a_platform_made_tenant_rewinds_to_an_instant_with_its_privileges_and_extension_rows(
    pool: PgPool,
) {
    use backup_worker::loops::backups::Backups;
    use backup_worker::loops::scheduler::Scheduler;
    use backup_worker::loops::wal::Wal;
    let pg = PgServer::start().await.unwrap();
    let url = platform_database(&pg, "tenant").await;
    tenant_objects(&pg, "tenant", &url).await;
    let mut admin = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    admin
        .execute("CREATE ROLE tenant_repl LOGIN REPLICATION PASSWORD 'repl-pw-3'")
        .await
        .unwrap();
    let repl = format!(
        "postgres://tenant_repl:repl-pw-3@127.0.0.1:{}/postgres",
        pg.port
    );
    let (_dir, d) = local_deps(&pool).await;
    let team = insert_team(&pool, "growth").await.unwrap();
    let res = insert_resource(&pool, team, "postgres", &url)
        .await
        .unwrap();
    sqlx::query("UPDATE resources SET replication_url = $2 WHERE id = $1")
        .bind(res)
        .bind(&repl)
        .execute(&pool)
        .await
        .unwrap();
    let wal = Wal::new(d.clone(), true);
    wal.pass(&pass_ctx()).await.unwrap();
    Scheduler::new(
        pool.clone(),
        d.plans.clone(),
        d.metrics.clone(),
        std::time::Duration::from_secs(60),
    )
    .tick_now()
    .await
    .unwrap();
    Backups::new(d.clone()).pass(&pass_ctx()).await.unwrap();

    // Written after the base backup: only the WAL holds it.
    PgConnection::connect(&url)
        .await
        .unwrap()
        .execute("UPDATE app.\"order lines\" SET note = 'after the base' WHERE id % 11 = 0")
        .await
        .unwrap();
    let before = fingerprint(&pg, "tenant").await;
    let t: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    damage(&pg, "tenant", &url).await;
    wal.pass(&pass_ctx()).await.unwrap();

    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO resource_restores (resource_id, target_time) VALUES ($1, $2) RETURNING id",
    )
    .bind(res)
    .bind(t)
    .fetch_one(&pool)
    .await
    .unwrap();
    Restores::new(d.clone()).pass(&pass_ctx()).await.unwrap();
    let (status, detail): (String, Option<String>) =
        sqlx::query_as("SELECT status, internal_detail FROM resource_restores WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "succeeded", "{detail:?}");
    // The private server still has the role the platform dropped since: the grant to it is
    // left out on the target, listed, as for any rewind.
    let detail = detail.unwrap_or_default();
    assert!(
        detail.contains("skipped grant: GRANT SELECT ON TABLE app.\"order lines\" TO tenant_temp"),
        "{detail}"
    );
    let after = fingerprint(&pg, "tenant").await;
    let want = expected(&before);
    for k in want.keys().filter(|k| *k != "sequences") {
        assert_eq!(after[k], want[k], "{k} is the instant's");
    }
    // Sequences are not transactional (Postgres' own PITR): a setval or nextval of a transaction
    // that commits after the instant is replayed with the WAL before that commit. A sequence may
    // so come back ahead of the instant's value, never behind it for nextval.
    let values = |text: &str| -> BTreeMap<String, i64> {
        text.lines()
            .filter_map(|l| {
                let (name, v) = l.rsplit_once(' ')?;
                Some((name.to_owned(), v.parse().ok()?))
            })
            .collect()
    };
    let (at, back) = (values(&want["sequences"]), values(&after["sequences"]));
    assert_eq!(at.len(), 2, "{at:?}");
    for (name, v) in &at {
        assert!(back[name] >= *v, "{name}: {} < {v}", back[name]);
    }
}
