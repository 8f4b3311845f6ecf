//! The session document the host keeps in a store, and the JSON text of
//! its history kept beside it so that a turn does not rewrite it.

use llm_host_plugin_api::Message;
use serde::{Deserialize, Serialize};

use super::history::HistorySummary;
use super::ports::{StoreError, Stored};
use super::settings::SessionSettings;

/// Whether `id` is a valid session id or config name: 1-128 characters of
/// `[A-Za-z0-9._:-]`.
pub fn valid_name(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The prefix of the session ids that are the host's own (usage records):
/// clients cannot name them.
pub const RESERVED_PREFIX: &str = "_host:";

/// Whether a client may name session `id`: a valid name (see
/// [`valid_name`]) outside the host's own ids ([`RESERVED_PREFIX`]).
pub fn valid_session_id(id: &str) -> bool {
    valid_name(id) && !id.starts_with(RESERVED_PREFIX)
}

/// A fresh, unguessable session id.
pub fn new_session_id() -> String {
    format!("session-{}", uuid::Uuid::new_v4())
}

/// The document the host keeps in the store for each session.
///
/// Fields are only ever added, with defaults, so older documents still load.
/// `messages` stays the first field (see [`MessagesJson::document`]).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionDoc {
    /// The conversation.
    #[serde(default)]
    pub messages: Vec<Message>,
    /// The last sequence number used.
    #[serde(default)]
    pub last_sequence: u64,
    /// Turns run so far; the next turn is `turn-{turns + 1}`.
    #[serde(default)]
    pub turns: u64,
    /// The claim of the turn running now, if one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The backend the last turn ran on: a client that resumes the session
    /// without naming one goes on with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// What the session's later turns use unless the prompt says otherwise
    /// (`session.update`).
    #[serde(default, skip_serializing_if = "SessionSettings::is_empty")]
    pub settings: SessionSettings,
    /// A summary of the history's oldest messages, sent in their place to a
    /// backend whose history policy summarizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<HistorySummary>,
    /// The numbered frames of the latest turn, for clients that reconnect
    /// asking for what they missed (see [`super::replay`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<super::replay::StoredFrames>,
}

/// A running turn's claim on its session: while it holds, no other host runs
/// a turn of the session (see [`super::claim`]).
///
/// Whether it still holds is never decided by comparing clocks: another host
/// counts the lease's time on its own clock from when it first saw this
/// version of the document, and the holder stops its turn once it has gone
/// too long without a renewal (so clock skew between hosts cannot hand one
/// session to two).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// The host instance running the turn.
    pub holder: String,
    /// The turn's id.
    pub turn: String,
    /// When the holder expects the claim to run out unless renewed, Unix ms
    /// on the holder's clock; for people reading the store, never compared.
    pub expires_ms: u64,
    /// Unique per claim: a save that failed but was applied is recognised as
    /// this claim's by it, and a commit is fenced by it.
    #[serde(default)]
    pub token: String,
    /// The last sequence number the turn may use: a turn that takes over a
    /// lease whose holder died numbers its frames after it, so no number is
    /// ever sent twice on a session.
    #[serde(default)]
    pub reserved: u64,
}

impl SessionDoc {
    /// This document without its messages, which serde_json writes as
    /// `"messages":[]`: the rest of the document's JSON.
    fn shell(&self) -> SessionDoc {
        SessionDoc {
            messages: Vec::new(),
            last_sequence: self.last_sequence,
            turns: self.turns,
            lease: self.lease.clone(),
            model: self.model.clone(),
            settings: self.settings.clone(),
            summary: self.summary.clone(),
            replay: self.replay.clone(),
        }
    }
}

/// A session loaded from the store.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Its document.
    pub doc: SessionDoc,
    /// The version loaded (0: not in the store).
    pub version: u64,
    /// Its owner.
    pub owner: String,
    /// The JSON text of `doc.messages`, when a turn of this host wrote it
    /// (unknown for a document just loaded).
    pub messages_json: MessagesJson,
}

impl Loaded {
    /// Parses a stored session.
    pub fn parse(store: &str, id: &str, stored: Stored) -> Result<Loaded, StoreError> {
        let doc: SessionDoc =
            serde_json::from_str(&stored.data).map_err(|error| StoreError::Unreadable {
                store: store.to_owned(),
                id: id.to_owned(),
                owner: stored.owner.clone(),
                error: error.to_string(),
            })?;
        // The stored text of the messages, when the document is as this host
        // writes it: no rewrite of the whole history for the next request
        // or save.
        let messages_json = MessagesJson::of_document(&doc, &stored.data).unwrap_or_default();
        Ok(Loaded {
            doc,
            version: stored.version,
            owner: stored.owner,
            messages_json,
        })
    }

    /// Whether `stored` holds exactly this session: the same version and
    /// owner, and a document that is this one's JSON byte for byte (see
    /// [`MessagesJson::is_document`]), compared without parsing it.
    pub fn is_stored(&self, stored: &Stored) -> bool {
        self.version == stored.version
            && self.owner == stored.owner
            && self.messages_json.is_document(&self.doc, &stored.data)
    }
}

/// The JSON text of a session's `messages` array, kept next to the messages
/// so that a turn does not write the whole history for each use: a message
/// appended is written once ([`MessagesJson::push`]), and the model request
/// and the session document take the text as it is
/// ([`MessagesJson::splice`], [`MessagesJson::document`]). What they give is
/// byte for byte what serde_json writes for the same value.
///
/// It describes the messages it was built from plus those pushed since; code
/// that replaces the messages (a merge, a load) starts a new, unknown one
/// (`MessagesJson::default()`). An unknown text, or one that does not hold
/// as many messages as it is used with, is rebuilt from the messages.
#[derive(Debug, Clone, Default)]
pub struct MessagesJson {
    /// `[...]`; empty while unknown.
    text: String,
    /// How many messages `text` holds.
    count: usize,
}

/// How serde_json writes an empty `messages` field.
const EMPTY_MESSAGES: &str = "\"messages\":[]";

impl MessagesJson {
    /// The text of `messages`.
    pub fn new(messages: &[Message]) -> serde_json::Result<Self> {
        Ok(Self {
            text: serde_json::to_string(messages)?,
            count: messages.len(),
        })
    }

    /// The size of `messages` as JSON: this text's length when it is known,
    /// else the sum of the messages' contents (a close lower bound).
    pub fn bytes(&self, messages: &[Message]) -> usize {
        if !self.text.is_empty() && self.count == messages.len() {
            self.text.len()
        } else {
            messages.iter().map(|m| m.content.len()).sum()
        }
    }

    /// Appends `message`, just appended to the messages this text describes.
    /// An unknown text stays unknown.
    pub fn push(&mut self, message: &Message) {
        if self.text.is_empty() {
            return;
        }
        match serde_json::to_string(message) {
            Ok(json) => {
                self.text.pop(); // the closing `]`
                if self.count > 0 {
                    self.text.push(',');
                }
                self.text.push_str(&json);
                self.text.push(']');
                self.count += 1;
            }
            // Left to the rebuild, which reports the error.
            Err(_) => *self = Self::default(),
        }
    }

    /// The text for `messages`, rebuilt first if it is unknown or holds
    /// another number of messages.
    fn current(&mut self, messages: &[Message]) -> serde_json::Result<&str> {
        if self.text.is_empty() || self.count != messages.len() {
            *self = Self::new(messages)?;
        }
        Ok(&self.text)
    }

    /// `shell`, serde_json's text of a value whose `messages` field was
    /// written empty, with the text of `messages` in place of its `[]`.
    ///
    /// The first `"messages":[]` in `shell` must be that field: no field
    /// before it may hold an object with one (strings cannot: their quotes
    /// are escaped).
    pub fn splice(&mut self, messages: &[Message], shell: &str) -> serde_json::Result<String> {
        self.splice_headed(messages, shell, None)
    }

    /// Like [`MessagesJson::splice`], with `first` written before the
    /// messages (a system prompt that is not in the history).
    pub fn splice_headed(
        &mut self,
        messages: &[Message],
        shell: &str,
        first: Option<&Message>,
    ) -> serde_json::Result<String> {
        let Some(at) = shell.find(EMPTY_MESSAGES) else {
            return Err(serde::ser::Error::custom(
                "no empty `messages` field to write the messages into",
            ));
        };
        let (head, tail) = shell.split_at(at + EMPTY_MESSAGES.len() - "[]".len());
        let first = first.map(serde_json::to_string).transpose()?;
        let text = self.current(messages)?;
        let extra = first.as_ref().map_or(0, |first| first.len() + 1);
        let mut json = String::with_capacity(shell.len() + text.len() + extra);
        json.push_str(head);
        match &first {
            None => json.push_str(text),
            Some(first) => {
                json.push('[');
                json.push_str(first);
                if messages.is_empty() {
                    json.push(']');
                } else {
                    json.push(',');
                    json.push_str(&text[1..]);
                }
            }
        }
        json.push_str(&tail["[]".len()..]);
        Ok(json)
    }

    /// The JSON of `doc`, as `serde_json::to_string(doc)` writes it.
    pub fn document(&mut self, doc: &SessionDoc) -> serde_json::Result<String> {
        let shell = serde_json::to_string(&doc.shell())?;
        self.splice(&doc.messages, &shell)
    }

    /// The text of `doc`'s messages as `data`, the JSON `doc` was read
    /// from, holds it: when `data` is what serde_json writes for `doc` (the
    /// messages first, then the rest exactly as this host writes it), the
    /// part between is the messages' text. None otherwise (a document
    /// another writer formatted): the text is then rebuilt when needed.
    pub fn of_document(doc: &SessionDoc, data: &str) -> Option<Self> {
        let shell = serde_json::to_string(&doc.shell()).ok()?;
        let rest = shell.strip_prefix("{\"messages\":[]")?;
        let text = data.strip_prefix("{\"messages\":")?.strip_suffix(rest)?;
        (text.starts_with('[') && text.ends_with(']')).then(|| Self {
            text: text.to_owned(),
            count: doc.messages.len(),
        })
    }

    /// Whether `data` is the JSON of `doc` written with this text, compared
    /// without parsing it. `false` when the text is unknown or does not hold
    /// as many messages as `doc`.
    pub fn is_document(&self, doc: &SessionDoc, data: &str) -> bool {
        if self.text.is_empty() || self.count != doc.messages.len() {
            return false;
        }
        let Ok(shell) = serde_json::to_string(&doc.shell()) else {
            return false;
        };
        // The document's first field is `messages` (`{"messages":[]...`).
        let Some(rest) = shell.strip_prefix("{\"messages\":[]") else {
            return false;
        };
        data.strip_prefix("{\"messages\":")
            .and_then(|data| data.strip_prefix(self.text.as_str()))
            .is_some_and(|data| data == rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_leases_still_load() {
        let doc: SessionDoc = serde_json::from_str(
            r#"{"messages":[],"lease":{"holder":"h","turn":"turn-1","expiresMs":5}}"#,
        )
        .expect("loads");
        let lease = doc.lease.expect("has a lease");
        assert_eq!((lease.token.as_str(), lease.reserved), ("", 0));
    }

    #[test]
    fn session_ids() {
        assert!(valid_name("session-6f1c:a.b_c"));
        assert!(valid_name(&"x".repeat(128)));
        assert!(!valid_name(""));
        assert!(!valid_name(&"x".repeat(129)));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a/b"));
        assert!(valid_name(&new_session_id()));
        assert_ne!(new_session_id(), new_session_id());
    }

    #[test]
    fn old_documents_still_load() {
        let doc: SessionDoc = serde_json::from_str(r#"{"messages":[]}"#).expect("loads");
        assert_eq!(doc, SessionDoc::default());
    }

    /// Messages of every shape a session holds, with text that needs escaping.
    fn messages() -> Vec<Message> {
        use llm_host_plugin_api::{Role, ToolCall};
        vec![
            Message::new(Role::System, "Be brief.\nNo \"quotes\", no \\ backslashes."),
            Message::new(
                Role::User,
                "caf\u{e9} \u{1f600} \u{1} \t \"messages\":[] </script>",
            ),
            Message {
                reasoning: Some("They want the weather; call the tool.".to_owned()),
                tool_calls: vec![ToolCall {
                    id: "call-1".to_owned(),
                    name: "weather".to_owned(),
                    arguments: r#"{"city":"Z\u00fcrich","days":[1,2]}"#.to_owned(),
                }],
                ..Message::new(Role::Assistant, "")
            },
            Message {
                tool_call_id: Some("call-1".to_owned()),
                ..Message::new(Role::Tool, r#"{"temp":-3.5}"#)
            },
            Message {
                reasoning: Some(String::new()),
                ..Message::new(Role::Assistant, "Cold: -3.5 \u{b0}C.")
            },
            Message::new(Role::Other, ""),
        ]
    }

    /// Documents: empty, with a history, with a lease.
    fn documents() -> Vec<SessionDoc> {
        let lease = Lease {
            holder: "host-\"1\"".to_owned(),
            turn: "turn-4".to_owned(),
            expires_ms: 1_795_640_780_006,
            token: "claim-\"7\"".to_owned(),
            reserved: 1_000_041,
        };
        vec![
            SessionDoc::default(),
            SessionDoc {
                messages: messages(),
                last_sequence: 41,
                turns: 3,
                lease: None,
                model: Some("echo \"2\"".to_owned()),
                settings: SessionSettings {
                    system: Some("Be \"brief\".\n".to_owned()),
                    model: Some("echo".to_owned()),
                    params: Some(llm_host_plugin_api::TurnParams {
                        max_tokens: Some(7),
                        ..Default::default()
                    }),
                },
                summary: Some(HistorySummary {
                    messages: 2,
                    text: "They said \"hi\".".to_owned(),
                }),
                replay: super::super::replay::StoredFrames::new(
                    40,
                    &[
                        &bytes::Bytes::from_static(br#"{"data":{"text":"\"messages\":[]"}}"#),
                        &bytes::Bytes::from_static(br#"{"data":{"messages":[1]}}"#),
                    ],
                ),
            },
            SessionDoc {
                messages: vec![Message::new(llm_host_plugin_api::Role::User, "hi")],
                last_sequence: 0,
                turns: 1,
                lease: Some(lease.clone()),
                model: None,
                ..SessionDoc::default()
            },
            SessionDoc {
                messages: messages(),
                last_sequence: u64::MAX,
                turns: 4,
                lease: Some(lease),
                model: Some("llama".to_owned()),
                ..SessionDoc::default()
            },
        ]
    }

    fn serde(doc: &SessionDoc) -> String {
        serde_json::to_string(doc).expect("serializes")
    }

    #[test]
    fn a_loaded_document_keeps_the_stored_text_of_its_messages() {
        for doc in documents() {
            let data = serde(&doc);
            let stored = Stored {
                version: 3,
                owner: "k".to_owned(),
                data: data.clone(),
            };
            let mut loaded = Loaded::parse("s", "id", stored.clone()).expect("parses");
            assert!(loaded.is_stored(&stored), "known at once: {data}");
            assert_eq!(
                loaded.messages_json.document(&loaded.doc).expect("writes"),
                data
            );
        }
        // Formatted by another writer: not taken, rebuilt when needed.
        let doc = documents().swap_remove(1);
        let pretty = serde_json::to_string_pretty(&doc).expect("serializes");
        let stored = Stored {
            version: 1,
            owner: String::new(),
            data: pretty,
        };
        let mut loaded = Loaded::parse("s", "id", stored).expect("parses");
        assert!(loaded.messages_json.text.is_empty());
        assert_eq!(
            loaded.messages_json.document(&loaded.doc).expect("writes"),
            serde(&doc)
        );
    }

    #[test]
    fn documents_are_what_serde_json_writes() {
        for doc in documents() {
            let mut json = MessagesJson::new(&doc.messages).expect("serializes");
            assert_eq!(json.document(&doc).expect("writes"), serde(&doc));
            // Unknown: written from the messages.
            let mut unknown = MessagesJson::default();
            assert_eq!(unknown.document(&doc).expect("writes"), serde(&doc));
        }
    }

    #[test]
    fn pushed_messages_are_what_serde_json_writes() {
        for full in documents() {
            // As turns build it: one message at a time onto an empty history.
            let mut doc = SessionDoc {
                messages: Vec::new(),
                ..full.clone()
            };
            let mut json = MessagesJson::new(&[]).expect("serializes");
            assert_eq!(json.document(&doc).expect("writes"), serde(&doc));
            for message in &full.messages {
                doc.messages.push(message.clone());
                json.push(message);
                assert_eq!(json.count, doc.messages.len());
                assert_eq!(
                    json.text,
                    serde_json::to_string(&doc.messages).expect("serializes"),
                    "the text after a push is the messages' JSON"
                );
                assert_eq!(json.document(&doc).expect("writes"), serde(&doc));
            }
        }
    }

    #[test]
    fn after_a_merge_the_newer_messages_are_written() {
        // A commit that conflicts puts its answer on the newer stored state,
        // loaded with an unknown text.
        let mut ours = documents().swap_remove(1);
        let mut json = MessagesJson::new(&ours.messages).expect("serializes");
        let answer = Message::new(llm_host_plugin_api::Role::Assistant, "ours");
        ours.messages.push(answer.clone());
        json.push(&answer);
        let stored = serde(&SessionDoc {
            messages: ours.messages[1..].to_vec(),
            last_sequence: 50,
            turns: 5,
            lease: None,
            model: None,
            ..SessionDoc::default()
        });
        let newer: SessionDoc = serde_json::from_str(&stored).expect("loads");
        let (mut doc, mut json) = (newer, MessagesJson::default());
        doc.messages.push(answer.clone());
        json.push(&answer);
        assert_eq!(json.document(&doc).expect("writes"), serde(&doc));
        assert!(json.is_document(&doc, &serde(&doc)), "known once written");

        // A text kept for another number of messages is not trusted either.
        let mut stale = MessagesJson::new(&doc.messages[..2]).expect("serializes");
        assert!(!stale.is_document(&doc, &serde(&doc)));
        assert_eq!(stale.document(&doc).expect("writes"), serde(&doc));
    }

    #[test]
    fn a_stored_document_is_recognised_only_when_identical() {
        for doc in documents() {
            let json = MessagesJson::new(&doc.messages).expect("serializes");
            let data = serde(&doc);
            assert!(json.is_document(&doc, &data), "{data}");
            assert!(!MessagesJson::default().is_document(&doc, &data));
            assert!(!json.is_document(&doc, &format!("{data} ")));
            assert!(!json.is_document(&doc, &data[..data.len() - 1]));
            let changed = [
                SessionDoc {
                    last_sequence: doc.last_sequence ^ 1,
                    ..doc.clone()
                },
                SessionDoc {
                    turns: doc.turns + 1,
                    ..doc.clone()
                },
                SessionDoc {
                    lease: match &doc.lease {
                        Some(_) => None,
                        None => Some(Lease {
                            holder: "h".to_owned(),
                            turn: "turn-1".to_owned(),
                            expires_ms: 1,
                            token: "t".to_owned(),
                            reserved: 2,
                        }),
                    },
                    ..doc.clone()
                },
                SessionDoc {
                    messages: doc
                        .messages
                        .iter()
                        .map(|m| Message {
                            content: format!("{}.", m.content),
                            ..m.clone()
                        })
                        .chain(doc.messages.is_empty().then(Message::default))
                        .collect(),
                    ..doc.clone()
                },
            ];
            for other in changed {
                let stored = serde(&other);
                assert_ne!(stored, data);
                assert!(!json.is_document(&doc, &stored), "{stored} is not {data}");
            }
        }
    }

    #[test]
    fn splicing_needs_the_empty_field() {
        let mut json = MessagesJson::new(&messages()).expect("serializes");
        assert!(json.splice(&messages(), r#"{"history":[]}"#).is_err());
        assert_eq!(
            json.splice(&[], r#"{"id":"a","messages":[],"n":1}"#)
                .expect("splices"),
            r#"{"id":"a","messages":[],"n":1}"#,
            "a text for other messages is rebuilt"
        );
    }
}
