//! How a miss is written on a queue, in one place: the Kafka message key,
//! the payload, when a delayed retry is due, and dead letters that always
//! fit in a message. The publisher, the source, the tests and the drill all
//! encode and decode through these functions.

use std::time::Duration;

use embark_proto::internal::v1::{DeadLetter, MissEvent};
use prost::Message as _;

/// The longest a miss waits in a delay queue. A `not_before` further out
/// (a clock far ahead, a hostile message) is due after this instead: the
/// fill loop's own backoff never asks for more, and tokio's delay queue
/// panics on durations of years.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);

/// The most of a poison message's bytes a dead letter carries: enough to
/// see what it was, small enough that the letter always fits a message
/// (`message.max.bytes` is 1 MB by default).
pub const MAX_DEAD_LETTER_RAW: usize = 64 << 10;

/// The longest reason a dead letter carries, in bytes.
pub const MAX_DEAD_LETTER_REASON: usize = 4096;

/// The message key of a miss: its model namespace (`model@version`, see
/// `embark_proto::model_namespace`), a newline, key. The same key of one
/// version always lands on the same partition, so its misses are ordered.
pub fn message_key(model: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(model.len() + 1 + key.len());
    k.extend_from_slice(model.as_bytes());
    k.push(b'\n');
    k.extend_from_slice(key.as_bytes());
    k
}

/// Splits a [`message_key`] back into (model, key). Model names never hold
/// a newline, so the first one splits them; a key may hold more. `None` for
/// a key without a newline or that is not UTF-8.
pub fn parse_message_key(k: &[u8]) -> Option<(&str, &str)> {
    let nl = k.iter().position(|b| *b == b'\n')?;
    Some((std::str::from_utf8(&k[..nl]).ok()?, std::str::from_utf8(&k[nl + 1..]).ok()?))
}

/// A miss as a message payload.
pub fn encode_miss(event: &MissEvent) -> Vec<u8> {
    event.encode_to_vec()
}

/// A miss as a Kafka record: the payload, and its trace context as
/// message headers (`traceparent`, `tracestate`: where tracing tools look
/// for it), not in the payload. `None` headers when it is not traced.
pub fn miss_record(event: &MissEvent) -> (Vec<u8>, Option<rdkafka::message::OwnedHeaders>) {
    if event.trace_context.is_empty() {
        return (encode_miss(event), None);
    }
    let headers = event.trace_context.iter().fold(rdkafka::message::OwnedHeaders::new(), |h, (k, v)| {
        h.insert(rdkafka::message::Header { key: k, value: Some(v.as_bytes()) })
    });
    let bare = MissEvent { trace_context: Default::default(), ..event.clone() };
    (encode_miss(&bare), Some(headers))
}

/// The trace context in a record's headers, into its decoded miss (only
/// the W3C names, only text, at most a few hundred bytes each: a header
/// is input from the topic, like the payload).
pub fn attach_trace_headers(event: &mut MissEvent, headers: Option<&rdkafka::message::BorrowedHeaders>) {
    use rdkafka::message::Headers as _;
    const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];
    const MAX_TRACE_HEADER: usize = 512;
    let Some(headers) = headers else { return };
    for h in headers.iter() {
        if let (true, Some(value)) = (TRACE_HEADERS.contains(&h.key), h.value)
            && value.len() <= MAX_TRACE_HEADER
            && let Ok(text) = std::str::from_utf8(value)
        {
            event.trace_context.insert(h.key.to_owned(), text.to_owned());
        }
    }
}

/// Why a message on the miss topic is not a miss (it goes to the DLQ raw).
#[derive(Debug, thiserror::Error)]
pub enum PoisonMessage {
    #[error("empty message")]
    Empty,
    #[error("not a MissEvent: {0}")]
    Undecodable(#[from] prost::DecodeError),
    #[error("a MissEvent without model or key")]
    Incomplete,
}

/// Reads a message payload as a miss; a miss names its model and key.
pub fn decode_miss(payload: Option<&[u8]>) -> Result<MissEvent, PoisonMessage> {
    let event = MissEvent::decode(payload.ok_or(PoisonMessage::Empty)?)?;
    if event.model.is_empty() || event.key.is_empty() {
        return Err(PoisonMessage::Incomplete);
    }
    Ok(event)
}

/// How long a miss due at `not_before_unix_ms` waits from `now`: `None`
/// when due, at most [`MAX_RETRY_DELAY`]. Saturating: any `i64` is safe.
pub fn retry_wait(not_before_unix_ms: i64, now_unix_ms: i64) -> Option<Duration> {
    let wait = not_before_unix_ms.saturating_sub(now_unix_ms);
    (wait > 0).then(|| Duration::from_millis(wait as u64).min(MAX_RETRY_DELAY))
}

/// Cuts a dead letter's raw bytes and reason so it fits in a message, and
/// says so in the reason.
pub fn fit_dead_letter(d: &mut DeadLetter) {
    let mut cut = Vec::new();
    if d.raw.len() > MAX_DEAD_LETTER_RAW {
        cut.push(format!("raw cut to {MAX_DEAD_LETTER_RAW} of {} bytes", d.raw.len()));
        d.raw = d.raw.slice(..MAX_DEAD_LETTER_RAW);
    }
    if d.reason.len() > MAX_DEAD_LETTER_REASON {
        let mut end = MAX_DEAD_LETTER_REASON;
        while !d.reason.is_char_boundary(end) {
            end -= 1;
        }
        cut.push(format!("reason cut to {end} of {} bytes", d.reason.len()));
        d.reason.truncate(end);
    }
    if !cut.is_empty() {
        d.reason = format!("{} ({})", d.reason, cut.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keys_are_model_newline_key_and_parse_back() {
        let k = message_key("minilm-l6-v2", "a\nb");
        assert_eq!(k, b"minilm-l6-v2\na\nb");
        assert_eq!(parse_message_key(&k), Some(("minilm-l6-v2", "a\nb")));
        assert_eq!(parse_message_key(b"no newline"), None);
        assert_eq!(parse_message_key(b"m\n\xff"), None, "not UTF-8");
    }

    #[test]
    fn payloads_round_trip_and_poison_is_named() {
        let e = MissEvent { model: "m".into(), key: "k".into(), attempts: 2, ..MissEvent::default() };
        assert_eq!(decode_miss(Some(&encode_miss(&e))).expect("decodes"), e);
        assert!(matches!(decode_miss(None), Err(PoisonMessage::Empty)));
        assert!(matches!(decode_miss(Some(&[0xff, 0xff, 0xff])), Err(PoisonMessage::Undecodable(_))));
        let no_key = MissEvent { model: "m".into(), ..MissEvent::default() };
        assert!(matches!(decode_miss(Some(&encode_miss(&no_key))), Err(PoisonMessage::Incomplete)));
    }

    #[test]
    fn a_trace_context_travels_as_headers_not_in_the_payload() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut e = MissEvent { model: "m".into(), key: "k".into(), ..MissEvent::default() };
        e.trace_context.insert("traceparent".into(), traceparent.into());
        let (payload, headers) = miss_record(&e);
        let headers = headers.expect("a traced miss has headers");
        let mut read = decode_miss(Some(&payload)).expect("decodes");
        assert!(read.trace_context.is_empty(), "not in the payload");
        attach_trace_headers(&mut read, Some(headers.as_borrowed()));
        assert_eq!(read, e);

        // Only the W3C names, only bounded text.
        let hostile = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header { key: "x-other", value: Some("v") })
            .insert(rdkafka::message::Header { key: "tracestate", value: Some(&*"a".repeat(10_000)) })
            .insert(rdkafka::message::Header { key: "traceparent", value: Some(&[0xff, 0xfe][..]) });
        let mut plain = MissEvent { model: "m".into(), key: "k".into(), ..MissEvent::default() };
        attach_trace_headers(&mut plain, Some(hostile.as_borrowed()));
        assert!(plain.trace_context.is_empty(), "{:?}", plain.trace_context);
        let (_, none) = miss_record(&plain);
        assert!(none.is_none(), "an untraced miss carries no headers");
    }

    /// Defect 11.2: a `not_before` far in the future (or far in the past)
    /// panicked `DelayQueue::insert` (or overflowed) and killed the reader.
    #[tokio::test]
    async fn one_kafka_message_kills_kfcs_reader() {
        let now = 1_700_000_000_000;
        assert_eq!(retry_wait(i64::MAX, now), Some(MAX_RETRY_DELAY));
        assert_eq!(retry_wait(i64::MIN, now), None);
        assert_eq!(retry_wait(now + 1500, now), Some(Duration::from_millis(1500)));
        assert_eq!(retry_wait(now, now), None);
        let mut q: tokio_util::time::DelayQueue<()> = tokio_util::time::DelayQueue::new();
        for wait in [retry_wait(i64::MAX, now), retry_wait(now + 1, now)].into_iter().flatten() {
            q.insert((), wait);
        }
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn dead_letters_are_cut_to_fit_the_producer() {
        let mut d = DeadLetter {
            raw: vec![7u8; 3 * MAX_DEAD_LETTER_RAW].into(),
            reason: "x".repeat(10_000),
            ..Default::default()
        };
        fit_dead_letter(&mut d);
        assert_eq!(d.raw.len(), MAX_DEAD_LETTER_RAW);
        assert!(d.reason.len() <= MAX_DEAD_LETTER_REASON + 128, "{}", d.reason.len());
        assert!(d.reason.contains("cut to"), "the letter says it was cut: {}", d.reason);
    }
}
