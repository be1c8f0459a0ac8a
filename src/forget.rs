//! `loader forget`: erase every trace of some user ids (`sql/42_erasure.sql`), in committed
//! batches with a progress line, resumable: run again with the same ids and reference, it
//! continues. The ids reach the database by COPY, never as statement parameters, so statement
//! logging cannot write them to the server log; the ledger (`loader.erasures`) keeps the
//! reference and the counts, never an id. Afterwards a VACUUM of the tables it touched removes
//! the old row versions that still held the erased values (unless told not to).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::PgPool;

use crate::evict;
use crate::progress::Progress;

/// Messages erased per committed batch by default.
pub const DEFAULT_BATCH: i32 = 1000;

/// What an erasure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erased {
    pub erasure_id: i64,
    /// Rows erased per table (`loader.erasures.counts`).
    pub counts: BTreeMap<String, i64>,
    /// The VACUUM after it ran (old row versions gone).
    pub vacuumed: bool,
}

/// How an erasure runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Messages per committed batch.
    pub batch: i32,
    /// VACUUM the tables afterwards.
    pub vacuum: bool,
    /// How long a session may hold a batch up before it is ended ([`evict`]).
    pub evict_after: Duration,
}

/// Erases `user_ids` under `reference` (the request's ticket).
pub async fn forget(
    pool: &PgPool,
    user_ids: &[String],
    reference: &str,
    options: &Options,
    progress: Option<&Progress>,
) -> Result<Erased> {
    if user_ids.is_empty() {
        bail!("no user id to erase");
    }
    let erasure_id = start(pool, user_ids, reference).await?;
    if let Some(p) = progress {
        let left: i64 = crate::db::transaction(pool, async |tx| {
            sqlx::query_scalar("select count(*) from loader.erasure_work where erasure_id = $1")
                .persistent(false)
                .bind(erasure_id)
                .fetch_one(tx)
                .await
        })
        .await?;
        p.advance(0, Some(left as u64));
    }
    loop {
        let mut tx = pool.begin().await.context("connecting to PostgreSQL")?;
        let n: i64 =
            evict::watched(pool, &mut tx, "erasure batch", options.evict_after, async |c| {
                sqlx::query_scalar("select loader._forget_batch($1, $2)")
                    .persistent(false)
                    .bind(erasure_id)
                    .bind(options.batch)
                    .fetch_one(c)
                    .await
                    .context("erasing a batch (only the owner role may)")
            })
            .await?;
        tx.commit().await.context("committing an erasure batch")?;
        if n == 0 {
            break;
        }
        if let Some(p) = progress {
            p.advance(n as u64, None);
        }
    }
    if options.vacuum {
        // Outside a transaction, as VACUUM must be (one exchange: the simple protocol).
        sqlx::raw_sql(
            "vacuum (skip_locked) loader.raw_logins, public.user_logins, loader.login_rejects,
                                  loader.refusals",
        )
        .execute(pool)
        .await
        .context("vacuuming the erased rows' old versions")?;
    }
    let counts: sqlx::types::Json<BTreeMap<String, i64>> =
        crate::db::transaction(pool, async |tx| {
            sqlx::query_scalar("select counts from loader.erasures where id = $1")
                .persistent(false)
                .bind(erasure_id)
                .fetch_one(tx)
                .await
        })
        .await?;
    Ok(Erased { erasure_id, counts: counts.0, vacuumed: options.vacuum })
}

/// What erasing `user_ids` would erase, per table (`loader._forget_preview`), changing nothing:
/// the ids go by COPY into a temporary table of a transaction that is rolled back.
pub async fn preview(pool: &PgPool, user_ids: &[String]) -> Result<BTreeMap<String, i64>> {
    if user_ids.is_empty() {
        bail!("no user id to erase");
    }
    let mut tx = pool.begin().await.context("connecting to PostgreSQL")?;
    send_ids(&mut tx, user_ids).await?;
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "select what, rows from loader._forget_preview(array(select user_id from pg_temp.loader_forget_ids))",
    )
    .persistent(false)
    .fetch_all(&mut *tx)
    .await
    .context("counting what the erasure would erase (only the owner role may)")?;
    tx.rollback().await.context("ending the dry run")?;
    Ok(counts.into_iter().collect())
}

/// The user ids, by COPY, into `pg_temp.loader_forget_ids` (dropped at the transaction's end):
/// never statement parameters, which statement logging may write to the server log.
async fn send_ids(tx: &mut sqlx::PgConnection, user_ids: &[String]) -> Result<()> {
    sqlx::raw_sql("create temporary table loader_forget_ids (user_id text) on commit drop")
        .execute(&mut *tx)
        .await?;
    let mut copy = tx.copy_in_raw("copy pg_temp.loader_forget_ids from stdin").await?;
    copy.send(copy_text(user_ids).into_bytes()).await?;
    copy.finish().await.context("sending the user ids")?;
    Ok(())
}

/// `loader._forget_start`, the ids sent by COPY into a temporary table of the transaction.
async fn start(pool: &PgPool, user_ids: &[String], reference: &str) -> Result<i64> {
    let mut tx = pool.begin().await.context("connecting to PostgreSQL")?;
    send_ids(&mut tx, user_ids).await?;
    let erasure_id: i64 = sqlx::query_scalar(
        "select loader._forget_start(array(select user_id from pg_temp.loader_forget_ids), $1)",
    )
    .persistent(false)
    .bind(reference)
    .fetch_one(&mut *tx)
    .await
    .context("starting the erasure (only the owner role may)")?;
    tx.commit().await.context("committing the erasure's start")?;
    Ok(erasure_id)
}

/// Values as COPY's text format reads them, one per line: backslash, newline, carriage return
/// and tab escaped.
fn copy_text(values: &[String]) -> String {
    let mut out = String::new();
    for v in values {
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c => out.push(c),
            }
        }
        out.push('\n');
    }
    out
}

/// User ids from a file: one per line, blank lines and surrounding whitespace ignored.
pub fn ids_from_file(path: &std::path::Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let ids =
            ["plain".to_owned(), "tab\there".into(), "back\\slash".into(), "new\nline".into()];
        assert_eq!(copy_text(&ids), "plain\ntab\\there\nback\\\\slash\nnew\\nline\n");
    }
}
