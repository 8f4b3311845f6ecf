//! `template-store`: a small, complete session store plugin, made to be
//! changed into your own.
//!
//! It keeps each session as a file in a directory. A real store, if a simple
//! one: every host on this machine that names the same directory shares the
//! sessions safely. What a store must do, and how this one does it:
//!
//! - **Saves conditional on the version, atomic across processes.** Every
//!   write (save, delete, the sweep of expired sessions) holds an exclusive
//!   lock on the directory's `.lock` file (`flock`, through std's
//!   [`File::lock`]) while it compares the stored version, writes the new
//!   file under a temporary name and renames it over the old one. The
//!   rename replaces the file whole, so a reader never sees half of one:
//!   loads and listings take no lock.
//! - **Session ids made safe as file names.** `.` and `..` are legal session
//!   ids, and so is anything a client may send to another host: see
//!   [`file_name`].
//! - **Documents byte for byte.** A file is one JSON header line (version,
//!   owner, `updated_at_ms`), then the host's document exactly as given. The
//!   store never parses the document, and a listing reads the headers only.
//! - **Expiry, optional.** With `ttl_secs`, a session not loaded or saved for
//!   that long is absent for every call, and saves sweep such files out now
//!   and then. A file's modification time is when its session was last used.
//! - **Not in process.** `in_process` keeps its default, false: the sessions
//!   are on disk, where other hosts reach them, and every call does I/O, so
//!   the host calls the store on its blocking threads and claims a session
//!   for a turn before running it.
//! - Settings parsed with [`api::parse_settings`] into a struct with
//!   `deny_unknown_fields` and checked; the directory is resolved against the
//!   host's config file with [`api::host::resolve_path`].
//! - Errors that name the file and what failed on it: `unavailable` when the
//!   file system fails, `corrupt` when a file is not a session file.
//!
//! Sharing works between processes on one machine (a local file system):
//! `flock` is not reliable on network file systems.
//!
//! See PLUGIN-GUIDE.md in llm-host's repository for the whole contract (its
//! section "Stores" for what each call must do), and run the conformance
//! suite against the built library:
//! `llm-host check target/release/libllm_plugin_template_store.so --kind store`
//! (add `--settings '{"ttl_secs": 2}'` to check expiry too).
//!
//! In config.toml:
//!
//! ```toml
//! [stores.files]
//! plugin = "template-store"
//! settings = { dir = "sessions", ttl_secs = 86400 }
//!
//! [defaults]
//! store = "files"
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// Import the plugin-api under a short name: its macros (`api::info!`,
// `api::export_plugin!`) and helpers read well that way.
use llm_host_plugin_api::{
    self as api, serde_json, ErrorKind, Kinds, Plugin, PluginError, SaveOutcome, SessionPage,
    Store, StoreAdapterBox, StoredSession,
};
use serde::{Deserialize, Serialize};

/// The longest file name Linux file systems take (`NAME_MAX`).
pub const MAX_FILE_NAME: usize = 255;

/// What the name of every session file ends with.
const SUFFIX: &str = ".session";

/// The file every write locks. Its name starts with `.`, which no session
/// file's does.
const LOCK_FILE: &str = ".lock";

/// The file a save writes before renaming it into place. Writers take turns
/// (they hold the lock), so one name is enough.
const TEMP_FILE: &str = ".save.tmp";

/// The longest between two sweeps of expired sessions.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The settings of a store: the `settings` table of its `[stores.NAME]`
/// entry in config.toml, which the host hands over as JSON.
///
/// `deny_unknown_fields` makes a typo (`ttl_sec`) an error that names the
/// key, instead of a setting silently ignored. Every field has a default, so
/// `{}` (no `settings` table at all) is valid.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileStoreSettings {
    /// The directory of the session files, created if missing. A relative
    /// path is taken from the directory of the host's config file (under
    /// `llm-host check`, the current one). Default: `sessions`.
    #[serde(default = "default_dir")]
    pub dir: String,
    /// Forget sessions not loaded or saved for this many seconds (at least
    /// 1). Not set: sessions are kept until deleted.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

fn default_dir() -> String {
    "sessions".to_owned()
}

impl Default for FileStoreSettings {
    fn default() -> Self {
        Self {
            dir: default_dir(),
            ttl_secs: None,
        }
    }
}

/// The first line of a session file, as JSON. Everything after it is the
/// host's document.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Header {
    version: u64,
    owner: String,
    updated_at_ms: u64,
}

/// The file name of session `id`.
///
/// Bytes `A-Z a-z 0-9 - _ :` stay as they are, and so does `.` except as
/// the first byte; every other byte (a leading `.`, `/`, `%`, a space, the
/// bytes of a non-ASCII character) becomes `%XX`, upper-case hex. So `.`
/// is `%2E.session` and `..` is `%2E..session`: no id names the directory,
/// its parent or a file of the store's own (those start with `.`), none
/// reaches another directory, and two ids never share a file. The ids the
/// host accepts (1 to 128 of `A-Z a-z 0-9 . _ : -`) stay readable and fit;
/// an id whose name would be longer than [`MAX_FILE_NAME`] is refused.
pub fn file_name(id: &str) -> Result<String, PluginError> {
    if id.is_empty() {
        return Err(PluginError::invalid_input("the session id is empty"));
    }
    let mut name = String::with_capacity(id.len() + SUFFIX.len());
    for (index, byte) in id.bytes().enumerate() {
        let plain = byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'_' | b':')
            || (byte == b'.' && index > 0);
        if plain {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    name.push_str(SUFFIX);
    if name.len() > MAX_FILE_NAME {
        return Err(PluginError::invalid_input(format!(
            "the session id is too long for a file store: its file name would be {} bytes, \
             at most {MAX_FILE_NAME} fit",
            name.len()
        )));
    }
    Ok(name)
}

/// The session id whose file is `name`, if `name` is exactly what
/// [`file_name`] makes of it; other files in the directory are not sessions.
pub fn id_of(name: &str) -> Option<String> {
    let encoded = name.strip_suffix(SUFFIX)?;
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut rest = encoded.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    let id = String::from_utf8(bytes).ok()?;
    // One name per id: `%41`, `%2e` or a bare leading `.` are not ours.
    (file_name(&id).ok()? == name).then_some(id)
}

/// The store: a directory of session files. Any number of adapters (in this
/// host, in other hosts on this machine) may use one directory at once.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    ttl: Option<Duration>,
    /// When this adapter last swept expired sessions out.
    swept: Mutex<Instant>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// An I/O error on `path` while doing `what`: the store cannot serve.
fn io_error(path: &Path, what: &str, err: io::Error) -> PluginError {
    PluginError::unavailable(format!("{}: {what} failed: {err}", path.display()))
}

/// A file that is not a session file.
fn corrupt(path: &Path, what: impl std::fmt::Display) -> PluginError {
    PluginError::new(
        ErrorKind::CORRUPT,
        format!("{}: not a session file: {what}", path.display()),
    )
}

fn parse_header(path: &Path, line: &str) -> Result<Header, PluginError> {
    serde_json::from_str(line.trim_end_matches('\n'))
        .map_err(|err| corrupt(path, format!("its header line: {err}")))
}

impl FileStore {
    /// Opens the store `settings` describe, creating its directory.
    pub fn open(settings: FileStoreSettings) -> Result<Self, PluginError> {
        let dir = settings.dir.trim();
        if dir.is_empty() {
            return Err(PluginError::invalid_settings("dir: must name a directory"));
        }
        let ttl =
            match settings.ttl_secs {
                Some(0) => return Err(PluginError::invalid_settings(
                    "ttl_secs: must be at least 1 (leave it out to keep sessions until deleted)",
                )),
                ttl => ttl.map(Duration::from_secs),
            };
        let dir = api::host::resolve_path(dir);
        fs::create_dir_all(&dir).map_err(|err| {
            PluginError::invalid_settings(format!("dir: cannot create {}: {err}", dir.display()))
        })?;
        let store = Self {
            dir,
            ttl,
            swept: Mutex::new(Instant::now()),
        };
        // Lock once now, so that a directory this user cannot write is
        // refused here, naming the setting, rather than at the first save.
        drop(
            store
                .lock()
                .map_err(|err| PluginError::invalid_settings(format!("dir: {}", err.message)))?,
        );
        Ok(store)
    }

    /// The directory of the session files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> Result<PathBuf, PluginError> {
        Ok(self.dir.join(file_name(id)?))
    }

    /// Takes the directory's lock: until the file answered is dropped, no
    /// other adapter, in this process or another, writes. Each call opens
    /// the file anew, because `flock` excludes open files, not threads.
    fn lock(&self) -> Result<File, PluginError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|err| io_error(&path, "opening the lock file", err))?;
        file.lock().map_err(|err| io_error(&path, "locking", err))?;
        Ok(file)
    }

    /// Whether a session last used at `used` has expired.
    fn expired(&self, used: SystemTime) -> bool {
        self.ttl.is_some_and(|ttl| {
            SystemTime::now()
                .duration_since(used)
                .is_ok_and(|idle| idle >= ttl)
        })
    }

    /// Opens the session file at `path` (for writing too if `touch`, to
    /// mark it used); none if there is none or it expired.
    fn open_session(&self, path: &Path, touch: bool) -> Result<Option<File>, PluginError> {
        let opened = OpenOptions::new().read(true).write(touch).open(path);
        let file = match opened {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_error(path, "opening", err)),
        };
        let used = file
            .metadata()
            .and_then(|meta| meta.modified())
            .map_err(|err| io_error(path, "reading the modification time of", err))?;
        Ok((!self.expired(used)).then_some(file))
    }

    /// The header of the session file at `path`; none if there is no such
    /// session (or it expired).
    fn header(&self, path: &Path) -> Result<Option<Header>, PluginError> {
        let Some(file) = self.open_session(path, false)? else {
            return Ok(None);
        };
        let mut line = String::new();
        BufReader::new(file)
            .read_line(&mut line)
            .map_err(|err| io_error(path, "reading", err))?;
        parse_header(path, &line).map(Some)
    }

    /// Writes `header` and `data` as the session file at `path`: to the
    /// temporary file first, then renamed over the old one. The caller holds
    /// the lock.
    fn write(&self, path: &Path, header: &Header, data: &str) -> Result<(), PluginError> {
        let temp = self.dir.join(TEMP_FILE);
        let mut line = serde_json::to_string(header)
            .map_err(|err| PluginError::internal(format!("the header: {err}")))?;
        line.push('\n');
        let mut file = File::create(&temp).map_err(|err| io_error(&temp, "creating", err))?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.write_all(data.as_bytes()))
            // On disk before it replaces the old file: after a crash the
            // session is the old version or the new one, never an empty file.
            .and_then(|()| file.sync_all())
            .map_err(|err| io_error(&temp, "writing", err))?;
        fs::rename(&temp, path).map_err(|err| io_error(path, "renaming the new file to", err))?;
        // The rename itself, on disk.
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|err| io_error(&self.dir, "syncing", err))
    }

    /// Removes the files of expired sessions, at most once a minute (or once
    /// a TTL, if shorter). The caller holds the lock. A session loaded at
    /// the very moment it expires may be swept out all the same.
    fn sweep(&self) {
        let Some(ttl) = self.ttl else {
            return;
        };
        {
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            if swept.elapsed() < ttl.min(SWEEP_EVERY) {
                return;
            }
            *swept = Instant::now();
        }
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_str().and_then(id_of).is_none() {
                continue;
            }
            let used = entry.metadata().and_then(|meta| meta.modified());
            if used.is_ok_and(|used| self.expired(used)) {
                if let Err(err) = fs::remove_file(entry.path()) {
                    api::warn!(
                        "{}: removing an expired session: {err}",
                        entry.path().display()
                    );
                }
            }
        }
    }
}

impl Store for FileStore {
    fn load(&self, id: &str) -> Result<Option<StoredSession>, PluginError> {
        let path = self.path(id)?;
        // With a TTL, loading is using: open for writing too, to touch it.
        let touch = self.ttl.is_some();
        let Some(mut file) = self.open_session(&path, touch)? else {
            return Ok(None);
        };
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|err| match err.kind() {
                io::ErrorKind::InvalidData => corrupt(&path, "it is not UTF-8"),
                _ => io_error(&path, "reading", err),
            })?;
        let Some(end) = text.find('\n') else {
            return Err(corrupt(&path, "no header line"));
        };
        let data = text.split_off(end + 1);
        let header = parse_header(&path, &text)?;
        if touch {
            // Through the open file: if a save has replaced the file since,
            // this touches the old one, which nobody reads any more.
            file.set_modified(SystemTime::now())
                .map_err(|err| io_error(&path, "touching", err))?;
        }
        Ok(Some(StoredSession::new(
            header.version,
            header.owner,
            data,
            header.updated_at_ms,
        )))
    }

    fn save(
        &self,
        id: &str,
        expected_version: u64,
        owner: &str,
        data: &str,
    ) -> Result<SaveOutcome, PluginError> {
        let path = self.path(id)?;
        // The compare and the write are one step: under the lock, no other
        // writer can come between them.
        let lock = self.lock()?;
        let current = self.header(&path)?.map_or(0, |header| header.version);
        if current != expected_version {
            // A conflict is an answer, not an error: nothing is written.
            return Ok(SaveOutcome::Conflict { current });
        }
        let version = expected_version + 1;
        let header = Header {
            version,
            owner: owner.to_owned(),
            updated_at_ms: now_ms(),
        };
        self.write(&path, &header, data)?;
        self.sweep();
        drop(lock);
        Ok(SaveOutcome::Saved { version })
    }

    fn delete(&self, id: &str) -> Result<bool, PluginError> {
        let path = self.path(id)?;
        let _lock = self.lock()?;
        // An expired session did not exist; a corrupt file did, and goes.
        let existed = !matches!(self.header(&path), Ok(None));
        match fs::remove_file(&path) {
            Ok(()) => Ok(existed),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(io_error(&path, "removing", err)),
        }
    }

    fn list(&self, owner: &str, after: &str, limit: u32) -> Result<SessionPage, PluginError> {
        let entries = fs::read_dir(&self.dir).map_err(|err| io_error(&self.dir, "listing", err))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| io_error(&self.dir, "listing", err))?;
            let Some(id) = entry.file_name().to_str().and_then(id_of) else {
                continue;
            };
            if after.is_empty() || id.as_str() > after {
                ids.push(id);
            }
        }
        // Ascending byte order (how `str` compares), not file name order.
        ids.sort_unstable();
        // The sessions to list: read lazily, so only the headers the page
        // needs are read.
        let listed = ids.into_iter().filter(|id| {
            let header = match self.path(id).and_then(|path| self.header(&path)) {
                Ok(Some(header)) => header,
                // Deleted since the directory was read, or expired.
                Ok(None) => return false,
                Err(err) => {
                    api::warn!("left out of a listing: {err}");
                    return false;
                }
            };
            owner.is_empty() || header.owner == owner
        });
        // The first `limit` of them, and `next` (the last one) if more follow.
        Ok(SessionPage::from_ids(listed, limit))
    }

    /// Ready when the directory is there and its lock file can be opened.
    fn ping(&self) -> Result<(), PluginError> {
        let path = self.dir.join(LOCK_FILE);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .map(drop)
            .map_err(|err| io_error(&path, "opening the lock file", err))
    }
}

/// The plugin: what it is called, what it provides, how to build it. A unit
/// struct; [`api::export_plugin!`] below turns it into the library's root
/// module, whose every entry point runs under the panic guard.
pub struct FileStorePlugin;

impl Plugin for FileStorePlugin {
    /// The name operators write in config.toml (`plugin = "template-store"`).
    const NAME: &'static str = "template-store";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "example store: sessions as files in a directory, shared by the hosts of one machine";
    const KINDS: Kinds = Kinds::STORE;

    /// Builds one store per `[stores.NAME]` entry, and again whenever its
    /// settings change on a reload. An error refuses that store (at start)
    /// or the whole reload (while running), with this message shown to the
    /// operator next to the config key.
    fn new_store(settings: &str) -> Result<StoreAdapterBox, PluginError> {
        let settings: FileStoreSettings = api::parse_settings(settings)?;
        let store = FileStore::open(settings)?;
        api::info!(
            "new store in {} ({})",
            store.dir.display(),
            match store.ttl {
                Some(ttl) => format!("sessions idle {}s expire", ttl.as_secs()),
                None => "sessions are kept until deleted".to_owned(),
            }
        );
        Ok(api::store_adapter(store))
    }

    // `new_model` is not overridden: the default answers `unsupported`.
}

api::export_plugin!(FileStorePlugin);

#[cfg(test)]
mod tests;
