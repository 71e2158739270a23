//! The browser's frames on their way to the runtime: those not yet sent on
//! the current upstream connection, and those sent but not yet acked. After a
//! reconnect every tracked frame is sent again, in order; the runtime drops
//! the ones it already processed (it remembers ids per session), so nothing
//! is lost or done twice (decision 7).
//!
//! A frame is tracked when it is a JSON object with a string `id` (1-200
//! characters, as the runtime requires). A binary frame belongs to the
//! tracked text frame just before it (the `file_upload` header whose content
//! it carries, acked only after the binary frame). Untracked frames are sent
//! once, at most once: they are dropped as soon as they are written.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use super::error::Error;

/// The runtime's limit on ids.
const MAX_ID_CHARS: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_messages: 256,
            max_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The fields of an envelope the relay reads; everything else is skipped
/// unparsed and the frame is forwarded as it came.
#[derive(Deserialize, Debug, Default, PartialEq)]
pub struct Head<'a> {
    #[serde(rename = "type", borrow, default)]
    pub type_: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub id: Option<Cow<'a, str>>,
}

/// Reads type and id of a text frame's payload; anything not a JSON object
/// (or not UTF-8) gives an empty head (the runtime answers it with an error;
/// the relay just passes it on untracked).
pub fn head(text: &[u8]) -> Head<'_> {
    #[derive(Deserialize)]
    struct Loose<'a> {
        #[serde(rename = "type", borrow, default)]
        type_: LooseStr<'a>,
        #[serde(borrow, default)]
        id: LooseStr<'a>,
    }
    // A non-string `type` or `id` must not make the whole frame unreadable
    // to us: the runtime decides what is valid.
    match serde_json::from_slice::<Loose<'_>>(text) {
        Ok(l) => Head {
            type_: l.type_.0,
            id: l
                .id
                .0
                .filter(|s| !s.is_empty() && s.chars().count() <= MAX_ID_CHARS),
        },
        Err(_) => Head::default(),
    }
}

/// Whether a payload may name an id or a `hello`: it has `"id"`, `"hello"`
/// or a backslash (an escape could spell either). Read as it is on the wire,
/// masked with `mask` (RFC 6455, section 5.3; zeros for an unmasked one), so
/// that a browser's frame is not copied and unmasked to be looked at.
///
/// Sixteen bytes at a time (SSE2, in every x86-64): each byte is compared
/// with `\`, `"`, `i` and `h` (masked as the payload is), and only a quote
/// followed by `i` or `h` is looked at further, which a frame without an id
/// seldom has. The look at a 64 B browser frame went from about 300
/// user-space instructions (a copy, the unmask and three `memchr`
/// searches) to about 80 (callgrind, docs/relay.md, session 11). Elsewhere,
/// the same search a byte at a time.
pub fn may_matter(text: &[u8], mask: [u8; 4]) -> bool {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of x86-64's baseline: every x86-64 CPU has it.
    let (found, at) = unsafe { blocks_sse2(text, mask) };
    #[cfg(not(target_arch = "x86_64"))]
    let (found, at) = (false, 0);
    found
        || (at..text.len()).any(|k| match text[k] ^ mask[k % 4] {
            b'\\' => true,
            b'"' => names_id_or_hello(text, mask, k),
            _ => false,
        })
}

/// [`may_matter`] on the whole 16-byte blocks of `text`: whether one of them
/// decides it, and else where the rest starts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn blocks_sse2(text: &[u8], mask: [u8; 4]) -> (bool, usize) {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        _mm_set1_epi32, _mm_xor_si128,
    };
    // The key repeats every 4 bytes, and 16 is a multiple of 4: every
    // block starts at key byte 0.
    let key = _mm_set1_epi32(i32::from_le_bytes(mask));
    let [escape, quote, i, h] = [b'\\', b'"', b'i', b'h'].map(|c| _mm_set1_epi8(c as i8));
    let mut at = 0;
    while at + 16 <= text.len() {
        // SAFETY: the 16 bytes from `at` are in `text` (the loop's
        // condition); the load has no alignment requirement.
        let block = unsafe { _mm_loadu_si128(text.as_ptr().add(at).cast::<__m128i>()) };
        let b = _mm_xor_si128(block, key);
        if _mm_movemask_epi8(_mm_cmpeq_epi8(b, escape)) != 0 {
            return (true, at);
        }
        let quotes = _mm_movemask_epi8(_mm_cmpeq_epi8(b, quote)) as u32;
        let next = _mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(b, i), _mm_cmpeq_epi8(b, h))) as u32;
        // A quote before an `i` or `h` in the block, or last in it (its
        // next byte is the next block's).
        let mut candidates = quotes & ((next >> 1) | 0x8000);
        while candidates != 0 {
            if names_id_or_hello(text, mask, at + candidates.trailing_zeros() as usize) {
                return (true, at);
            }
            candidates &= candidates - 1;
        }
        at += 16;
    }
    (false, at)
}

/// Whether the quote at `q` of the masked `text` opens `"id"` or `"hello"`.
fn names_id_or_hello(text: &[u8], mask: [u8; 4], q: usize) -> bool {
    let follows = |word: &[u8]| {
        text.get(q + 1..q + 1 + word.len()).is_some_and(|t| {
            t.iter()
                .zip(q + 1..)
                .zip(word)
                .all(|((t, k), w)| t ^ mask[k % 4] == *w)
        })
    };
    follows(b"id\"") || follows(b"hello\"")
}

/// A string, or None for a value of any other type. Deserialized by a
/// visitor of its own: an untagged enum (string or anything) would buffer
/// every value, which cost a tenth of the relay's time per message.
#[derive(Default)]
struct LooseStr<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for LooseStr<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = LooseStr<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(LooseStr(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(LooseStr(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(LooseStr(Some(Cow::Owned(v))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(LooseStr(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(LooseStr(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(LooseStr(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(LooseStr(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(LooseStr(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(LooseStr(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(LooseStr(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// If `text` is the runtime's ack, the id it acknowledges. Cheap for every
/// other frame: acks are small, so large frames are not parsed at all.
pub fn acked_id(text: &[u8]) -> Option<String> {
    if text.len() > 1024 || !text.windows(5).any(|w| w == b"\"ack\"") {
        return None;
    }
    #[derive(Deserialize)]
    struct Ack {
        #[serde(rename = "type")]
        type_: String,
        payload: AckPayload,
    }
    #[derive(Deserialize)]
    struct AckPayload {
        id: String,
    }
    let a: Ack = serde_json::from_slice(text).ok()?;
    (a.type_ == "ack").then_some(a.payload.id)
}

struct Item {
    /// The message as it came from the browser, ready to write.
    wire: Bytes,
    /// Its payload length, what the byte bound counts.
    len: usize,
    /// The id of the message this frame belongs to; None: untracked.
    id: Option<Arc<str>>,
}

#[derive(Default)]
pub struct Outbox {
    items: VecDeque<Item>,
    bytes: usize,
    /// Items before this index were written on the current connection.
    sent: usize,
    /// The last item pushed was a tracked text frame that a binary frame
    /// may still join.
    open_id: Option<Arc<str>>,
    limits: Limits,
}

impl Outbox {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    fn push(&mut self, wire: Bytes, len: usize, id: Option<Arc<str>>) -> Result<(), Error> {
        if self.items.len() + 1 > self.limits.max_messages || self.bytes + len > self.limits.max_bytes {
            return Err(Error::BacklogFull {
                messages: self.items.len(),
                bytes: self.bytes,
            });
        }
        self.bytes += len;
        self.items.push_back(Item { wire, len, id });
        Ok(())
    }

    /// Queues a text message (its wire bytes and payload length); `id`
    /// from [`head`].
    pub fn push_text(&mut self, wire: Bytes, len: usize, id: Option<&str>) -> Result<(), Error> {
        let id: Option<Arc<str>> = id.map(Arc::from);
        self.open_id = id.clone();
        self.push(wire, len, id)
    }

    /// Whether an untracked text message may be written without being
    /// queued: when nothing is waiting to be written before it, the outbox
    /// would hold it only for the length of the write, then forget it. If
    /// so, it ends the open tracked message as [`Self::push_text`] would (a
    /// binary frame after it is not part of that message). A frame that
    /// passes and then cannot be written is queued with `push_text`, to go
    /// out on the next connection as a queued one would.
    pub fn pass_through(&mut self) -> bool {
        if self.sent < self.items.len() {
            return false;
        }
        self.open_id = None;
        true
    }

    /// Queues a binary message, joining the tracked text message before it.
    pub fn push_binary(&mut self, wire: Bytes, len: usize) -> Result<(), Error> {
        let id = self.open_id.clone();
        self.push(wire, len, id)
    }

    /// The next message to write on the current connection.
    pub fn next_unsent(&self) -> Option<&Bytes> {
        self.items.get(self.sent).map(|i| &i.wire)
    }

    /// Records that [`Self::next_unsent`] was written. Untracked frames are
    /// forgotten now; tracked ones wait for their ack.
    pub fn mark_sent(&mut self) {
        let Some(item) = self.items.get(self.sent) else {
            return;
        };
        if item.id.is_none() {
            let item = self.items.remove(self.sent).expect("present");
            self.bytes -= item.len;
        } else {
            self.sent += 1;
        }
    }

    /// The runtime acked `id` (processed, duplicate or rejected): its written
    /// frames are done. Returns how many frames were released.
    pub fn ack(&mut self, id: &str) -> usize {
        if self.open_id.as_deref() == Some(id) {
            self.open_id = None;
        }
        let mut released = 0;
        let mut i = 0;
        while i < self.sent {
            if self.items[i].id.as_deref() == Some(id) {
                let item = self.items.remove(i).expect("present");
                self.bytes -= item.len;
                self.sent -= 1;
                released += 1;
            } else {
                i += 1;
            }
        }
        released
    }

    /// A new upstream connection: everything still held is sent again.
    /// Returns how many frames will be resent.
    pub fn rewind(&mut self) -> usize {
        std::mem::replace(&mut self.sent, 0)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Tracked frames written and not yet acked.
    pub fn unacked(&self) -> usize {
        self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outbox does not look into messages: plain bytes stand for wire
    /// frames here.
    fn text(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    fn binary(n: usize) -> Bytes {
        Bytes::from(format!("bin:{n}"))
    }

    fn env(id: &str) -> String {
        format!(r#"{{"type":"mission","payload":{{"text":"x"}},"id":"{id}"}}"#)
    }

    /// Writes everything unsent, returning what was written.
    fn flush(o: &mut Outbox) -> Vec<String> {
        let mut out = vec![];
        while let Some(m) = o.next_unsent() {
            out.push(String::from_utf8(m.to_vec()).unwrap());
            o.mark_sent();
        }
        out
    }

    fn push(o: &mut Outbox, s: &str) {
        let h = head(s.as_bytes());
        o.push_text(text(s), s.len(), h.id.as_deref()).unwrap();
    }

    #[test]
    fn head_reads_type_and_valid_ids_only() {
        let h = head(r#"{"type":"ping","id":"a-1","payload":{"big":[1,2,3]}}"#.as_bytes());
        assert_eq!((h.type_.as_deref(), h.id.as_deref()), (Some("ping"), Some("a-1")));
        assert_eq!(head(r#"{"type":"ping"}"#.as_bytes()).id, None);
        assert_eq!(head(r#"{"type":"ping","id":7}"#.as_bytes()).id, None);
        assert_eq!(head(r#"{"type":"ping","id":""}"#.as_bytes()).id, None);
        assert_eq!(
            head(format!(r#"{{"type":"p","id":"{}"}}"#, "x".repeat(201)).as_bytes()).id,
            None
        );
        assert!(
            head(format!(r#"{{"type":"p","id":"{}"}}"#, "é".repeat(200)).as_bytes())
                .id
                .is_some()
        );
        assert_eq!(head(r#"{"type":3,"id":"z"}"#.as_bytes()).id.as_deref(), Some("z"));
        assert_eq!(head(b"not json"), Head::default());
        assert_eq!(head(b"[1]"), Head::default());
        // Escapes in the id are decoded as the runtime decodes them.
        assert_eq!(
            head(r#"{"type":"p","id":"a\"b"}"#.as_bytes()).id.as_deref(),
            Some("a\"b")
        );
    }

    /// What the session reads of a browser's text frame: its head, parsed
    /// only if [`may_matter`] says it could name an id or a hello (most
    /// frames carry no id, and the parse was the larger part of the relay's
    /// own work per small message).
    fn browser_head(text: &[u8]) -> Head<'_> {
        if may_matter(text, [0; 4]) {
            head(text)
        } else {
            Head::default()
        }
    }

    #[test]
    fn browser_head_parses_only_what_could_matter() {
        // Whatever head() finds of a hello or an id, browser_head finds too.
        for s in [
            r#"{"type":"hello","payload":{}}"#,
            r#"{"type":"mission","id":"m-1","payload":{"text":"x"}}"#,
            r#"{"type" : "hello" , "id" : "h"}"#,
            r#"{"\u0069d":"esc-1","type":"mission"}"#,
            r#"{"type":"hel\u006co"}"#,
            r#"{"payload":{"id":"inner"},"type":"x"}"#,
        ] {
            assert_eq!(browser_head(s.as_bytes()), head(s.as_bytes()), "{s}");
        }
        // Spelled with escapes, still found.
        assert_eq!(
            browser_head(br#"{"\u0069d":"esc-1"}"#).id.as_deref(),
            Some("esc-1")
        );
        assert_eq!(
            browser_head(br#"{"type":"hel\u006co"}"#).type_.as_deref(),
            Some("hello")
        );
        // The rest has neither: an empty head, as head() has no id or hello.
        for s in [
            r#"{"type":"ping","payload":"xxxx"}"#,
            "not json",
            r#"{"idea":"hello there"}"#,
        ] {
            assert_eq!(browser_head(s.as_bytes()), Head::default(), "{s}");
            let h = head(s.as_bytes());
            assert!(h.id.is_none() && h.type_.as_deref() != Some("hello"), "{s}");
        }
    }

    #[test]
    fn may_matter_reads_masked_payloads_as_a_plain_search_would() {
        // The search it replaces, on the unmasked payload.
        let plain = |t: &[u8]| {
            t.contains(&b'\\')
                || t.windows(4).any(|w| w == b"\"id\"")
                || t.windows(7).any(|w| w == b"\"hello\"")
        };
        let mask =
            |t: &[u8], m: [u8; 4]| -> Vec<u8> { t.iter().enumerate().map(|(i, b)| b ^ m[i % 4]).collect() };
        let mut rng = rand::rng();
        // Frames made of the bytes that matter, the bytes that look like
        // them and the bytes whose masked forms the zero-byte test confuses,
        // at every length around the word size and at every offset.
        let alphabet = b"\"\\idhelo:{} \x00\x01\x21\x5b\x23\x80\xff";
        for len in 0..40 {
            for _ in 0..400 {
                let t: Vec<u8> = (0..len)
                    .map(|_| alphabet[rand::Rng::random_range(&mut rng, 0..alphabet.len())])
                    .collect();
                let m: [u8; 4] = rand::random();
                assert_eq!(may_matter(&t, [0; 4]), plain(&t), "{t:?}");
                assert_eq!(may_matter(&mask(&t, m), m), plain(&t), "{t:?} masked with {m:?}");
            }
        }
        // Each word at every offset of a filler, across the blocks' edges;
        // a near miss nowhere.
        for word in [&b"\"id\""[..], b"\"hello\"", b"\\", b"\"i\"d", b"\"hell\""] {
            for len in word.len()..50 {
                for at in 0..=len - word.len() {
                    let mut t = vec![b'x'; len];
                    t[at..at + word.len()].copy_from_slice(word);
                    let m = [0x13, 0x57, 0x9b, 0xdf];
                    assert_eq!(
                        may_matter(&mask(&t, m), m),
                        plain(&t),
                        "{:?} at {at} of {len}",
                        word
                    );
                }
            }
        }
        for s in [
            r#"{"type":"ping","payload":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
            r#"{"type":"mission","id":"m-1"}"#,
            r#"{"type":"hello"}"#,
            r#"{"type":"hel\u006co"}"#,
            r#"{"idea":"hello there"}"#,
        ] {
            let m = [0x5a, 0x01, 0x22, 0xdc];
            assert_eq!(may_matter(&mask(s.as_bytes(), m), m), plain(s.as_bytes()), "{s}");
        }
    }

    #[test]
    fn acks_are_recognised_cheaply() {
        assert_eq!(
            acked_id(r#"{"type":"ack","payload":{"id":"c-1","status":"processed"},"id":"u"}"#.as_bytes())
                .as_deref(),
            Some("c-1")
        );
        assert_eq!(
            acked_id(r#"{"type":"pong","payload":{"echo":"ack"}}"#.as_bytes()),
            None
        );
        assert_eq!(
            acked_id(r#"{"type":"pong","payload":{"echo":"\"ack\""}}"#.as_bytes()),
            None
        );
        assert_eq!(
            acked_id(format!(r#"{{"type":"ack","payload":{{"id":"{}"}}}}"#, "x".repeat(2000)).as_bytes()),
            None
        );
    }

    #[test]
    fn acked_frames_are_released_and_the_rest_resent_in_order() {
        let mut o = Outbox::new(Limits::default());
        for id in ["1", "2", "3"] {
            push(&mut o, &env(id));
        }
        push(&mut o, r#"{"type":"ping"}"#);
        assert_eq!(flush(&mut o).len(), 4);
        assert_eq!(
            (o.len(), o.unacked()),
            (3, 3),
            "the untracked ping is gone once written"
        );
        assert_eq!(o.ack("1"), 1);
        assert_eq!(o.ack("unknown"), 0);
        // The upstream dropped before 2 and 3 were acked; 4 arrives meanwhile.
        push(&mut o, &env("4"));
        assert_eq!(o.rewind(), 2);
        assert_eq!(flush(&mut o), vec![env("2"), env("3"), env("4")]);
        o.ack("2");
        o.ack("3");
        o.ack("4");
        assert!(o.is_empty());
        assert_eq!(o.bytes(), 0);
    }

    #[test]
    fn unsent_frames_are_not_released_by_an_ack() {
        let mut o = Outbox::new(Limits::default());
        push(&mut o, &env("1"));
        // Not written yet (reconnecting): an ack for the same id from an
        // earlier life of the session does not drop it.
        assert_eq!(o.ack("1"), 0);
        assert_eq!(flush(&mut o), vec![env("1")]);
    }

    #[test]
    fn a_binary_frame_joins_its_upload_header() {
        let mut o = Outbox::new(Limits::default());
        push(
            &mut o,
            r#"{"type":"file_upload","payload":{"filename":"a","size":3},"id":"u1"}"#,
        );
        o.push_binary(binary(3), 3).unwrap();
        assert_eq!(flush(&mut o).len(), 2);
        assert_eq!(o.rewind(), 2, "header and body are resent together");
        assert_eq!(flush(&mut o)[1], "bin:3");
        assert_eq!(o.ack("u1"), 2);
        assert!(o.is_empty());
        // A binary frame after an untracked text frame is untracked.
        push(
            &mut o,
            r#"{"type":"file_upload","payload":{"filename":"a","size":1}}"#,
        );
        o.push_binary(binary(1), 1).unwrap();
        flush(&mut o);
        assert!(o.is_empty());
        // After its header was acked, a stray binary frame is not tracked.
        push(&mut o, &env("5"));
        flush(&mut o);
        o.ack("5");
        o.push_binary(binary(1), 1).unwrap();
        flush(&mut o);
        assert!(o.is_empty());
    }

    #[test]
    fn an_untracked_frame_passes_only_when_nothing_waits_before_it() {
        let mut o = Outbox::new(Limits::default());
        assert!(o.pass_through(), "empty");
        push(&mut o, &env("1"));
        assert!(!o.pass_through(), "it would overtake frame 1");
        flush(&mut o);
        assert!(o.pass_through(), "frame 1 written: only its ack is awaited");
        assert_eq!(o.rewind(), 1);
        assert!(!o.pass_through(), "frame 1 is to be resent first");
        flush(&mut o);

        // Passing ends the open upload: the binary frame after it is not
        // part of message 2.
        push(
            &mut o,
            r#"{"type":"file_upload","payload":{"filename":"a","size":1},"id":"2"}"#,
        );
        flush(&mut o);
        assert!(o.pass_through());
        o.push_binary(binary(1), 1).unwrap();
        flush(&mut o);
        assert_eq!(o.ack("2"), 1, "only the header was tracked");
        assert_eq!(o.ack("1"), 1);
        assert!(o.is_empty());
    }

    #[test]
    fn bounds_refuse_the_frame_that_would_exceed_them() {
        let mut o = Outbox::new(Limits {
            max_messages: 2,
            max_bytes: 1000,
        });
        push(&mut o, &env("1"));
        push(&mut o, &env("2"));
        let e = o
            .push_text(text(&env("3")), env("3").len(), Some("3"))
            .unwrap_err();
        assert!(matches!(e, Error::BacklogFull { messages: 2, .. }));
        flush(&mut o);
        o.ack("1");
        push(&mut o, &env("3"));

        let mut o = Outbox::new(Limits {
            max_messages: 10,
            max_bytes: 100,
        });
        o.push_binary(binary(60), 60).unwrap();
        assert!(o.push_binary(binary(60), 60).is_err());
        // Untracked frames count only until written.
        flush(&mut o);
        o.push_binary(binary(60), 60).unwrap();
    }
}
