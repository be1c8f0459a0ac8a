//! How timestamps are shown to people: RFC 3339 in UTC, to the second.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `2026-11-27T21:29:54Z`, or "never".
pub fn timestamp(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| {
        t.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).ok()?.format(&Rfc3339).ok()
    })
    .unwrap_or_else(|| "never".to_owned())
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
