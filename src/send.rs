//! `loader send`: publish a JSON array file or synthetic login events, so the tool can be tried
//! (and benchmarked) without the preloaded reference queue.
//!
//! On a FIFO queue (`.fifo`) each message goes to the group of its `user_id` (one user's logins
//! keep their order; users are delivered in parallel), or to the group `loader-send` when the
//! body has none. Unless the queue deduplicates by content, each message gets a deduplication
//! id of this send and its position, so every `loader send` sends every message, as it does to
//! a standard queue.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::sqs::{FifoEntry, MAX_BATCH, Queue};

/// SendMessageBatch calls in flight at once.
const SEND_CONCURRENCY: usize = 8;

/// Reads a JSON array; each element becomes one message body, as compact JSON.
pub fn bodies_from_file(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let Value::Array(items) = value else {
        bail!("{} must hold a JSON array of message bodies", path.display());
    };
    Ok(items.iter().map(Value::to_string).collect())
}

/// `n` synthetic login events in the fixture's shape, reproducible from `seed`. About one in
/// ten repeats an earlier device id and IP, so masked duplicates exist to be found.
pub fn generate(n: u64, seed: u64) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut devices: Vec<(String, String)> = Vec::new();
    (0..n)
        .map(|_| {
            let (device_id, ip) = if !devices.is_empty() && rng.u8(..10) == 0 {
                devices[rng.usize(..devices.len())].clone()
            } else {
                let d = (
                    format!("{:03}-{:02}-{:04}", rng.u16(..1000), rng.u8(..100), rng.u16(..10000)),
                    random_ip(&mut rng),
                );
                if devices.len() < 10_000 {
                    devices.push(d.clone());
                }
                d
            };
            let version = if rng.bool() {
                format!("{}.{}.{}", rng.u8(..10), rng.u8(..10), rng.u8(..10))
            } else {
                format!("{}.{}", rng.u8(..10), rng.u8(..100))
            };
            let device_type = ["android", "ios"][rng.usize(..2)];
            let locale =
                [Some("RU"), Some("PH"), Some("ID"), Some("FR"), Some("PT"), None][rng.usize(..6)];
            json!({
                "user_id": format!("{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                    rng.u32(..), rng.u16(..), rng.u16(..0x1000), rng.u16(..), rng.u64(..1 << 48)),
                "app_version": version,
                "device_type": device_type,
                "ip": ip,
                "locale": locale,
                "device_id": device_id,
            })
            .to_string()
        })
        .collect()
}

fn random_ip(rng: &mut fastrand::Rng) -> String {
    if rng.u8(..20) == 0 {
        format!("2001:db8:{:x}:{:x}::{:x}", rng.u16(..), rng.u16(..), rng.u16(..))
    } else {
        format!("{}.{}.{}.{}", rng.u8(1..=223), rng.u8(..), rng.u8(..), rng.u8(1..255))
    }
}

/// The message group of a body sent to a FIFO queue: its `user_id` (a string or a number; a
/// character SQS does not allow in a group id, anything but ASCII letters, digits and
/// punctuation, becomes `_`), else one group for everything else.
pub fn group_of(body: &str) -> String {
    let user =
        match serde_json::from_str::<Value>(body).ok().as_ref().and_then(|v| v.get("user_id")) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
    let group: String = user
        .chars()
        .take(128)
        .map(|c| if c.is_ascii_alphanumeric() || c.is_ascii_punctuation() { c } else { '_' })
        .collect();
    if group.is_empty() { "loader-send".to_owned() } else { group }
}

/// SQS refuses a SendMessageBatch whose bodies add up to more than this (as it refuses a
/// single message above it).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// The bodies cut into SendMessageBatch calls: at most ten each, and at most
/// [`MAX_BATCH_BYTES`] of bodies (a body of that size goes alone), in order.
pub fn batches(bodies: &[String]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, body) in bodies.iter().enumerate() {
        if i > start && (i - start == MAX_BATCH || bytes + body.len() > MAX_BATCH_BYTES) {
            ranges.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += body.len();
    }
    if start < bodies.len() {
        ranges.push(start..bodies.len());
    }
    ranges
}

/// Sends the bodies up to ten per call (fewer when large: [`batches`]), several calls in
/// flight. Returns how many were sent.
pub async fn send_all(queue: &Queue, bodies: Vec<String>) -> Result<u64> {
    send_all_showing(queue, bodies, None).await
}

/// [`send_all`], advancing `progress` (a terminal's progress line) as batches are sent.
pub async fn send_all_showing(
    queue: &Queue,
    bodies: Vec<String>,
    progress: Option<&crate::progress::Progress>,
) -> Result<u64> {
    if let Some(p) = progress {
        p.advance(0, Some(bodies.len() as u64));
    }
    let fifo = queue.is_fifo();
    // Deduplication ids: this send's, then the position (128 characters at most).
    let send_id = (fifo && !queue.content_based_deduplication().await?)
        .then(|| format!("{:016x}", fastrand::u64(..)));
    let mut in_flight = JoinSet::new();
    let mut sent = 0u64;
    for range in batches(&bodies) {
        if in_flight.len() >= SEND_CONCURRENCY {
            let n = in_flight.join_next().await.expect("non-empty")??;
            sent += n;
            if let Some(p) = progress {
                p.advance(n, None);
            }
        }
        let first = range.start;
        let chunk = bodies[range].to_vec();
        let queue = queue.clone();
        let send_id = send_id.clone();
        in_flight.spawn(async move {
            let entries = chunk.iter().enumerate().map(|(i, body)| {
                let entry = fifo.then(|| FifoEntry {
                    group_id: group_of(body),
                    deduplication_id: send_id.as_ref().map(|id| format!("{id}-{}", first + i)),
                });
                (body.as_str(), entry)
            });
            queue.send_batch_to_groups(entries).await?;
            Ok::<_, anyhow::Error>(chunk.len() as u64)
        });
    }
    while let Some(done) = in_flight.join_next().await {
        let n = done??;
        sent += n;
        if let Some(p) = progress {
            p.advance(n, None);
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_events_are_reproducible_login_objects() {
        let a = generate(50, 7);
        assert_eq!(a, generate(50, 7));
        assert_ne!(a, generate(50, 8));
        for body in &a {
            let v: Value = serde_json::from_str(body).unwrap();
            for key in ["user_id", "app_version", "device_type", "ip", "locale", "device_id"] {
                assert!(v.get(key).is_some(), "{key} missing in {body}");
            }
        }
    }

    #[test]
    fn batches_hold_ten_bodies_or_a_mebibyte_at_most() {
        let small = vec!["x".repeat(100); 25];
        assert_eq!(batches(&small), [0..10, 10..20, 20..25]);
        let large = vec!["x".repeat(400 * 1024); 5];
        assert_eq!(batches(&large), [0..2, 2..4, 4..5], "two of 400 KiB fit, three do not");
        let mixed = vec!["x".repeat(MAX_BATCH_BYTES), "y".into(), "z".into()];
        assert_eq!(batches(&mixed), [0..1, 1..3], "a 1 MiB body goes alone");
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn a_fifo_message_goes_to_its_users_group() {
        assert_eq!(group_of(r#"{"user_id": "u-1", "ip": "10.0.0.1"}"#), "u-1");
        assert_eq!(group_of(r#"{"user_id": 42}"#), "42");
        for no_user in [r#"{"foo": 1}"#, r#"{"user_id": ""}"#, "not json", r#"[1]"#] {
            assert_eq!(group_of(no_user), "loader-send", "{no_user}");
        }
        assert_eq!(group_of(&format!(r#"{{"user_id": "{}"}}"#, "x".repeat(300))).len(), 128);
        assert_eq!(group_of(r#"{"user_id": "a b\u00e9"}"#), "a_b_");
    }

    #[test]
    fn a_file_must_hold_an_array() {
        let dir = std::env::temp_dir().join(format!("loader-send-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("one.json");
        std::fs::write(&file, r#"{"user_id": "x"}"#).unwrap();
        assert!(bodies_from_file(&file).is_err());
        std::fs::write(&file, r#"[{"a": 1}, "text", null]"#).unwrap();
        assert_eq!(bodies_from_file(&file).unwrap(), [r#"{"a":1}"#, r#""text""#, "null"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
