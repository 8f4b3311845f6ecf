//! The decoder on whole streams, on streams cut at every byte, and on
//! streams whose lines or events go past the bounds.

use llm_host_plugin_api::codes;
use proptest::prelude::*;

use super::*;

fn event(event: &str, data: &str) -> Frame {
    Frame::Event {
        event: event.to_owned(),
        data: data.to_owned(),
    }
}

/// Decodes `pieces` in order, then the end of the body.
fn decode_pieces<'p>(
    mut decoder: Decoder,
    pieces: impl IntoIterator<Item = &'p [u8]>,
) -> Result<Vec<Frame>, ProviderError> {
    let mut out = Vec::new();
    for piece in pieces {
        decoder.feed(piece, &mut out)?;
    }
    decoder.finish(&mut out)?;
    Ok(out)
}

fn decode_in_pieces(framing: Framing, body: &[u8], piece: usize) -> Vec<Frame> {
    decode_pieces(Decoder::new(framing, "P"), body.chunks(piece)).expect("valid stream")
}

/// `body` cut in two at every byte, decoded with `limit`: every cut must
/// give `want`.
fn assert_every_cut(
    framing: Framing,
    limit: usize,
    body: &[u8],
    want: &Result<Vec<Frame>, String>,
) {
    for cut in 0..=body.len() {
        let (head, tail) = body.split_at(cut);
        let got = decode_pieces(Decoder::with_limit(framing, "P", limit), [head, tail])
            .map_err(|err| format!("{}: {}", err.code, err.message));
        assert_eq!(&got, want, "cut at {cut}");
    }
}

#[test]
fn sse_events_survive_any_split() {
    let body = "\u{feff}: keep-alive\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\n\
                data: one\ndata: two\n\nretry: 10\nid: 7\ndata:no-space\n\n\
                data: é\r\r";
    let want = vec![
        event("message_start", "{\"a\":1}"),
        event("message", "one\ntwo"),
        event("message", "no-space"),
        event("message", "é"),
    ];
    for piece in 1..body.len() {
        assert_eq!(
            decode_in_pieces(Framing::Sse, body.as_bytes(), piece),
            want,
            "piece {piece}"
        );
    }
    assert_every_cut(Framing::Sse, MAX_EVENT_BYTES, body.as_bytes(), &Ok(want));
}

#[test]
fn sse_at_eof_keeps_whole_lines_and_drops_a_cut_one() {
    assert_eq!(
        decode_in_pieces(Framing::Sse, b"data: [DONE]\n", 4),
        vec![event("message", "[DONE]")]
    );
    assert_eq!(
        decode_in_pieces(Framing::Sse, b"data: {\"a\":1}\n\ndata: {\"b\"", 4),
        vec![event("message", "{\"a\":1}")]
    );
}

#[test]
fn ndjson_lines_and_a_whole_last_line() {
    let body = b"{\"a\":1}\n\n{\"b\":2}\r\n{\"c\":3}";
    let want = vec![
        Frame::Line("{\"a\":1}".into()),
        Frame::Line("{\"b\":2}".into()),
        Frame::Line("{\"c\":3}".into()),
    ];
    for piece in 1..body.len() {
        assert_eq!(decode_in_pieces(Framing::Ndjson, body, piece), want);
    }
    assert_every_cut(Framing::Ndjson, MAX_EVENT_BYTES, body, &Ok(want));
    assert_eq!(
        decode_in_pieces(Framing::Ndjson, b"{\"a\":1}\n{\"b\":", 3),
        vec![Frame::Line("{\"a\":1}".into())]
    );
}

#[test]
fn invalid_utf8_is_a_bad_response() {
    let mut decoder = Decoder::new(Framing::Sse, "P");
    let err = decoder
        .feed(b"data: \xff\xfe\n\n", &mut Vec::new())
        .expect_err("not UTF-8");
    assert_eq!(err.code, codes::BAD_RESPONSE);
}

/// `lines` data lines of `width` bytes each, as one SSE event.
fn sse_event_of(lines: usize, width: usize) -> (Vec<u8>, String) {
    let line = "x".repeat(width);
    let mut body = Vec::new();
    for _ in 0..lines {
        body.extend_from_slice(format!("data: {line}\n").as_bytes());
    }
    body.extend_from_slice(b"\n");
    (body, vec![line; lines].join("\n"))
}

#[test]
fn an_sse_event_is_bounded_to_the_byte_at_every_cut() {
    // 12 lines of 9 bytes joined by 11 newlines: 119 bytes of data.
    let (body, data) = sse_event_of(12, 9);
    assert_eq!(data.len(), 119);
    let too_large = Err(format!(
        "bad_response: {}",
        frame_too_large("P", "stream event", 118).message
    ));
    assert_every_cut(Framing::Sse, 119, &body, &Ok(vec![event("message", &data)]));
    assert_every_cut(Framing::Sse, 118, &body, &too_large);
    // The bound is per event: many events of the limit's size pass.
    let many = body.repeat(5);
    let want = Ok(vec![event("message", &data); 5]);
    assert_every_cut(Framing::Sse, 119, &many, &want);
}

#[test]
fn a_line_is_bounded_to_the_byte_at_every_cut() {
    let line = format!("{{\"a\":\"{}\"}}", "y".repeat(40));
    let body = format!("{line}\n{line}\n");
    let want = Ok(vec![Frame::Line(line.clone()); 2]);
    assert_every_cut(Framing::Ndjson, line.len(), body.as_bytes(), &want);
    let too_large = Err(format!(
        "bad_response: {}",
        frame_too_large("P", "stream line", line.len() - 1).message
    ));
    assert_every_cut(Framing::Ndjson, line.len() - 1, body.as_bytes(), &too_large);
    // An SSE line (a comment, which adds nothing to the event) too.
    let comment = format!(": {}\n\n", "z".repeat(50));
    let too_large = Err(format!(
        "bad_response: {}",
        frame_too_large("P", "stream line", 40).message
    ));
    assert_every_cut(Framing::Sse, 40, comment.as_bytes(), &too_large);
}

/// Feeds `decoder` the pieces `next` makes until it fails; answers the
/// error and how many bytes went in. Panics past `give_up` bytes.
fn feed_until_error(
    decoder: &mut Decoder,
    give_up: usize,
    mut next: impl FnMut() -> Vec<u8>,
) -> (ProviderError, usize) {
    let mut fed = 0;
    let mut out = Vec::new();
    while fed <= give_up {
        let piece = next();
        fed += piece.len();
        if let Err(err) = decoder.feed(&piece, &mut out) {
            assert!(out.is_empty(), "no frame came: {out:?}");
            return (err, fed);
        }
        assert!(decoder.data.len() <= MAX_EVENT_BYTES);
        assert!(decoder.pending.len() <= MAX_EVENT_BYTES + piece.len());
    }
    panic!("{fed} bytes went in without an error");
}

#[test]
fn an_endless_sse_event_fails_once_past_the_bound() {
    // `data:` lines forever and never the blank line that ends the event,
    // in pieces of the size the connection thread reads.
    let line = "data: {\"choices\":[{\"delta\":{\"content\":\"xxxxxxxx\"}}]}\n";
    let piece = line.repeat(300);
    let mut decoder = Decoder::new(Framing::Sse, "OpenAI");
    let (err, fed) = feed_until_error(&mut decoder, 2 * MAX_EVENT_BYTES, || {
        piece.as_bytes().to_vec()
    });
    assert_eq!(err.code, codes::BAD_RESPONSE);
    assert_eq!(
        err.message,
        "OpenAI sent a stream event larger than 8 MiB (8388608 bytes), the most one may have; \
         the stream was dropped"
    );
    // It failed within a piece of the bound: each line adds its length
    // less `data: ` to the event.
    let bound = MAX_EVENT_BYTES / (line.len() - 6) * line.len() + piece.len();
    assert!(fed <= bound, "{fed} > {bound}");
}

#[test]
fn an_endless_line_fails_once_past_the_bound() {
    for (framing, start) in [
        (Framing::Sse, &b"data: "[..]),
        (Framing::Ndjson, b"{\"a\":\""),
    ] {
        let mut decoder = Decoder::new(framing, "P");
        let mut first = Some(start.to_vec());
        let (err, fed) = feed_until_error(&mut decoder, 2 * MAX_EVENT_BYTES, || {
            first.take().unwrap_or_else(|| vec![b'x'; 16 * 1024])
        });
        assert_eq!(err.code, codes::BAD_RESPONSE, "{framing:?}");
        assert!(
            err.message.contains("stream line larger than 8 MiB"),
            "{}",
            err.message
        );
        assert!(fed <= MAX_EVENT_BYTES + 16 * 1024 + start.len(), "{fed}");
    }
}

#[test]
fn large_but_legal_frames_pass() {
    // Just under the bound: an event of 1 KiB data lines, and one line.
    let lines = MAX_EVENT_BYTES / 1025 - 1;
    let (body, data) = sse_event_of(lines, 1024);
    assert!(data.len() > MAX_EVENT_BYTES - 2048);
    let frames = decode_in_pieces(Framing::Sse, &body, 16 * 1024);
    assert_eq!(frames, [event("message", &data)]);

    let line = format!("{{\"a\":\"{}\"}}", "y".repeat(MAX_EVENT_BYTES - 8));
    assert_eq!(line.len(), MAX_EVENT_BYTES);
    let body = format!("{line}\n{line}\n");
    let frames = decode_in_pieces(Framing::Ndjson, body.as_bytes(), 16 * 1024);
    assert_eq!(frames, [Frame::Line(line.clone()), Frame::Line(line)]);
}

/// One SSE event as a test writes it: a name or none, data lines, a comment
/// among them, and the line end its lines use (one for all: a lone CR
/// followed by the LF of a blank line would be one CRLF).
#[derive(Debug, Clone)]
struct SseEvent {
    name: Option<String>,
    data: Vec<String>,
    comment_after: Option<usize>,
    end: &'static str,
}

fn text() -> impl Strategy<Value = String> {
    // No line ends; any other char, including multi-byte ones.
    proptest::string::string_regex("[a-zA-Z0-9 {}\":,é€😀\\[\\]]{0,12}").expect("a regex")
}

fn sse_event() -> impl Strategy<Value = SseEvent> {
    (
        proptest::option::of("[a-z_]{1,10}"),
        proptest::collection::vec(text(), 1..4),
        proptest::option::of(0usize..4),
        prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
    )
        .prop_map(|(name, data, comment_after, end)| SseEvent {
            name,
            data,
            comment_after,
            end,
        })
}

impl SseEvent {
    fn write(&self, body: &mut String) {
        let end = self.end;
        if let Some(name) = &self.name {
            body.push_str(&format!("event: {name}{end}"));
        }
        for (n, line) in self.data.iter().enumerate() {
            // A leading space is the separator's: write it twice to keep one.
            let sep = if line.starts_with(' ') { ": " } else { ":" };
            body.push_str(&format!("data{sep}{line}{end}"));
            if self.comment_after == Some(n) {
                body.push_str(&format!(": ping{end}"));
            }
        }
        body.push_str(end);
    }

    fn frame(&self) -> Frame {
        event(
            self.name.as_deref().unwrap_or("message"),
            &self.data.join("\n"),
        )
    }
}

/// Cuts `body` at `cuts` (positions, in any order, repeats allowed).
fn cut(body: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    at.sort_unstable();
    let mut pieces = Vec::new();
    let mut from = 0;
    for to in at.into_iter().chain([body.len()]) {
        pieces.push(body[from..to].to_vec());
        from = to;
    }
    pieces
}

proptest! {
    #[test]
    fn sse_streams_decode_the_same_however_they_are_cut(
        events in proptest::collection::vec(sse_event(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut body = String::new();
        for event in &events {
            event.write(&mut body);
        }
        let want: Vec<Frame> = events.iter().map(SseEvent::frame).collect();
        let pieces = cut(body.as_bytes(), &cuts);
        let got = decode_pieces(Decoder::new(Framing::Sse, "P"), pieces.iter().map(Vec::as_slice))
            .map_err(|err| err.message);
        prop_assert_eq!(got, Ok(want));
    }

    #[test]
    fn sse_events_over_the_bound_fail_however_they_are_cut(
        events in proptest::collection::vec(sse_event(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut body = String::new();
        for event in &events {
            event.write(&mut body);
        }
        let largest = events.iter().map(|e| e.data.join("\n").len()).max().unwrap_or(0);
        let pieces = cut(body.as_bytes(), &cuts);
        let decode = |limit| {
            decode_pieces(
                Decoder::with_limit(Framing::Sse, "P", limit),
                pieces.iter().map(Vec::as_slice),
            )
        };
        // Lines are at most 6 + 12 * 4 bytes: only the event bound matters.
        let limit = largest.max(60);
        prop_assert!(decode(limit).is_ok());
        if largest > 60 {
            let err = decode(largest - 1).expect_err("one event is over");
            prop_assert!(err.message.contains("stream event larger than"), "{}", err.message);
        }
    }

    #[test]
    fn ndjson_streams_decode_the_same_however_they_are_cut(
        lines in proptest::collection::vec(text(), 1..8),
        ends in proptest::collection::vec(prop_oneof![Just("\n"), Just("\r\n")], 8),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut body = String::new();
        let mut want = Vec::new();
        for (line, end) in lines.iter().zip(ends.iter().cycle()) {
            let json = serde_json::json!({ "t": line }).to_string();
            body.push_str(&json);
            body.push_str(end);
            want.push(Frame::Line(json));
        }
        let pieces = cut(body.as_bytes(), &cuts);
        let got = decode_pieces(Decoder::new(Framing::Ndjson, "P"), pieces.iter().map(Vec::as_slice))
            .map_err(|err| err.message);
        prop_assert_eq!(got, Ok(want));
    }
}
