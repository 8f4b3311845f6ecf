//! The child's side for a store: once [`super::runner`] has built the store
//! adapter, every call the host sends (`LOAD`, `SAVE`, `DELETE`, `LIST`,
//! `PING`, each under the id the host gave it) runs on a thread of its own,
//! so that calls of many turns run at once as they would on the host's
//! blocking pool, and its answer goes back under the same id. The child
//! ends when its stdin closes.

use std::io::Read;
use std::sync::Arc;

use llm_host_plugin_api::{
    abi_stable::std_types::RStr, ListQuery, PluginError, SaveOutcome, StoreAdapterBox,
};

use super::runner::send;
use super::wire::{to_child, to_host, Encoder, Frame};

/// Serves the host's store calls until it closes the pipe.
pub(super) fn serve(
    adapter: StoreAdapterBox,
    out: Arc<super::runner::Out>,
    input: &mut impl Read,
) -> ! {
    let adapter = Arc::new(adapter);
    loop {
        let frame = match Frame::read(input) {
            Ok(Some(frame)) => frame,
            // The host closed the pipe (or wrote garbage): nothing more to do.
            Ok(None) | Err(_) => std::process::exit(0),
        };
        let call = frame.turn;
        let (adapter, to_host) = (adapter.clone(), out.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("call-{call}"))
            .spawn(move || {
                let mut enc = Encoder::default();
                answer(&adapter, frame, &mut enc);
                send(&to_host, &enc.buf);
            });
        if spawned.is_err() {
            let mut enc = Encoder::default();
            enc.begin(to_host::FAILED, call)
                .str("internal")
                .str("internal: the store's process cannot start a thread")
                .finish();
            send(&out, &enc.buf);
        }
    }
}

/// Runs the call `frame` asks and writes its answer into `enc`.
fn answer(adapter: &StoreAdapterBox, mut frame: Frame, enc: &mut Encoder) {
    let call = frame.turn;
    let result = run(adapter, &mut frame, enc);
    match result {
        Ok(()) => {}
        Err(Failure::Plugin(err)) => {
            enc.buf.clear();
            enc.begin(to_host::FAILED, call)
                .str(err.kind.as_str())
                .str(&err.to_string())
                .finish();
        }
        Err(Failure::Frame(what)) => {
            // The host's own executable wrote it: never happens.
            eprintln!("llm-host {}: {what}", super::runner::ARG);
            std::process::exit(3)
        }
    }
}

enum Failure {
    Plugin(PluginError),
    Frame(String),
}

impl From<PluginError> for Failure {
    fn from(err: PluginError) -> Self {
        Failure::Plugin(err)
    }
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Failure::Frame(err.to_string())
    }
}

fn run(adapter: &StoreAdapterBox, frame: &mut Frame, enc: &mut Encoder) -> Result<(), Failure> {
    let call = frame.turn;
    match frame.kind {
        to_child::LOAD => {
            let id = frame.str()?;
            let found = adapter.load(RStr::from(id.as_str())).into_result()?;
            enc.begin(to_host::LOADED, call);
            match found.into_option() {
                None => enc.u8(0),
                Some(stored) => enc
                    .u8(1)
                    .u64(stored.version)
                    .str(stored.owner.as_str())
                    .str(stored.data.as_str()),
            };
        }
        to_child::SAVE => {
            let (id, expected, owner, data) =
                (frame.str()?, frame.u64()?, frame.str()?, frame.str()?);
            let outcome = adapter
                .save(
                    RStr::from(id.as_str()),
                    expected,
                    RStr::from(owner.as_str()),
                    RStr::from(data.as_str()),
                )
                .into_result()?;
            let (conflict, version) = match outcome {
                SaveOutcome::Saved { version } => (0, version),
                SaveOutcome::Conflict { current } => (1, current),
            };
            enc.begin(to_host::SAVED, call).u8(conflict).u64(version);
        }
        to_child::DELETE => {
            let id = frame.str()?;
            let existed = adapter.delete(RStr::from(id.as_str())).into_result()?;
            enc.begin(to_host::DELETED, call).u8(u8::from(existed));
        }
        to_child::LIST => {
            let (owner, after, limit) = (frame.str()?, frame.str()?, frame.u64()?);
            let page = adapter
                .list(ListQuery {
                    owner: RStr::from(owner.as_str()),
                    after: RStr::from(after.as_str()),
                    limit: u32::try_from(limit).unwrap_or(u32::MAX),
                })
                .into_result()?;
            enc.begin(to_host::LISTED, call).u64(page.ids.len() as u64);
            for id in page.ids.iter() {
                enc.str(id.as_str());
            }
            match page.next.into_option() {
                None => enc.u8(0),
                Some(next) => enc.u8(1).str(next.as_str()),
            };
        }
        to_child::PING => {
            adapter.ping().into_result()?;
            enc.begin(to_host::PONG, call);
        }
        kind => {
            return Err(Failure::Plugin(PluginError::internal(format!(
                "the store's process does not know call kind {kind}"
            ))))
        }
    }
    enc.finish();
    Ok(())
}
