//! Who may do what: the documented privileges of each role, and a role's privileges as the
//! database has them, in the same form. `loader doctor` compares the two; docs/security.md and
//! docs/sql-api.md are generated from the list; the inventory test holds the database to it.

use anyhow::Result;
use sqlx::PgPool;

/// The privileges of each role, exactly: the one list docs/security.md "Roles" shows (generated
/// by tests/it/docs.rs), `loader doctor` checks and the inventory test holds the database to ([`of`] lists them the same way).
pub const DOCUMENTED: &[(&str, &[&str])] = &[
    ("public", &[]),
    (
        "loader_ingest",
        &[
            "execute loader.finish_run(bigint,text,boolean)",
            "execute loader.heartbeat(bigint,text)",
            "execute loader.record_deletes(bigint,text,bigint,bigint)",
            "execute loader.register_run(text,text,text)",
            "execute loader.stage(bigint,text,text[],text[],boolean[],timestamp with time zone[],integer[],integer[])",
            "usage schema loader",
        ],
    ),
    (
        "loader_analyst",
        &[
            "execute loader.transform(bigint,bigint,bigint,integer,jsonb)",
            "execute loader.transform_batch(integer,boolean)",
            "select loader.ingest_runs(id, started_at, finished_at, queue, mode, received, staged, duplicates, deleted, delete_failures, loader_version, refused, registered_by, stopped_on_error, sent_at_replaced)",
            "select loader.login_rejects",
            "select loader.mask_expiries",
            "select loader.mask_key_info",
            "select loader.pipeline_status",
            "select loader.refusals",
            "select loader.transform_queue",
            "select loader.transform_state",
            "select public.user_logins",
            "usage schema loader",
        ],
    ),
    (
        "loader_transformer",
        &[
            "execute loader.transform(bigint,bigint,bigint,integer,jsonb)",
            "execute loader.transform_batch(integer,boolean)",
            "select loader.pipeline_status",
            "usage schema loader",
        ],
    ),
    (
        "loader_pii_reader",
        &[
            "execute loader._reveal_log(text[],text)",
            "execute loader._reveal_read(bigint)",
            "execute loader.reveal(text[],text,jsonb)",
            "usage schema loader",
        ],
    ),
];

/// The privileges `role` has in schemas loader and public, one line each, sorted: functions it
/// may execute (extension functions excluded), table and column privileges, schema usage or
/// create. The form [`DOCUMENTED`] uses.
pub async fn of(pool: &PgPool, role: &str) -> Result<Vec<String>> {
    Ok(crate::db::transaction(pool, async |tx| {
        sqlx::query_scalar(
            "with rels as (
             select c.oid, c.relname, n.nspname
               from pg_class c join pg_namespace n on n.oid = c.relnamespace
              where n.nspname in ('loader', 'public') and c.relkind in ('r', 'v', 'm', 'p', 'S')
         ), privs(p) as (values ('select'), ('insert'), ('update'), ('delete'), ('truncate'),
                                ('references'), ('trigger'))
         select 'execute ' || p.oid::regprocedure::text
           from pg_proc p
          where p.pronamespace in ('loader'::regnamespace, 'public'::regnamespace)
            and not exists (select from pg_depend d
                             where d.classid = 'pg_proc'::regclass and d.objid = p.oid
                               and d.deptype = 'e')
            and has_function_privilege($1, p.oid, 'execute')
         union all
         select v.p || ' ' || r.nspname || '.' || r.relname
           from rels r cross join privs v
          where has_table_privilege($1, r.oid, v.p)
         union all
         select v.p || ' ' || r.nspname || '.' || r.relname || '('
                || string_agg(a.attname, ', ' order by a.attnum) || ')'
           from rels r cross join (values ('select'), ('insert'), ('update')) v(p)
           join pg_attribute a on a.attrelid = r.oid and a.attnum > 0 and not a.attisdropped
          where not has_table_privilege($1, r.oid, v.p)
            and has_column_privilege($1, r.oid, a.attname, v.p)
          group by v.p, r.nspname, r.relname
         union all
         select 'usage schema ' || n.nspname from pg_namespace n
          where n.nspname = 'loader' and has_schema_privilege($1, n.oid, 'usage')
         union all
         select 'create schema ' || n.nspname from pg_namespace n
          where n.nspname in ('loader', 'public') and has_schema_privilege($1, n.oid, 'create')
         order by 1",
        )
        .bind(role)
        .persistent(false)
        .fetch_all(tx)
        .await
    })
    .await?)
}
