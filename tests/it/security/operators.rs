//! What an operator reading the server's logs or backups could find: never the key.

use super::*;

/// `keys install` bound the key as a statement parameter, which the server writes to
/// its log with `log_min_duration_statement` (parameters up to `log_parameter_max_length`).
/// With both set as a DBA might, the log shows the install statement, never the key.
#[tokio::test]
async fn the_key_is_never_a_statement_parameter() {
    let db = TestDb::migrated().await;
    let Some(log) = server_log(&db).await else {
        eprintln!("SKIPPED: the server log is not readable from here");
        return;
    };
    sqlx::raw_sql(&format!(
        "alter database {0} set log_min_duration_statement = 0;
         alter database {0} set log_parameter_max_length = -1;",
        db.name
    ))
    .execute(&db.admin)
    .await
    .unwrap();
    let start = std::fs::metadata(&log).unwrap().len();
    let key_hex = "5a".repeat(16) + &"c3".repeat(16);
    let out =
        db.cli().command(&["keys", "install"]).env("LOADER_MASK_KEY", &key_hex).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let installed = db.count("select count(*) from loader.mask_keys where source = 'installed'");
    assert_eq!(installed.await, 1);

    let bytes = std::fs::read(&log).unwrap();
    let written = String::from_utf8_lossy(&bytes[start as usize..]).to_lowercase();
    assert!(
        written.contains("loader.rebuild_start"),
        "the install statement was logged:\n{written}"
    );
    assert!(!written.contains("5a5a5a5a5a5a5a5a"), "the key reached the server log:\n{written}");
    assert!(!written.contains("c3c3c3c3c3c3c3c3"), "the key reached the server log:\n{written}");
}
