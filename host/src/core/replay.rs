//! Replay: the numbered frames of a session's latest turn, kept so that a
//! client whose socket dropped can ask for what it missed (`?since=N`).
//!
//! A running turn records each numbered frame it sends into its
//! [`TurnControl`](super::sink::TurnControl)'s [`FrameLog`] (a bounded
//! ring of the last `server.replay_frames`), which clients joining the turn
//! on this host read. The turn's save writes the log, its end frame
//! included, into the session document ([`StoredFrames`]), so the store
//! keeps the frames of the session's latest turn for clients of any host;
//! a lease renewal on a shared store writes the frames sent so far.
//!
//! Only numbered frames are kept: diagnostics outside a turn's numbers
//! (stamped with the last number sent) are not replayed. Saving costs what
//! the turn sent, not what the session holds: the log is the latest turn's.

use std::collections::VecDeque;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::ports::Frames;
use super::sink::TurnControl;

/// A turn's numbered frames, the last `limit` of them, in order.
#[derive(Debug, Default)]
pub struct FrameLog {
    /// The sequence number of `frames[0]`.
    first: u64,
    frames: VecDeque<Bytes>,
}

impl FrameLog {
    /// Records `frames`, numbered consecutively through `through`, keeping
    /// at most `limit` frames (the oldest go first).
    pub fn record(&mut self, frames: &[Bytes], through: u64, limit: usize) {
        if limit == 0 || frames.is_empty() {
            return;
        }
        let start = through + 1 - frames.len() as u64;
        // Numbers that do not follow the log's (a turn that took over
        // another's reservation) start it again.
        if self.frames.is_empty() || self.first + self.frames.len() as u64 != start {
            self.frames.clear();
            self.first = start;
        }
        self.frames.extend(frames.iter().cloned());
        while self.frames.len() > limit {
            self.frames.pop_front();
            self.first += 1;
        }
    }

    /// The last sequence number recorded, if any.
    pub fn last(&self) -> Option<u64> {
        (!self.frames.is_empty()).then(|| self.first + self.frames.len() as u64 - 1)
    }

    /// The first sequence number kept, if any.
    pub fn first(&self) -> Option<u64> {
        (!self.frames.is_empty()).then_some(self.first)
    }

    /// The frames numbered after `since`, with their numbers.
    pub fn since(&self, since: u64) -> Vec<(u64, Bytes)> {
        (self.first..)
            .zip(self.frames.iter())
            .filter(|(sequence, _)| *sequence > since)
            .map(|(sequence, frame)| (sequence, frame.clone()))
            .collect()
    }

    /// The log as the session document keeps it, with `end` (the turn's
    /// end frame, numbered after the last recorded) added, within `limit`.
    pub fn stored(&self, end: Option<(u64, &Bytes)>, limit: usize) -> Option<StoredFrames> {
        if limit == 0 {
            return None;
        }
        let mut frames: Vec<&Bytes> = self.frames.iter().collect();
        let mut first = self.first;
        if let Some((sequence, frame)) = end {
            if self.last().is_some_and(|last| last + 1 == sequence) {
                frames.push(frame);
            } else {
                frames = vec![frame];
                first = sequence;
            }
        }
        let skip = frames.len().saturating_sub(limit);
        StoredFrames::new(first + skip as u64, &frames[skip..])
    }
}

/// The frames of a session's latest turn as its document keeps them:
/// `frames` is a JSON array of the frames as they were sent, numbered from
/// `first`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StoredFrames {
    /// The sequence number of the first frame.
    pub first: u64,
    /// `[frame, frame, ...]`, each the JSON text the client was sent.
    pub frames: Box<RawValue>,
}

impl PartialEq for StoredFrames {
    fn eq(&self, other: &Self) -> bool {
        self.first == other.first && self.frames.get() == other.frames.get()
    }
}

impl StoredFrames {
    /// `frames` (JSON objects) numbered from `first`; none if there are
    /// none, or one is not JSON text.
    pub fn new(first: u64, frames: &[&Bytes]) -> Option<Self> {
        if frames.is_empty() {
            return None;
        }
        let size = frames.iter().map(|frame| frame.len() + 1).sum::<usize>() + 1;
        let mut text = String::with_capacity(size);
        text.push('[');
        for (at, frame) in frames.iter().enumerate() {
            if at > 0 {
                text.push(',');
            }
            text.push_str(std::str::from_utf8(frame).ok()?);
        }
        text.push(']');
        let frames = RawValue::from_string(text).ok()?;
        Some(Self { first, frames })
    }

    /// The frames numbered after `since`, with their numbers. A document
    /// whose frames are not an array gives none.
    pub fn since(&self, since: u64) -> Vec<(u64, Bytes)> {
        let Ok(frames) = serde_json::from_str::<Vec<&RawValue>>(self.frames.get()) else {
            return Vec::new();
        };
        (self.first..)
            .zip(frames)
            .filter(|(sequence, _)| *sequence > since)
            .map(|(sequence, frame)| (sequence, Bytes::copy_from_slice(frame.get().as_bytes())))
            .collect()
    }

    /// The last sequence number kept.
    pub fn last(&self) -> u64 {
        let count = serde_json::from_str::<Vec<&RawValue>>(self.frames.get())
            .map_or(0, |frames| frames.len() as u64);
        (self.first + count).saturating_sub(1)
    }
}

/// What a client asking for the frames after `since` can have, from the
/// stored log of the latest saved turn and the log of a turn running here.
#[derive(Debug, Default)]
pub struct Replay {
    /// The frames to send, in order, each once.
    pub frames: Vec<(u64, Bytes)>,
    /// When frames after `since` are no longer kept: the first number the
    /// client can have.
    pub gap: Option<u64>,
}

impl Replay {
    /// The frames after `since` of a session whose last saved number is
    /// `saved_last`, from `stored` (the latest saved turn's) and `running`
    /// (a turn running now, numbered after it).
    pub fn after(
        since: u64,
        saved_last: u64,
        stored: Option<&StoredFrames>,
        running: Option<&FrameLog>,
    ) -> Replay {
        let running_first = running.and_then(FrameLog::first);
        let mut frames: Vec<(u64, Bytes)> =
            stored.map(|stored| stored.since(since)).unwrap_or_default();
        if let Some(first) = running_first {
            frames.retain(|(sequence, _)| *sequence < first);
        }
        if let Some(running) = running {
            let after = frames.last().map_or(since, |(sequence, _)| *sequence);
            frames.extend(running.since(after.max(since)));
        }
        // Frames missing between the stored turn and the running one (more
        // than either log keeps): only those after the hole are sent.
        if let Some(hole) = (1..frames.len())
            .rev()
            .find(|&at| frames[at].0 != frames[at - 1].0 + 1)
        {
            frames.drain(..hole);
        }
        let newest = frames
            .last()
            .map_or(saved_last, |(sequence, _)| (*sequence).max(saved_last));
        let gap = match frames.first() {
            Some((first, _)) if *first > since + 1 => Some(*first),
            None if newest > since => Some(newest + 1),
            _ => None,
        };
        Replay { frames, gap }
    }
}

/// A turn's frames port that records every numbered frame into the turn's
/// [`FrameLog`] before passing it on.
pub struct Recorded<'a, F> {
    /// Where the frames go.
    pub inner: &'a F,
    /// The turn, whose log records them.
    pub control: &'a TurnControl,
    /// `server.replay_frames`.
    pub limit: usize,
}

impl<F: Frames> Frames for Recorded<'_, F> {
    async fn send_numbered(&self, frames: &mut Vec<Bytes>, through: u64) -> bool {
        self.control.record(frames, through, self.limit);
        self.inner.send_numbered(frames, through).await
    }

    async fn send_stamped(&self, make: impl FnOnce(u64) -> Bytes + Send) -> bool {
        self.inner.send_stamped(make).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(sequence: u64) -> Bytes {
        Bytes::from(format!(r#"{{"n":{sequence}}}"#))
    }

    fn numbers(frames: &[(u64, Bytes)]) -> Vec<u64> {
        frames.iter().map(|(sequence, _)| *sequence).collect()
    }

    #[test]
    fn a_log_keeps_the_last_frames_in_order() {
        let mut log = FrameLog::default();
        log.record(&[frame(1), frame(2)], 2, 3);
        log.record(&[frame(3), frame(4)], 4, 3);
        assert_eq!((log.first(), log.last()), (Some(2), Some(4)));
        assert_eq!(numbers(&log.since(2)), vec![3, 4]);
        assert_eq!(log.since(3)[0].1, frame(4));
        // A jump in the numbers starts the log again.
        log.record(&[frame(10)], 10, 3);
        assert_eq!(numbers(&log.since(0)), vec![10]);
    }

    #[test]
    fn the_stored_log_holds_the_end_frame_and_reads_back() {
        let mut log = FrameLog::default();
        log.record(&[frame(5), frame(6), frame(7)], 7, 3);
        let stored = log.stored(Some((8, &frame(8))), 3).expect("stored");
        assert_eq!((stored.first, stored.last()), (6, 8));
        let json = serde_json::to_string(&stored).expect("writes");
        let back: StoredFrames = serde_json::from_str(&json).expect("reads");
        assert_eq!(back, stored);
        assert_eq!(numbers(&back.since(6)), vec![7, 8]);
        assert_eq!(back.since(7)[0].1, frame(8));
        assert!(log.stored(None, 0).is_none());
    }

    #[test]
    fn replay_joins_the_stored_and_the_running_turn_once_each() {
        let mut earlier = FrameLog::default();
        earlier.record(&[frame(1), frame(2)], 2, 10);
        let stored = earlier.stored(Some((3, &frame(3))), 10);
        let mut running = FrameLog::default();
        running.record(&[frame(4), frame(5)], 5, 10);
        let replay = Replay::after(1, 3, stored.as_ref(), Some(&running));
        assert_eq!(numbers(&replay.frames), vec![2, 3, 4, 5]);
        assert_eq!(replay.gap, None);
        // A renewal may have stored part of the running turn already.
        let partial = running.stored(None, 10);
        let replay = Replay::after(3, 3, partial.as_ref(), Some(&running));
        assert_eq!(numbers(&replay.frames), vec![4, 5]);
        // Asked from before what is kept: a gap naming the first kept.
        let replay = Replay::after(0, 3, stored.as_ref(), None);
        assert_eq!(numbers(&replay.frames), vec![1, 2, 3]);
        let replay = Replay::after(0, 9, partial.as_ref(), None);
        assert_eq!(replay.gap, Some(4));
        // A hole between the stored turn and the running one: a gap, and
        // only what follows it.
        let mut late = FrameLog::default();
        late.record(&[frame(9), frame(10)], 10, 10);
        let replay = Replay::after(1, 3, stored.as_ref(), Some(&late));
        assert_eq!(numbers(&replay.frames), vec![9, 10]);
        assert_eq!(replay.gap, Some(9));
        // Nothing kept, and numbers were sent since: all of them are gone.
        assert_eq!(Replay::after(2, 7, None, None).gap, Some(8));
        assert_eq!(Replay::after(7, 7, None, None).gap, None);
    }
}
