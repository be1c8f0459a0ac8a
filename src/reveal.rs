//! `loader reveal`: the raw ip and device id of some messages, through the audited path of
//! `sql/44_reveal.sql` (`call loader.reveal(...)`: the record in `loader.pii_access_log` is
//! committed before anything is read), for a login granted `loader_pii_reader`.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};

/// One message's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revealed {
    pub message_id: String,
    /// revealed, purged, erased or not staged.
    pub status: String,
    pub ip: Option<String>,
    pub device_id: Option<String>,
}

/// Calls `loader.reveal` for `message_ids` with `purpose`. The procedure commits, so it runs on
/// the simple query protocol (one exchange, outside any transaction), its arguments written
/// in as literals.
pub async fn reveal(pool: &PgPool, message_ids: &[String], purpose: &str) -> Result<Vec<Revealed>> {
    let ids = message_ids.iter().map(|id| literal(id)).collect::<Vec<_>>().join(", ");
    let sql = format!("call loader.reveal(array[{ids}]::text[], {})", literal(purpose));
    let row = sqlx::raw_sql(&sql)
        .fetch_one(pool)
        .await
        .context("revealing (a login granted loader_pii_reader may)")?;
    let revealed: sqlx::types::Json<Vec<Revealed>> = row.try_get("revealed")?;
    Ok(revealed.0)
}

/// `text` as an SQL string literal: dollar-quoted with a tag it does not contain, so no
/// character of it (a quote, a backslash) is read as anything but itself, whatever the session's
/// settings.
fn literal(text: &str) -> String {
    // The closing tag must first occur where it is put: not inside the text, nor straddling
    // its end ("x$v" followed by "$v$").
    let closes_at_end = |tag: &str| format!("{text}{tag}").find(tag) == Some(text.len());
    let mut tag = String::from("$v$");
    let mut n = 0;
    while !closes_at_end(&tag) {
        n += 1;
        tag = format!("$v{n}$");
    }
    format!("{tag}{text}{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_quote_anything() {
        assert_eq!(literal("plain"), "$v$plain$v$");
        assert_eq!(literal("it's \\ a $v$ trap"), "$v1$it's \\ a $v$ trap$v1$");
        assert_eq!(literal("ends in $v"), "$v1$ends in $v$v1$");
    }
}
