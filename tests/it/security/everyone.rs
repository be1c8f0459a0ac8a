//! What any role that can connect tries (PUBLIC, a stranger with nothing but CONNECT, every
//! lesser role at once): the privileges each role has, exactly; locks, temporary objects and
//! open sessions that would stall the owner's work; a private function called while a migrate
//! runs.

use super::*;

/// A role with nothing but CONNECT took the advisory lock every transform, rebuild,
/// rotation and purge shared; an analyst idling in a transaction that had run one batch blocked
/// every other batch (one hot row) and every rebuild, rotation and purge. Now all of them
/// finish while such sessions sit there, and the idle batch, committed after a rotation, is
/// refused rather than adding rows masked with the retired key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_analysts_and_strangers_stall_nothing() {
    let db = TestDb::migrated().await;
    let fixture = fixture_messages();
    stage(&db, &fixture[..60], SENT).await;
    let stranger = TestRole::new(&db, "").await;
    let analyst = TestRole::new(&db, "loader_analyst").await;

    // The stranger holds the advisory keys loader used to share, the analyst a batch of 10.
    let mut strange = stranger.pool.acquire().await.unwrap();
    sqlx::raw_sql(
        "select pg_advisory_lock(7813570962337693698), pg_advisory_lock(7813570962337693697)",
    )
    .execute(&mut *strange)
    .await
    .unwrap();
    let mut held = analyst.pool.acquire().await.unwrap();
    let hold = "begin; select * from loader.transform_batch(10);
                lock table public.user_logins in access share mode";
    finishes("an analyst's batch", sqlx::raw_sql(hold).execute(&mut *held)).await.unwrap();
    // A second analyst forces the COMMIT-time key check early, to hold the key row while it
    // idles: refused on the spot.
    let mut early = analyst.pool.acquire().await.unwrap();
    finishes(
        "a second analyst's batch",
        sqlx::raw_sql("begin; select * from loader.transform_batch(10)").execute(&mut *early),
    )
    .await
    .unwrap();
    let err =
        sqlx::raw_sql("set constraints all immediate").execute(&mut *early).await.unwrap_err();
    assert_eq!(sqlstate(&err), "55000", "{err}");

    let other_batch: (i64, i64, i64) = finishes("another analyst's batch", async {
        let other = TestRole::new(&db, "loader_analyst").await;
        sqlx::query_as("select * from loader.transform_batch(5)")
            .fetch_one(&other.pool)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(other_batch.0 + other_batch.1, 5, "the batch took rows the idle one had not");
    finishes("call loader.transform()", sqlx::raw_sql("call loader.transform()").execute(&db.pool))
        .await
        .unwrap();
    assert_eq!(db.pending().await, 10, "only the held rows wait");
    finishes("staging", stage(&db, &fixture[60..], SENT)).await;
    // The rebuild and the rotation end the sessions that hold their swap up past the bound
    // (2 s here) rather than wait for them.
    for args in [
        ["--evict-after", "2s", "transform", "--rebuild"],
        ["--evict-after", "2s", "keys", "rotate"],
    ] {
        let cli = db.cli();
        finishes(&args.join(" "), tokio::task::spawn_blocking(move || cli.ok(&args)))
            .await
            .unwrap();
    }
    finishes("purge", sqlx::raw_sql("call loader.purge_staged('1 day')").execute(&db.pool))
        .await
        .unwrap();
    finishes("migrate", loader::db::migrate(&db.pool)).await.unwrap();

    // The idle batch masked with the key the rotation retired: its COMMIT is refused (or its
    // session was ended for holding the swap up), and its rows go back to the work list.
    let err = sqlx::raw_sql("commit").execute(&mut *held).await.unwrap_err();
    assert!(
        matches!(
            err.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("40001") | Some("57P01") | None
        ),
        "{err}"
    );
    // The server reports a failed COMMIT before it has released the batch's row locks; the
    // next statement on that session waits for the release. The early analyst's transaction
    // (aborted by its refused SET CONSTRAINTS) ends too: a pooled connection dropped
    // mid-transaction is rolled back only later, in the background. Until both let go, a
    // transform skips their rows (SKIP LOCKED).
    sqlx::raw_sql("select 1").execute(&mut *held).await.ok();
    sqlx::raw_sql("rollback").execute(&mut *early).await.ok();
    drop((held, early, strange));
    sqlx::raw_sql("call loader.transform()").execute(&db.pool).await.unwrap();
    let outcomes = db
        .count("select (select count(*) from public.user_logins) + (select count(*) from loader.login_rejects)")
        .await;
    let pending = db.pending().await;
    let claimed_by: Vec<String> = sqlx::query_scalar(
        "select format('%s %s %s', a.pid, a.state, left(a.query, 60)) from pg_stat_activity a
          where a.datname = current_database() and a.pid <> pg_backend_pid()",
    )
    .fetch_all(&db.admin)
    .await
    .unwrap();
    assert_eq!(
        outcomes, 100,
        "every staged message has its outcome; pending {pending}, sessions {claimed_by:#?}"
    );
    assert_eq!(db.off_the_active_key().await, 0, "every row is masked with the active key");
}

/// The inventory: exactly the privileges docs/security.md "Roles" lists, for PUBLIC (so any role that
/// can connect) and each loader role. A grant added by mistake fails here.
#[tokio::test]
async fn each_role_has_exactly_the_documented_privileges() {
    let db = TestDb::migrated().await;
    // The list `loader doctor` checks too (docs/security.md "Roles" in prose).
    for (role, documented) in loader::privileges::DOCUMENTED {
        assert_eq!(privileges_of(&db, role).await, *documented, "{role}");
    }
    assert_eq!(
        loader::privileges::DOCUMENTED.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        ["public", "loader_ingest", "loader_analyst", "loader_transformer", "loader_pii_reader"]
    );
    // The transformer reads nothing the transform produces.
    assert!(privileges_of(&db, "loader_transformer").await.iter().all(
        |p| !p.contains("user_logins") && !p.contains("login_rejects") && !p.contains("raw_logins")
    ));
    assert!(privileges_of(&db, "loader_analyst").await.iter().all(|p| !p.contains("raw_logins")));

    // Every security-definer function pins the settings a caller could use to look inside.
    let unpinned: Vec<String> = sqlx::query_scalar(
        "select p.oid::regprocedure::text from pg_proc p
          where p.pronamespace = 'loader'::regnamespace and p.prosecdef
            and not (p.proconfig @> array['search_path=pg_catalog, pg_temp',
                     'debug_print_parse=off', 'debug_print_rewritten=off', 'debug_print_plan=off',
                     'client_min_messages=warning', 'log_parameter_max_length_on_error=0'])",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(unpinned, Vec::<String>::new(), "definer functions without pinned settings");
}

/// A role with nothing but CONNECT made a temporary table with a
/// column of user_logins' row type, so the swap could not drop the old table; the rotation
/// stayed copying and, while it did, every purge was refused. An analyst's temporary view on
/// user_logins made rotations refuse to start, and a temporary table of the copy's row type
/// made rebuild_abandon fail. Now temporary objects stop nothing: the rotation and the rebuild
/// start and finish, the purge runs even while one copies, the copies cannot be named by
/// anyone else, and the sessions that kept their temporary objects on the old tables are ended
/// (their objects go with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_objects_of_lesser_roles_stop_no_rotation_rebuild_or_purge() {
    let db = TestDb::migrated().await;
    loaded(&db, 500).await;
    let stranger = TestRole::new(&db, "").await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    // Idle, outside a transaction: only the objects hold on.
    let mut _column = session(&stranger, "create temp table t (x public.user_logins)").await;
    let _view = session(&analyst, "create temp view v as select * from public.user_logins").await;
    // Temporary only through what it depends on: a cast from the row type to a temporary type.
    let _cast = session(
        &stranger,
        "create type pg_temp.tt as (a int); create cast (public.user_logins as pg_temp.tt) with inout",
    )
    .await;
    // In a transaction that used its temporary table: the drop must wait for it, then end it.
    let _holding =
        session(&analyst, "create temp table t3 (x public.user_logins); begin; select * from t3")
            .await;

    let out = loader_within(&db, &["--evict-after", "2s", "keys", "rotate"], "the rotation").await;
    assert!(out.contains("active"), "{out}");
    assert!(all_on_the_active_key(&db).await, "every row on the new key");
    assert!(out.contains("terminated session") && out.contains(&analyst.name), "{out}");
    let retired = db.count("select count(*) from pg_class where relname ~ '_retired_r[0-9]+$'");
    assert_eq!(retired.await, 0, "the retired tables are gone, with the objects on them");
    loader_within(&db, &["--evict-after", "2s", "transform", "--rebuild"], "a rebuild").await;

    // During a copy: the copies cannot be named by a lesser role, abandoning works, and the
    // purge purges what the copy no longer needs.
    let ranges: i64 = sqlx::query_scalar(
        "select ranges from loader.rebuild_start(rotate => true, range_rows => 100)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(ranges, 5);
    sqlx::query_scalar::<_, Option<i64>>("select loader.rebuild_copy_range()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for sql in [
        "create temp table t2 (x loader_rebuild.user_logins_next)",
        "create temp view v2 as select * from loader_rebuild.user_logins_next",
    ] {
        let err = sqlx::raw_sql(sql).execute(&analyst.pool).await.expect_err(sql);
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
    }
    let (purged,): (i64,) = finishes("the purge while a copy runs", async {
        sqlx::query_as("call loader.purge_staged('0')").fetch_one(&db.pool).await.unwrap()
    })
    .await;
    assert_eq!(purged, 100, "the copied range is purged, the four left to copy are not");
    let abandoned: Option<i64> =
        sqlx::query_scalar("select loader.rebuild_abandon()").fetch_one(&db.pool).await.unwrap();
    assert!(abandoned.is_some());
    finishes("the purge after", sqlx::raw_sql("call loader.purge_staged('0')").execute(&db.pool))
        .await
        .unwrap();
    assert_eq!(db.count("select count(*) from loader.raw_logins where purged_at is null").await, 0);
    // The CONNECT-only role idled outside a transaction: its session stays, its column went.
    assert!(has_session(&db, &stranger).await, "the stranger's session was not ended");
    let columns: i64 = sqlx::query_scalar(
        "select count(*) from pg_attribute where attrelid = 'pg_temp.t'::regclass and attnum > 0 and not attisdropped",
    )
    .fetch_one(&mut _column)
    .await
    .unwrap();
    assert_eq!(columns, 0, "its column of the old table's row type was dropped with that table");
}

/// Between the commit that created a security-definer function and the one that
/// revoked PUBLIC's EXECUTE, any role could call it (install its own key) or wire it into a
/// trigger of its own. Hammered from two analyst sessions while a fresh migrate runs, no
/// private function is ever callable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_private_function_is_callable_while_a_fresh_migrate_runs() {
    let db = TestDb::empty().await;
    let attacker = TestRole::new(&db, "loader_analyst").await;
    // A schema of its own, so it can create a table to hang a trigger on.
    sqlx::raw_sql(&format!("create schema {0} authorization {0}", attacker.name))
        .execute(&db.admin)
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let tries = Arc::new(AtomicU64::new(0));
    let mut hammers = Vec::new();
    for worker in 0..2 {
        let (pool, schema) = (attacker.pool.clone(), attacker.name.clone());
        let (stop, tries) = (stop.clone(), tries.clone());
        hammers.push(tokio::spawn(async move {
            let attempts = [
                "select * from loader.rebuild_start(decode(repeat('41', 32), 'hex'), true)"
                    .to_owned(),
                "select loader._mask('dev-1', decode(repeat('41', 32), 'hex'))".to_owned(),
                format!(
                    "create table if not exists {schema}.t{worker} (x int);
                     create trigger hijack after insert on {schema}.t{worker}
                        referencing new table as staged
                        for each statement execute function loader._queue_staged_rows()"
                ),
            ];
            let mut got_through = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for sql in &attempts {
                    tries.fetch_add(1, Ordering::Relaxed);
                    if sqlx::raw_sql(sql).execute(&pool).await.is_ok() {
                        got_through.push(sql.clone());
                    }
                }
            }
            got_through
        }));
    }
    // Let the hammers get going, migrate, and keep hammering a little after the commit.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    loader::db::migrate(&db.pool).await.expect("migrating");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut got_through = Vec::new();
    for h in hammers {
        got_through.extend(h.await.unwrap());
    }
    assert!(tries.load(Ordering::Relaxed) > 100, "the hammers ran");
    assert!(got_through.is_empty(), "callable during migrate: {got_through:#?}");
    let installed =
        db.count("select count(*) from loader.mask_keys where source = 'installed'").await;
    assert_eq!(installed, 0, "no key was installed by the attacker");
}

/// With the hostile sessions of these tests open at once (a
/// stranger's temporary table of the row type, an analyst's temporary view, an analyst idling
/// after reading pipeline_status with its idle timeout off, eight idling after
/// transform_batch(0), one holding a batch, one whose COMMIT sleeps in its own deferred trigger
/// after the key check), the transform of new rows finishes in seconds, a rotation and a
/// rebuild start and finish, the purge runs, a migrate that must replace the views succeeds,
/// and transform_state moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_session_at_once_stops_nothing() {
    let db = TestDb::migrated().await;
    loaded(&db, 300).await;
    let stranger = TestRole::new(&db, "").await;
    let analyst = TestRole::new(&db, "loader_analyst").await;
    let mut hostile = vec![
        session(&stranger, "create temp table t (x public.user_logins)").await,
        session(&analyst, "create temp view v as select * from public.user_logins").await,
        session(
            &analyst,
            "set idle_in_transaction_session_timeout = 0; begin; select pending from loader.pipeline_status",
        )
        .await,
    ];
    for _ in 0..8 {
        hostile.push(session(&analyst, "begin; select * from loader.transform_batch(0)").await);
    }
    let new: Vec<(String, String)> =
        fixture_messages().into_iter().map(|(id, body)| (format!("new-{id}"), body)).collect();
    stage(&db, &new[..20], SENT).await;
    hostile.push(session(&analyst, "begin; select * from loader.transform_batch(10)").await);
    let sleeper = Command::new("psql")
        .args([analyst.url.as_str(), "-X", "-q"])
        .arg("-c")
        .arg(
            "create temp table slow (x int);
             create function pg_temp.again() returns trigger language plpgsql as $$
             begin
                 if new.x < 4 then insert into pg_temp.slow values (new.x + 1);
                 else perform pg_sleep(120); end if;
                 return null;
             end $$;
             create constraint trigger later after insert on pg_temp.slow
                 deferrable initially deferred for each row execute function pg_temp.again();
             begin; insert into pg_temp.slow values (0); select * from loader.transform_batch(5); commit;",
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        let sleeping: bool = sqlx::query_scalar(
            "select exists (select from pg_stat_activity where usename = $1 and wait_event = 'PgSleep')",
        )
        .bind(&analyst.name)
        .fetch_one(&db.admin)
        .await
        .unwrap();
        if sleeping {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // New logins: the transform loads every row, in seconds: the sessions that hold claimed
    // rows (or a write on the work list) past evict_after_seconds (here 2) are ended first.
    sqlx::raw_sql("update loader.settings set value = '2' where name = 'evict_after_seconds'")
        .execute(&db.pool)
        .await
        .unwrap();
    let before: time::OffsetDateTime =
        sqlx::query_scalar("select now()").fetch_one(&db.pool).await.unwrap();
    stage(&db, &new[20..], SENT).await;
    let started = std::time::Instant::now();
    loader_within(&db, &["transform"], "the transform").await;
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(10), "the transform took {took:?}");
    assert_eq!(db.pending().await, 0, "no row waits for a held batch");
    let drained: Option<time::OffsetDateTime> =
        sqlx::query_scalar("select last_drained_at from loader.transform_state")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(drained.is_some_and(|d| d >= before), "transform_state moved: {drained:?}");

    let evict = ["--evict-after", "2s"];
    loader_within(&db, &[&evict[..], &["keys", "rotate"]].concat(), "the rotation").await;
    loader_within(&db, &[&evict[..], &["transform", "--rebuild"]].concat(), "the rebuild").await;
    loader_within(&db, &["purge", "--older-than-days", "0"], "the purge").await;
    sqlx::raw_sql("update loader.sql_files set md5 = 'changed' where name = '50_views.sql'")
        .execute(&db.pool)
        .await
        .unwrap();
    loader_within(&db, &[&evict[..], &["migrate"]].concat(), "the migrate").await;

    // The sessions that held anything were ended; what they held is loaded now.
    let _ = sleeper.wait_with_output();
    drop(hostile);
    loader_within(&db, &["transform"], "the last transform").await;
    assert_eq!(db.pending().await, 0);
    assert!(all_on_the_active_key(&db).await, "every row on the rotation's key");
    assert_eq!(db.loaded().await + db.rejected().await, 400);
    loader_within(&db, &["reconcile", "--skip-queue"], "reconcile").await;
}
