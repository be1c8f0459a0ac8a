//! How timestamps and errors are shown to people: RFC 3339 in UTC, to the second; an error
//! and its causes on one line.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `2026-11-27T21:29:54Z`, or "never".
pub fn timestamp(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| {
        t.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).ok()?.format(&Rfc3339).ok()
    })
    .unwrap_or_else(|| "never".to_owned())
}

/// The error and its causes on one line. Some errors (sqlx's) repeat their source in their own
/// message; a cause already contained in the previous one is skipped.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if previous.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
        previous = text;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn timestamps_are_utc_seconds() {
        assert_eq!(timestamp(Some(datetime!(2026-11-27 22:29:54.9 +1))), "2026-11-27T21:29:54Z");
        assert_eq!(timestamp(None), "never");
    }
}
