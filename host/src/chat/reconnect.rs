//! What the chat does when its socket drops: it reconnects with backoff
//! (for [`RECONNECT_FOR`]) to the same session and backend, asking with
//! `?since=N` for the frames after the last numbered one it received, so
//! that a turn that was streaming (it runs on at the host for
//! `server.reconnect_grace_secs`) goes on being shown where it stopped and
//! ends as it would have. A connection the host closed for idleness is
//! reopened at the next prompt instead.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::connection::{connect, ConnectError, Link};
use super::frames::Event;
use super::input::DEFAULT_URL;
use super::{Chat, State};

/// How long the chat tries to reconnect a dropped socket before it gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// The longest pause between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Chat {
    /// The socket closed (or a send failed): reconnect, unless the host
    /// closed it for a reason a reconnection cannot mend. A turn that was
    /// streaming runs on at the host (server.reconnect_grace_secs) and is
    /// followed again once reconnected; prompts queued behind it on this
    /// socket were dropped with it.
    pub(super) fn lost(&mut self, reason: &str, code: Option<u16>) -> Option<ExitCode> {
        self.cancelling = false;
        // 1008: the key was revoked; 1011: the stored session does not parse.
        let fatal = matches!(code, Some(1008 | 1011));
        let running = usize::from(self.in_turn && !fatal && !self.idle_closed);
        if self.pending.len() > running {
            let lost = self.pending.len() - running;
            self.screen.error(&if running > 0 {
                format!(
                    "the connection dropped: {lost} prompt(s) queued behind the running turn \
                     were not run"
                )
            } else {
                format!(
                    "the connection dropped during a turn: {lost} prompt(s) got no complete answer"
                )
            });
            self.pending.truncate(running);
        }
        if running == 0 {
            self.in_turn = false;
        }
        if let (true, Some(code)) = (fatal, code) {
            self.screen.error(&format!("{reason} ({code})"));
            return Some(ExitCode::FAILURE);
        }
        if std::mem::take(&mut self.idle_closed) {
            self.state = State::Dormant;
            self.screen
                .note("the host closed the idle connection; the next prompt reopens it");
            return None;
        }
        self.screen
            .note(&format!("connection lost ({reason}); reconnecting"));
        self.reconnect(Instant::now(), 0);
        None
    }

    /// Starts attempt `attempt` to reconnect (after a pause that doubles
    /// with each attempt) to the same session and backend.
    pub(super) fn reconnect(&mut self, since: Instant, attempt: u32) {
        let pause = match attempt {
            0 => Duration::ZERO,
            n => (Duration::from_millis(100) * 2u32.saturating_pow(n - 1)).min(MAX_BACKOFF),
        };
        let endpoint = self.endpoint.clone();
        let key = self.key.clone();
        let session = self.session.clone();
        let model = self.model.clone();
        let last = self.last_sequence;
        self.state = State::Reconnecting {
            since,
            attempt,
            connecting: Box::pin(async move {
                tokio::time::sleep(pause).await;
                connect(
                    &endpoint,
                    key.as_deref(),
                    session.as_deref(),
                    model.as_deref(),
                    Some(last),
                )
                .await
            }),
        };
    }

    pub(super) async fn reconnected(
        &mut self,
        result: Result<(Link, Event), ConnectError>,
    ) -> Option<ExitCode> {
        let State::Reconnecting { since, attempt, .. } = self.state else {
            return None;
        };
        match result {
            Ok((link, open)) => {
                self.state = State::Up(link);
                let had_history = self.stored;
                let resumed = matches!(open, Event::Open { resumed: true, .. });
                // Not resumed while the first turn of a new session runs is
                // as it should be (the store has it once the turn ended);
                // not resumed after that, the host lost the session.
                let gone = had_history && !resumed;
                self.opened(&open, "reconnected: ", gone);
                if gone {
                    self.screen
                        .note("the host no longer had this session: its history is gone");
                    if !self.pending.is_empty() {
                        self.screen.error(&format!(
                            "the turn was lost with the session: {} prompt(s) got no complete \
                             answer",
                            self.pending.len()
                        ));
                        self.pending.clear();
                    }
                }
                self.flush().await
            }
            Err(ConnectError::Unreachable(_)) if since.elapsed() < RECONNECT_FOR => {
                self.reconnect(since, attempt + 1);
                None
            }
            Err(err) => {
                self.screen.error(&format!("cannot reconnect: {err}"));
                if let Some(session) = &self.session {
                    let url = self.endpoint.url(None, None);
                    let flag = if url == DEFAULT_URL {
                        String::new()
                    } else {
                        format!(" --url {url}")
                    };
                    self.screen.note(&format!(
                        "resume later with: llm-host chat{flag} --session {session}"
                    ));
                }
                Some(ExitCode::FAILURE)
            }
        }
    }
}
