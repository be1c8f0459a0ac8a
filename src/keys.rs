//! `loader keys`: list, rotate, install masking keys. Key bytes are never printed, and an
//! installed key is read from the environment or stdin, never from the command line (where
//! `ps` and shell history would see it).

use std::io::Read;

use anyhow::{Context, Result, bail};
use sqlx::PgPool;
use time::OffsetDateTime;

/// A key as `loader keys list` shows it: no bytes.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyInfo {
    pub id: i32,
    pub created_at: OffsetDateTime,
    pub retired_at: Option<OffsetDateTime>,
    pub source: String,
    pub active: bool,
}

pub async fn list(pool: &PgPool) -> Result<Vec<KeyInfo>> {
    crate::db::transaction(pool, async |tx| {
        sqlx::query_as(
            "select id, created_at, retired_at, source, active from loader.mask_key_info order by id",
        )
        .persistent(false).fetch_all(tx)
        .await
    })
    .await
    .context("listing keys (this needs the owner role, or loader_analyst)")
}

/// The SQL expression that yields `key` inside a statement of `tx` (`null` for none).
///
/// A given key never travels as a statement parameter: the server logs parameters with
/// `log_min_duration_statement` (up to `log_parameter_max_length`), and the key would land in
/// the server log. It is sent as COPY data into a temporary table, which nothing logs, and
/// read from there inside the statement that installs it.
pub(crate) async fn key_expression(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    key: Option<&[u8]>,
) -> Result<&'static str> {
    let Some(key) = key else { return Ok("null") };
    sqlx::raw_sql("create temporary table loader_key_input (key bytea) on commit drop")
        .execute(&mut **tx)
        .await?;
    let mut copy = tx.copy_in_raw("copy pg_temp.loader_key_input from stdin").await?;
    // In COPY's text format a doubled backslash is one: the field reads `\x<hex>`, bytea's
    // hex input.
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    copy.send(format!("\\\\x{hex}\n").into_bytes()).await?;
    copy.finish().await.context("sending the key")?;
    Ok("(select key from pg_temp.loader_key_input)")
}

/// Reads a key given as 64 hex characters from `LOADER_MASK_KEY`, else from stdin.
pub fn read_key_from_env_or_stdin() -> Result<Vec<u8>> {
    let text = match std::env::var("LOADER_MASK_KEY") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => {
            let mut buf = String::new();
            std::io::stdin().read_to_string(&mut buf).context("reading the key from stdin")?;
            buf
        }
    };
    parse_hex_key(&text)
}

/// 64 hex characters (surrounding whitespace ignored) into 32 bytes.
pub fn parse_hex_key(text: &str) -> Result<Vec<u8>> {
    let hex = text.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        // Never echo the input: it may be a real key with a typo.
        bail!("a masking key must be 64 hex characters (32 bytes); got {} characters", hex.len());
    }
    Ok((0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_are_32_bytes() {
        let key = parse_hex_key(&format!("  {}\n", "0f".repeat(32))).unwrap();
        assert_eq!(key, vec![0x0f; 32]);
        assert_eq!(parse_hex_key(&"AB".repeat(32)).unwrap(), vec![0xab; 32]);
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        let err = parse_hex_key("secret-but-wrong").unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(parse_hex_key(&"0f".repeat(31)).is_err());
        assert!(parse_hex_key(&"zz".repeat(32)).is_err());
    }
}
