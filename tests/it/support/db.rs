//! Databases and roles: each test's own database, owned by a plain LOGIN role; LOGIN roles
//! for the attacks of the privacy suite; the DBA's part done with `DATABASE_URL`'s superuser.

use std::process::Command;

use sqlx::PgPool;

use super::{required_env, unique_name};

/// The role that owns every test database and runs `loader migrate` in it: a LOGIN role that
/// is not a superuser and may not create roles (the two loader roles are created beforehand,
/// as a DBA would), as docs/security.md recommends for production.
pub const OWNER: &str = "loader_test_owner";

/// A database of this test's own, owned by [`OWNER`]; dropped (with its connections) when the
/// value is dropped.
pub struct TestDb {
    pub name: String,
    /// Logs in as [`OWNER`]: what `loader` is given as `DATABASE_URL`.
    pub url: String,
    /// Connected as [`OWNER`].
    pub pool: PgPool,
    /// `DATABASE_URL`'s superuser, connected to this database: for what only a DBA may do
    /// (creating login roles, schemas for other roles).
    pub admin: PgPool,
    admin_url: String,
}

impl TestDb {
    /// A new, empty database.
    pub async fn empty() -> Self {
        Self::empty_owned_by(OWNER).await
    }

    /// A new, empty database owned by `owner`, a LOGIN role the caller created (not a
    /// superuser either); `pool` and `url` log in as it.
    pub async fn empty_owned_by(owner: &str) -> Self {
        let server_admin_url = required_env("DATABASE_URL");
        let name = unique_name("loader_test");
        let admin = PgPool::connect(&server_admin_url).await.expect("connecting with DATABASE_URL");
        create_loader_roles(&admin).await;
        sqlx::raw_sql(&format!("create database {name} owner {owner}"))
            .execute(&admin)
            .await
            .expect("creating the test database");
        admin.close().await;
        let admin_url = match server_admin_url.rsplit_once('/') {
            Some((server, _db)) => format!("{server}/{name}"),
            None => panic!("DATABASE_URL has no database path"),
        };
        let url = url_as(&admin_url, owner);
        let pool =
            PgPool::connect(&url).await.expect("connecting to the test database as its owner");
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy(&admin_url)
            .expect("admin URL");
        Self { name, url, pool, admin, admin_url }
    }

    /// A new database with `loader migrate` applied (by the owner).
    pub async fn migrated() -> Self {
        let db = Self::empty().await;
        loader::db::migrate(&db.pool).await.expect("migrating the test database");
        db
    }

    /// The `loader` binary pointed at this database (and a queue no command here reads).
    pub fn cli(&self) -> super::Cli {
        super::Cli::new(&self.url, "unused")
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.expect(sql)
    }

    /// Rows in `loader.raw_logins`.
    pub async fn staged(&self) -> i64 {
        self.count("select count(*) from loader.raw_logins").await
    }

    /// Rows in `public.user_logins`.
    pub async fn loaded(&self) -> i64 {
        self.count("select count(*) from public.user_logins").await
    }

    /// Rows in `loader.login_rejects`.
    pub async fn rejected(&self) -> i64 {
        self.count("select count(*) from loader.login_rejects").await
    }

    /// Rows of `public.user_logins` not masked with the active key.
    pub async fn off_the_active_key(&self) -> i64 {
        self.count(
            "select count(*) from public.user_logins
              where mask_key_id is distinct from (select id from loader.mask_keys where retired_at is null)",
        )
        .await
    }

    /// Rows in the transform's work list.
    pub async fn pending(&self) -> i64 {
        self.count("select count(*) from loader.transform_queue").await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let server_admin_url = required_env("DATABASE_URL");
        let _ = Command::new("psql")
            .args([
                &server_admin_url,
                "-Xqc",
                &format!("drop database if exists {} with (force)", self.name),
            ])
            .output();
    }
}

/// A `public.user_logins` as the system before loader left it (the seven original columns),
/// with the rows `values` lists (an SQL VALUES list), for migrate to adopt.
pub async fn adopted_user_logins(db: &TestDb, values: &str) {
    sqlx::raw_sql(&format!(
        "create table public.user_logins (
             user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
             masked_device_id varchar(256), locale varchar(32), app_version integer,
             create_date date);
         insert into public.user_logins values {values};"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
}

/// `url` (`scheme://user[:password]@host...`) logging in as `role` instead (trust auth).
pub fn url_as(url: &str, role: &str) -> String {
    let (scheme_user, rest) = url.split_once('@').expect("DATABASE_URL with a user@host");
    let scheme = scheme_user.split("://").next().unwrap();
    format!("{scheme}://{role}@{rest}")
}

/// Creates the two NOLOGIN roles and the [`OWNER`] login when missing, as a DBA would before
/// the first migrate (roles are cluster-wide; tests running at once may race to create them),
/// and lets the owner end the sessions that hold its work up (`pg_signal_backend`, and
/// `pg_read_all_stats` to see how long they have been open; docs/security.md "The
/// owner role").
pub async fn create_loader_roles(admin: &PgPool) {
    let sql = "do $$ begin
        if not exists (select from pg_roles where rolname = 'loader_ingest') then
            create role loader_ingest nologin; end if;
        if not exists (select from pg_roles where rolname = 'loader_analyst') then
            create role loader_analyst nologin; end if;
        if not exists (select from pg_roles where rolname = 'loader_pii_reader') then
            create role loader_pii_reader nologin; end if;
        if not exists (select from pg_roles where rolname = 'loader_test_owner') then
            create role loader_test_owner login nosuperuser nocreaterole nocreatedb; end if;
        if not pg_has_role('loader_test_owner', 'pg_signal_backend', 'member') then
            grant pg_signal_backend to loader_test_owner; end if;
        if not pg_has_role('loader_test_owner', 'pg_read_all_stats', 'member') then
            grant pg_read_all_stats to loader_test_owner; end if;
        if not exists (select from pg_roles where rolname = 'loader_transformer') then
            create role loader_transformer nologin; end if;
    exception when unique_violation or duplicate_object then null; end $$";
    sqlx::raw_sql(sql).execute(admin).await.expect("creating the loader roles");
}

/// A LOGIN role granted `grant` (e.g. loader_analyst; "" for none: it can only connect), with a
/// pool connected as it. The role is
/// dropped with the database's objects when the value is dropped.
pub struct TestRole {
    pub name: String,
    /// The database URL that logs in as this role (for psql).
    pub url: String,
    pub pool: PgPool,
    admin_url: String,
}

impl TestRole {
    pub async fn new(db: &TestDb, grant: &str) -> Self {
        let name = unique_name("login");
        let grant =
            if grant.is_empty() { String::new() } else { format!("grant {grant} to {name};") };
        sqlx::raw_sql(&format!("create role {name} login; {grant}"))
            .execute(&db.admin)
            .await
            .unwrap();
        let url = url_as(&db.url, &name);
        let pool = PgPool::connect(&url).await.expect("login as test role");
        Self { name, url, pool, admin_url: db.admin_url.clone() }
    }

    /// The `loader` binary logged in as this role.
    pub fn cli(&self) -> super::Cli {
        super::Cli::new(&self.url, "unused")
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await, and the pool's connections belong to the
        // test's runtime, which is blocked here. Open sessions do not prevent dropping a role.
        let sql = format!("drop owned by {0}; drop role if exists {0}", self.name);
        let _ = Command::new("psql").args([&self.admin_url, "-Xqc", &sql]).output();
    }
}
