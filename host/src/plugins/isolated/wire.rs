//! The framing between the host and a plugin's child process (see the
//! module doc of [`super`] for the layout): encoding into a buffer, and
//! reading whole frames off a pipe.

use std::io::{self, Read};

use llm_host_plugin_api::Usage;

/// The largest frame either side accepts (a request carries a session's
/// whole history).
pub const MAX_FRAME: usize = 256 * 1024 * 1024;

/// Frame kinds, host to child.
pub mod to_child {
    /// plugin, file, staged, hash, base_dir, settings, u64 memory limit in
    /// bytes (0: none): set the limit, load the plugin, build the adapter.
    pub const INIT: u8 = 1;
    /// request: run a turn.
    pub const GENERATE: u8 = 2;
    /// (nothing): stop the turn.
    pub const CANCEL: u8 = 3;
    /// u64: events of the turn the host has taken so far.
    pub const ACK: u8 = 4;
    /// As INIT, for a store: build the store adapter.
    pub const INIT_STORE: u8 = 5;
    /// id: a store's `load` (the frame's id is the call's).
    pub const LOAD: u8 = 8;
    /// id, u64 expected version, owner, data: a store's `save`.
    pub const SAVE: u8 = 9;
    /// id: a store's `delete`.
    pub const DELETE: u8 = 10;
    /// owner, after, u64 limit: a store's `list`.
    pub const LIST: u8 = 11;
    /// (nothing): a store's `ping`.
    pub const PING: u8 = 12;
}

/// Frame kinds, child to host.
pub mod to_host {
    /// name: the adapter is built; turns may come.
    pub const READY: u8 = 16;
    /// message: the plugin could not be loaded, or refused its settings.
    pub const REFUSED: u8 = 17;
    /// id, model_id.
    pub const START: u8 = 32;
    /// text.
    pub const TEXT: u8 = 33;
    /// text.
    pub const REASONING: u8 = 34;
    /// id, name, arguments.
    pub const TOOL_CALL: u8 = 35;
    /// u64 input, u64 output, u64 total.
    pub const USAGE: u8 = 36;
    /// u8 finish reason.
    pub const END: u8 = 37;
    /// code, message.
    pub const ERROR: u8 = 38;
    /// level, message, data (JSON).
    pub const DIAGNOSTIC: u8 = 39;
    /// (nothing): `generate` returned Ok.
    pub const DONE: u8 = 48;
    /// code, message: `generate` (or a store call) returned this error.
    pub const FAILED: u8 = 49;
    /// u8 found (0: none, then nothing follows), u64 version, owner, data:
    /// `load` answered.
    pub const LOADED: u8 = 64;
    /// u8 outcome (0: saved, 1: conflict), u64 version (saved: the new one;
    /// conflict: the current one): `save` answered.
    pub const SAVED: u8 = 65;
    /// u8 existed: `delete` answered.
    pub const DELETED: u8 = 66;
    /// u64 count, that many ids, u8 more (1: a next id follows): `list`
    /// answered.
    pub const LISTED: u8 = 67;
    /// (nothing): `ping` answered Ok.
    pub const PONG: u8 = 68;

    /// Whether a frame of `kind` answers a store call.
    pub fn is_store_reply(kind: u8) -> bool {
        (LOADED..=PONG).contains(&kind)
    }
}

/// Writes frames into a buffer: `begin`, fields, `finish`.
#[derive(Default)]
pub struct Encoder {
    /// The frames written so far.
    pub buf: Vec<u8>,
    start: usize,
}

impl Encoder {
    /// Starts a frame of `kind` for `turn`.
    pub fn begin(&mut self, kind: u8, turn: u64) -> &mut Self {
        self.start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.push(kind);
        self.buf.extend_from_slice(&turn.to_le_bytes());
        self
    }

    /// A string field.
    pub fn str(&mut self, text: &str) -> &mut Self {
        // A field longer than 4 GiB is cut; MAX_FRAME refuses it anyway.
        let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&text.as_bytes()[..len as usize]);
        self
    }

    /// A number field.
    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// A byte field.
    pub fn u8(&mut self, value: u8) -> &mut Self {
        self.buf.push(value);
        self
    }

    /// Ends the frame: writes its length.
    pub fn finish(&mut self) {
        let len = (self.buf.len() - self.start - 4) as u32;
        self.buf[self.start..self.start + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// One frame read: its kind, its turn and its fields, read in order.
#[derive(Debug)]
pub struct Frame {
    /// The frame's kind.
    pub kind: u8,
    /// The turn it belongs to (0: none).
    pub turn: u64,
    body: Vec<u8>,
    at: usize,
}

impl Frame {
    /// Reads the next frame; `Ok(None)` at the end of the stream.
    pub fn read(from: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut len = [0; 4];
        match from.read_exact(&mut len) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(err) => return Err(err),
        }
        let len = u32::from_le_bytes(len) as usize;
        if !(9..=MAX_FRAME).contains(&len) {
            return Err(bad(format!("a frame of {len} bytes")));
        }
        let mut body = vec![0; len];
        from.read_exact(&mut body)?;
        let mut turn = [0; 8];
        turn.copy_from_slice(&body[1..9]);
        Ok(Some(Frame {
            kind: body[0],
            turn: u64::from_le_bytes(turn),
            body,
            at: 9,
        }))
    }

    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.body.len());
        let end = end.ok_or_else(|| bad(format!("frame kind {} is cut short", self.kind)))?;
        let bytes = &self.body[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    /// The next string field.
    pub fn str(&mut self) -> io::Result<String> {
        let len = self.u32()? as usize;
        let kind = self.kind;
        let bytes = self.take(len)?.to_vec();
        String::from_utf8(bytes).map_err(|_| bad(format!("frame kind {kind}: a string not UTF-8")))
    }

    fn u32(&mut self) -> io::Result<u32> {
        let mut raw = [0; 4];
        raw.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(raw))
    }

    /// The next number field.
    pub fn u64(&mut self) -> io::Result<u64> {
        let mut raw = [0; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(raw))
    }

    /// The next byte field.
    pub fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A model event as the host receives it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `start`.
    Start(String, String),
    /// `text`.
    Text(String),
    /// `reasoning`.
    Reasoning(String),
    /// `tool_call`: id, name, arguments.
    ToolCall(String, String, String),
    /// `usage`.
    Usage(Usage),
    /// `end`, with the finish reason's number.
    End(u8),
    /// `error`: code, message.
    Error(String, String),
    /// `diagnostic`: level, message, data.
    Diagnostic(String, String, String),
}

impl Event {
    /// Reads the event a frame of `frame.kind` carries; `Ok(None)`: the
    /// frame is not an event.
    pub fn read(frame: &mut Frame) -> io::Result<Option<Event>> {
        use to_host::*;
        Ok(Some(match frame.kind {
            START => Event::Start(frame.str()?, frame.str()?),
            TEXT => Event::Text(frame.str()?),
            REASONING => Event::Reasoning(frame.str()?),
            TOOL_CALL => Event::ToolCall(frame.str()?, frame.str()?, frame.str()?),
            USAGE => Event::Usage(Usage {
                input_tokens: frame.u64()?,
                output_tokens: frame.u64()?,
                total_tokens: frame.u64()?,
            }),
            END => Event::End(frame.u8()?),
            ERROR => Event::Error(frame.str()?, frame.str()?),
            DIAGNOSTIC => Event::Diagnostic(frame.str()?, frame.str()?, frame.str()?),
            _ => return Ok(None),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_as_written() {
        let mut enc = Encoder::default();
        enc.begin(to_host::TOOL_CALL, 7)
            .str("call_1")
            .str("search")
            .str("{\"q\":\"é\"}")
            .finish();
        enc.begin(to_host::USAGE, 8).u64(1).u64(2).u64(3).finish();
        enc.begin(to_host::DONE, 9).finish();
        let mut input = &enc.buf[..];
        let mut first = Frame::read(&mut input).expect("read").expect("a frame");
        assert_eq!(first.turn, 7);
        assert_eq!(
            Event::read(&mut first).expect("event"),
            Some(Event::ToolCall(
                "call_1".into(),
                "search".into(),
                "{\"q\":\"é\"}".into()
            ))
        );
        let mut second = Frame::read(&mut input).expect("read").expect("a frame");
        assert!(matches!(
            Event::read(&mut second).expect("event"),
            Some(Event::Usage(Usage {
                total_tokens: 3,
                ..
            }))
        ));
        let mut third = Frame::read(&mut input).expect("read").expect("a frame");
        assert_eq!((third.kind, third.turn), (to_host::DONE, 9));
        assert!(Event::read(&mut third).expect("not an event").is_none());
        assert!(Frame::read(&mut input).expect("end").is_none());
    }

    #[test]
    fn a_short_frame_is_an_error() {
        let mut enc = Encoder::default();
        enc.begin(to_host::TEXT, 1).u8(3).finish();
        let mut input = &enc.buf[..];
        let mut frame = Frame::read(&mut input).expect("read").expect("a frame");
        assert!(Event::read(&mut frame).is_err());
    }
}
