//! Turning token pieces into the text events of a turn: UTF-8 that may be
//! split across tokens, and stop sequences that must not be emitted.

use encoding_rs::{CoderResult, Decoder, UTF_8};

/// Decodes a stream of token pieces (raw bytes) into text, keeping the bytes
/// of a character split across tokens until the rest arrives. This is the
/// streaming decoder llama-cpp-2 documents for `token_to_piece_into`.
pub struct Utf8Stream {
    decoder: Decoder,
}

impl Default for Utf8Stream {
    fn default() -> Self {
        Self::new()
    }
}

impl Utf8Stream {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self {
            decoder: UTF_8.new_decoder_without_bom_handling(),
        }
    }

    /// Appends the text that `bytes` completes to `out`. Bytes of an
    /// unfinished character stay buffered; invalid bytes become U+FFFD.
    pub fn push(&mut self, bytes: &[u8], out: &mut String) {
        self.decode(bytes, out, false);
    }

    /// Appends what is still buffered (an unfinished character becomes
    /// U+FFFD). The decoder must not be used afterwards.
    pub fn finish(&mut self, out: &mut String) {
        self.decode(&[], out, true);
    }

    fn decode(&mut self, mut bytes: &[u8], out: &mut String, last: bool) {
        loop {
            let room = self
                .decoder
                .max_utf8_buffer_length(bytes.len())
                .unwrap_or(bytes.len().saturating_mul(3).saturating_add(16));
            out.reserve(room);
            let (result, read, _) = self.decoder.decode_to_string(bytes, out, last);
            bytes = bytes.get(read..).unwrap_or_default();
            if result == CoderResult::InputEmpty {
                return;
            }
        }
    }
}

/// What [`StopText::push`] lets through.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Text safe to emit (possibly empty: it may be the start of a stop sequence).
    Text(String),
    /// A stop sequence completed: emit this text before it, then end the turn.
    Stopped(String),
}

/// Holds back generated text that might be the start of a stop sequence, so
/// that a stop sequence is never emitted, not even in part.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    held: String,
}

impl StopText {
    /// A filter for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds newly generated `text`; answers what can be emitted now.
    pub fn push(&mut self, text: &str) -> Pushed {
        if self.stops.is_empty() {
            return Pushed::Text(text.to_owned());
        }
        self.held.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_stop {
            let mut before = std::mem::take(&mut self.held);
            before.truncate(at);
            return Pushed::Stopped(before);
        }
        // Hold back the longest tail that could still grow into a stop
        // sequence: from the first position where the rest is a prefix of one.
        // Text before it can never be part of a stop, so it goes out now.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(keep_from);
        Pushed::Text(std::mem::replace(&mut self.held, rest))
    }

    /// The text still held back, for when generation ends without completing
    /// a stop sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_pieces(pieces: &[&[u8]]) -> Vec<String> {
        let mut stream = Utf8Stream::new();
        let mut out = Vec::new();
        for piece in pieces {
            let mut text = String::new();
            stream.push(piece, &mut text);
            out.push(text);
        }
        let mut text = String::new();
        stream.finish(&mut text);
        out.push(text);
        out
    }

    #[test]
    fn characters_split_across_pieces_come_out_whole() {
        let crab = "🦀".as_bytes(); // 4 bytes
        let e = "é".as_bytes(); // 2 bytes
        assert_eq!(
            decode_pieces(&[
                b"a",
                &crab[..1],
                &crab[1..3],
                &crab[3..],
                &e[..1],
                &[e[1], b'!']
            ]),
            ["a", "", "", "🦀", "", "é!", ""]
        );
    }

    #[test]
    fn invalid_and_unfinished_bytes_become_replacement_characters() {
        assert_eq!(
            decode_pieces(&[b"x\xff", &"é".as_bytes()[..1]]),
            ["x\u{fffd}", "", "\u{fffd}"]
        );
    }

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut filter = StopText::new(&stops);
        let mut emitted = String::new();
        for piece in pieces {
            match filter.push(piece) {
                Pushed::Text(text) => emitted.push_str(&text),
                Pushed::Stopped(text) => {
                    emitted.push_str(&text);
                    return (emitted, true, filter.finish());
                }
            }
        }
        let rest = filter.finish();
        (emitted, false, rest)
    }

    #[test]
    fn without_stop_sequences_everything_passes() {
        assert_eq!(
            run(&[], &["Hello", " world"]),
            ("Hello world".into(), false, "".into())
        );
    }

    #[test]
    fn a_stop_sequence_split_across_pieces_is_never_emitted() {
        assert_eq!(
            run(&["\nUser:"], &["Hi", " there\n", "Us", "er:", " more"]),
            ("Hi there".into(), true, "".into())
        );
    }

    #[test]
    fn text_after_the_stop_in_the_same_piece_is_dropped() {
        assert_eq!(
            run(&["END"], &["one two EN", "D three"]),
            ("one two ".into(), true, "".into())
        );
    }

    #[test]
    fn a_false_start_is_released_once_it_cannot_be_a_stop() {
        let stops: Vec<String> = vec!["abc".into()];
        let mut filter = StopText::new(&stops);
        assert_eq!(filter.push("xa"), Pushed::Text("x".into()));
        assert_eq!(filter.push("b"), Pushed::Text("".into()));
        assert_eq!(filter.push("x"), Pushed::Text("abx".into()));
        assert_eq!(filter.push("ab"), Pushed::Text("".into()));
        assert_eq!(filter.finish(), "ab");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_safe() {
        assert_eq!(
            run(&["ü!", "zz", ""], &["grüß ", "ü", "! zz"]),
            ("grüß ".into(), true, "".into())
        );
        assert_eq!(
            run(&["zz"], &["naïve z", "é"]),
            ("naïve zé".into(), false, "".into())
        );
    }
}
