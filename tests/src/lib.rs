//! The harness of llm-host's end-to-end tests.
//!
//! - [`artifacts`] builds the host binary and the plugin libraries once per
//!   test process, with the cargo that runs the tests, into the same target
//!   directory and profile.
//! - [`Workdir`] is a temporary directory with a `config.toml` and a
//!   `plugins/` directory holding copies of the chosen libraries.
//! - [`Host`] runs the real `llm-host` binary on such a directory, waits for
//!   its `listening on` line and kills it on drop.
//! - [`Client`] is a WebSocket client with helpers that read frames and whole
//!   turns, each read under a timeout that fails the test with a clear message.
//! - [`http_upgrade`] sends a raw upgrade request, to see the HTTP errors the
//!   host answers before upgrading.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use serde_json::json;

/// How long the host may take to print its `listening on` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a single frame may take to arrive: a guard against a hang, not
/// a timing goal. A provider plugin's first request (its TLS setup built
/// unoptimised) can take several seconds on a loaded 2-core machine.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a command that should exit (`llm-host plugins`, a bad config) may run.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The subprotocol that switches a connection to command mode.
pub const COMMAND_PROTOCOL: &str = "llm-host.v1";

// ---------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------

/// The files the tests run: the host binary and the plugin libraries.
#[derive(Debug)]
pub struct Artifacts {
    /// The `llm-host` binary.
    pub host: PathBuf,
    /// `libllm_plugin_echo.so`.
    pub echo: PathBuf,
    /// `libllm_plugin_memory.so`.
    pub memory: PathBuf,
    /// The fixture built against "another plugin API", claiming version 0.0.7.
    pub foreign: PathBuf,
    /// The same fixture claiming plugin-api's own version (0.1.1).
    pub foreign_same_version: PathBuf,
    /// A newer build of echo (plugin `echo` 2.0.0, answers `echo v2: ...`).
    pub echo_v2: PathBuf,
    /// `libllm_plugin_template.so`, the plugin author kit's example.
    pub template: PathBuf,
    /// `libllm_plugin_template_store.so`, the store template.
    pub template_store: PathBuf,
    /// The fixture that breaks the plugin contract (plugin `broken`).
    pub broken: PathBuf,
}

static ARTIFACTS: OnceLock<Result<Artifacts, String>> = OnceLock::new();

/// The built artifacts; the first call builds them (later calls, from any
/// thread, wait for that build and share it). A failed build fails every test
/// with cargo's output.
pub fn artifacts() -> &'static Artifacts {
    match ARTIFACTS.get_or_init(build) {
        Ok(artifacts) => artifacts,
        Err(err) => panic!("building the host and the plugins failed:\n{err}"),
    }
}

/// The workspace root (the parent of this package).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package lives inside the workspace")
        .to_path_buf()
}

/// `target/<profile>`, from the path of the running test binary
/// (`target/<profile>/deps/host-<hash>`).
fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|err| format!("current_exe: {err}"))?;
    let deps = exe
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", exe.display()))?;
    let profile = deps
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", deps.display()))?;
    Ok(profile.to_path_buf())
}

fn cargo_build(
    target_dir: &Path,
    profile: &str,
    packages: &[&str],
    features: &[&str],
) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    command
        .current_dir(workspace_root())
        .arg("build")
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.arg("--profile").arg(other);
        }
    }
    for package in packages {
        command.arg("-p").arg(package);
    }
    for feature in features {
        command.arg("--features").arg(feature);
    }
    let described = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("{described}: cannot run {cargo}: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{described} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn copy_to(source: &Path, dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|err| format!("create {}: {err}", dir.display()))?;
    let name = source
        .file_name()
        .ok_or_else(|| format!("{} has no file name", source.display()))?;
    let destination = dir.join(name);
    std::fs::copy(source, &destination).map_err(|err| {
        format!(
            "copy {} to {}: {err}",
            source.display(),
            destination.display()
        )
    })?;
    Ok(destination)
}

/// Builds `packages` (with the profile the tests were built with) into
/// the tests' target directory, once per set of packages per test process;
/// answers the profile directory the libraries and binaries are in. Fails
/// the test with cargo's output if the build fails.
pub fn build_packages(packages: &[&str]) -> PathBuf {
    /// Each set of packages built, and where to (or why not).
    type Builds = Vec<(Vec<String>, Result<PathBuf, String>)>;
    static BUILT: Mutex<Builds> = Mutex::new(Vec::new());
    let key: Vec<String> = packages.iter().map(|p| (*p).to_owned()).collect();
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let result = match built.iter().find(|(packages, _)| *packages == key) {
        Some((_, result)) => result.clone(),
        None => {
            let result = profile_dir().and_then(|profile_dir| {
                let target_dir = profile_dir
                    .parent()
                    .ok_or("the profile directory has no parent")?;
                let profile = profile_dir
                    .file_name()
                    .and_then(|name| name.to_str())
                    .ok_or("the profile directory has no usable name")?;
                cargo_build(target_dir, profile, packages, &[])?;
                Ok(profile_dir.clone())
            });
            built.push((key, result.clone()));
            result
        }
    };
    result.unwrap_or_else(|err| panic!("building {packages:?} failed:\n{err}"))
}

fn build() -> Result<Artifacts, String> {
    let profile_dir = profile_dir()?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", profile_dir.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| format!("{} has no usable name", profile_dir.display()))?;

    cargo_build(
        target_dir,
        profile,
        &[
            "llm-host",
            "llm-plugin-echo",
            "llm-plugin-memory",
            "llm-host-foreign-plugin-fixture",
            "llm-host-echo-v2-fixture",
            "llm-plugin-sqlite",
            "llm-plugin-redis",
            "llm-plugin-postgres",
            "llm-plugin-template",
            "llm-plugin-template-store",
            "llm-host-broken-plugin-fixture",
        ],
        &[],
    )?;
    // The two builds of the fixture write the same file: keep each one aside.
    let fixtures = profile_dir.join("llm-host-tests");
    let fixture = profile_dir.join("libllm_host_foreign_plugin_fixture.so");
    let foreign = copy_to(&fixture, &fixtures.join("foreign-0.0.7"))?;
    cargo_build(
        target_dir,
        profile,
        &["llm-host-foreign-plugin-fixture"],
        &["llm-host-foreign-plugin-fixture/same-version"],
    )?;
    let foreign_same_version = copy_to(&fixture, &fixtures.join("foreign-same-version"))?;

    let artifacts = Artifacts {
        host: profile_dir.join("llm-host"),
        echo: profile_dir.join("libllm_plugin_echo.so"),
        memory: profile_dir.join("libllm_plugin_memory.so"),
        foreign,
        foreign_same_version,
        echo_v2: profile_dir.join("libllm_host_echo_v2_fixture.so"),
        template: profile_dir.join("libllm_plugin_template.so"),
        template_store: profile_dir.join("libllm_plugin_template_store.so"),
        broken: profile_dir.join("libllm_host_broken_plugin_fixture.so"),
    };
    for path in [
        &artifacts.host,
        &artifacts.echo,
        &artifacts.memory,
        &artifacts.echo_v2,
        &artifacts.template,
        &artifacts.template_store,
        &artifacts.broken,
    ] {
        if !path.is_file() {
            return Err(format!("the build did not produce {}", path.display()));
        }
    }
    Ok(artifacts)
}

/// Libraries built against earlier plugin-api releases, and hosts that know
/// only one: `tests/fixtures/contract-0.1.0`, cargo workspaces of their own
/// (outside this one, so their vendored plugin-api can never be unified
/// with ours), each built into its own directory under
/// `target/contract-0.1.0`.
#[derive(Debug)]
pub struct ContractFixtures {
    /// echo built against plugin-api 0.1.0 as last published (plugin `echo-v010`).
    pub echo_v010: PathBuf,
    /// memory built against the same (plugin `memory-v010`).
    pub memory_v010: PathBuf,
    /// memory built against plugin-api 0.1.0 with `ping` (plugin `memory-v010-ping`).
    pub memory_v010_ping: PathBuf,
    /// memory built against plugin-api 0.1.0 with `blocks` (commit 43e095b;
    /// plugin `memory-v010-blocks`).
    pub memory_v010_blocks: PathBuf,
    /// echo built against plugin-api 0.1.0 as first released (plugin `echo-v010-first`).
    pub echo_v010_first: PathBuf,
    /// memory built against the same (plugin `memory-v010-first`).
    pub memory_v010_first: PathBuf,
    /// echo (stepped) built against plugin-api 0.1.1 (plugin `echo-v011`).
    pub echo_v011: PathBuf,
    /// `old-host LIBRARY PROMPT`: a host of plugin-api 0.1.0 as last published.
    pub old_host: PathBuf,
    /// The same host built against plugin-api 0.1.0 as first released.
    pub old_host_first: PathBuf,
    /// The same host built against plugin-api 0.1.1.
    pub old_host_v011: PathBuf,
}

static CONTRACT_FIXTURES: OnceLock<Result<ContractFixtures, String>> = OnceLock::new();

/// The fixtures built against earlier contracts; the first call builds them.
pub fn contract_fixtures() -> &'static ContractFixtures {
    match CONTRACT_FIXTURES.get_or_init(build_contract_fixtures) {
        Ok(fixtures) => fixtures,
        Err(err) => panic!("building the earlier-contract fixtures failed:\n{err}"),
    }
}

fn build_contract_fixtures() -> Result<ContractFixtures, String> {
    let profile_dir = profile_dir()?;
    let target = profile_dir
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", profile_dir.display()))?
        .join("contract-0.1.0");
    let fixtures = workspace_root().join("tests/fixtures/contract-0.1.0");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let workspaces = [
        ("", "last"),
        ("with-ping", "with-ping"),
        ("with-blocks", "with-blocks"),
        ("first-release", "first"),
        ("contract-0.1.1", "v0.1.1"),
    ];
    for (workspace, target_name) in workspaces {
        let mut command = Command::new(&cargo);
        command
            .arg("build")
            .arg("--locked")
            .arg("--workspace")
            .arg("--manifest-path")
            .arg(fixtures.join(workspace).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target.join(target_name))
            .stdin(Stdio::null());
        let described = format!("{command:?}");
        let output = command
            .output()
            .map_err(|err| format!("{described}: cannot run {cargo}: {err}"))?;
        if !output.status.success() {
            return Err(format!(
                "{described} failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    let built = |target_name: &str, file: &str| target.join(target_name).join("debug").join(file);
    let fixtures = ContractFixtures {
        echo_v010: built("last", "libllm_plugin_echo_v010.so"),
        memory_v010: built("last", "libllm_plugin_memory_v010.so"),
        memory_v010_ping: built("with-ping", "libllm_plugin_memory_v010_ping.so"),
        memory_v010_blocks: built("with-blocks", "libllm_plugin_memory_v010_blocks.so"),
        echo_v010_first: built("first", "libllm_plugin_echo_v010_first.so"),
        memory_v010_first: built("first", "libllm_plugin_memory_v010_first.so"),
        echo_v011: built("v0.1.1", "libllm_plugin_echo_v011.so"),
        old_host: built("last", "old-host"),
        old_host_first: built("first", "old-host-first"),
        old_host_v011: built("v0.1.1", "old-host-v011"),
    };
    Ok(fixtures)
}

// ---------------------------------------------------------------------------
// Configuration and working directories
// ---------------------------------------------------------------------------

/// A plugin library the tests can put into a plugin directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plugin {
    /// The echo model plugin.
    Echo,
    /// The in-memory store plugin.
    Memory,
    /// The fixture built against another plugin API (claims 0.0.7).
    Foreign,
    /// The fixture claiming plugin-api's version, with another layout.
    ForeignSameVersion,
    /// A newer build of echo: plugin `echo` 2.0.0, answering `echo v2: ...`.
    EchoV2,
    /// The plugin author kit's example model plugin (`template`).
    Template,
    /// The store template (`template-store`): sessions as files in a directory.
    TemplateStore,
    /// The fixture that breaks the plugin contract (plugin `broken`, model and store).
    Broken,
    /// echo built against plugin-api 0.1.0 as last published (`echo-v010`).
    EchoV010,
    /// memory built against plugin-api 0.1.0 as last published (`memory-v010`).
    MemoryV010,
    /// memory built against plugin-api 0.1.0 with `ping` (`memory-v010-ping`).
    MemoryV010Ping,
    /// memory built against plugin-api 0.1.0 with `blocks` (`memory-v010-blocks`).
    MemoryV010Blocks,
    /// echo built against plugin-api 0.1.0 as first released (`echo-v010-first`).
    EchoV010First,
    /// memory built against plugin-api 0.1.0 as first released (`memory-v010-first`).
    MemoryV010First,
    /// echo built against plugin-api 0.1.1 (`echo-v011`).
    EchoV011,
}

impl Plugin {
    /// The built library.
    pub fn path(self) -> &'static Path {
        let artifacts = artifacts();
        match self {
            Plugin::Echo => &artifacts.echo,
            Plugin::Memory => &artifacts.memory,
            Plugin::Foreign => &artifacts.foreign,
            Plugin::ForeignSameVersion => &artifacts.foreign_same_version,
            Plugin::EchoV2 => &artifacts.echo_v2,
            Plugin::Template => &artifacts.template,
            Plugin::TemplateStore => &artifacts.template_store,
            Plugin::Broken => &artifacts.broken,
            Plugin::EchoV010 => &contract_fixtures().echo_v010,
            Plugin::MemoryV010 => &contract_fixtures().memory_v010,
            Plugin::MemoryV010Ping => &contract_fixtures().memory_v010_ping,
            Plugin::MemoryV010Blocks => &contract_fixtures().memory_v010_blocks,
            Plugin::EchoV010First => &contract_fixtures().echo_v010_first,
            Plugin::MemoryV010First => &contract_fixtures().memory_v010_first,
            Plugin::EchoV011 => &contract_fixtures().echo_v011,
        }
    }

    /// The library's file name.
    pub fn file_name(self) -> &'static str {
        match self {
            Plugin::Echo => "libllm_plugin_echo.so",
            Plugin::Memory => "libllm_plugin_memory.so",
            Plugin::Foreign | Plugin::ForeignSameVersion => "libllm_host_foreign_plugin_fixture.so",
            Plugin::EchoV2 => "libllm_host_echo_v2_fixture.so",
            Plugin::Template => "libllm_plugin_template.so",
            Plugin::TemplateStore => "libllm_plugin_template_store.so",
            Plugin::Broken => "libllm_host_broken_plugin_fixture.so",
            Plugin::EchoV010 => "libllm_plugin_echo_v010.so",
            Plugin::MemoryV010 => "libllm_plugin_memory_v010.so",
            Plugin::MemoryV010Ping => "libllm_plugin_memory_v010_ping.so",
            Plugin::MemoryV010Blocks => "libllm_plugin_memory_v010_blocks.so",
            Plugin::EchoV010First => "libllm_plugin_echo_v010_first.so",
            Plugin::MemoryV010First => "libllm_plugin_memory_v010_first.so",
            Plugin::EchoV011 => "libllm_plugin_echo_v011.so",
        }
    }
}

/// The shipped plugins, which most tests use.
pub const STANDARD_PLUGINS: &[Plugin] = &[Plugin::Echo, Plugin::Memory];

/// A config.toml the tests usually run with; change fields before
/// [`Config::to_toml`].
#[derive(Clone, Debug)]
pub struct Config {
    /// `server.listen`.
    pub listen: String,
    /// `server.envelope`: `flat` or `nested`.
    pub envelope: String,
    /// `server.max_frame_bytes`.
    pub max_frame_bytes: u64,
    /// `server.max_queued_prompts`.
    pub max_queued_prompts: u64,
    /// `[models.NAME]` tables: name and the inline table of echo settings.
    pub models: Vec<(String, String)>,
    /// `plugins.debounce_ms`: how long files must be quiet before a reload.
    pub debounce_ms: u64,
    /// More `key = value` lines for `[server]`.
    pub server_extra: String,
    /// More TOML at the end (e.g. `[auth]`, `[stores.*]`).
    pub extra: String,
    /// `defaults.store`.
    pub store: String,
}

impl Default for Config {
    fn default() -> Self {
        let models = [
            // The default backend: instant.
            ("echo", "{ delay_ms = 0 }"),
            // 100 synthetic tokens 50 ms apart: a turn that runs for 5 s.
            ("slow", "{ delay_ms = 50, tokens = 100 }"),
            // Echoes the prompt, 100 ms per word: turns whose text tells them apart.
            ("slow_echo", "{ delay_ms = 100 }"),
            // Three synthetic tokens.
            ("short", "{ tokens = 3 }"),
            // An error event after one token.
            ("failing", "{ fail_after = 1 }"),
            // A panic after one token.
            ("panicky", "{ panic_after = 1 }"),
        ];
        Self {
            listen: "127.0.0.1:0".to_owned(),
            envelope: "flat".to_owned(),
            max_frame_bytes: 65536,
            max_queued_prompts: 8,
            models: models
                .iter()
                .map(|(name, settings)| ((*name).to_owned(), (*settings).to_owned()))
                .collect(),
            debounce_ms: 200,
            server_extra: String::new(),
            extra: String::new(),
            store: "memory".to_owned(),
        }
    }
}

impl Config {
    /// The default config with envelope `nested`.
    pub fn nested() -> Self {
        Self {
            envelope: "nested".to_owned(),
            ..Self::default()
        }
    }

    /// The config's text. The plugin directory is `plugins`, relative to the
    /// config file.
    pub fn to_toml(&self) -> String {
        let mut text = format!(
            "[server]\nlisten = \"{}\"\nenvelope = \"{}\"\nmax_frame_bytes = {}\n\
             max_queued_prompts = {}\n{}\n\n[plugins]\ndir = \"plugins\"\ndebounce_ms = {}\n\n\
             [defaults]\nmodel = \"echo\"\nstore = \"{}\"\n",
            self.listen,
            self.envelope,
            self.max_frame_bytes,
            self.max_queued_prompts,
            self.server_extra,
            self.debounce_ms,
            self.store
        );
        for (name, settings) in &self.models {
            text.push_str(&format!(
                "\n[models.{name}]\nplugin = \"echo\"\nsettings = {settings}\n"
            ));
        }
        text.push_str("\n[stores.memory]\nplugin = \"memory\"\n");
        text.push_str(&self.extra);
        text
    }
}

/// What a finished `llm-host` run printed.
#[derive(Debug)]
pub struct Exit {
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Exit {
    /// Both streams, for assertions that do not care where a line went.
    pub fn all_output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A temporary directory with `config.toml` and `plugins/`.
pub struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    /// A directory whose `plugins/` holds copies of `plugins`, and no config yet.
    pub fn new(plugins: &[Plugin]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("llm-host-test-")
            .tempdir()
            .expect("create a temporary directory");
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir(&plugin_dir).expect("create the plugin directory");
        for plugin in plugins {
            std::fs::copy(plugin.path(), plugin_dir.join(plugin.file_name()))
                .expect("copy a plugin library into the plugin directory");
        }
        Self { dir }
    }

    /// A directory with the standard plugins and `config`.
    pub fn with_config(config: &Config) -> Self {
        let workdir = Self::new(STANDARD_PLUGINS);
        workdir.write_config(&config.to_toml());
        workdir
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `config.toml` in the directory.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Writes `config.toml`.
    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("write config.toml");
    }

    /// The `llm-host` binary with `args`, run from a directory other than
    /// this one (so relative paths must be resolved against the config file),
    /// with a clean logging environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&artifacts().host);
        command
            .args(args)
            .current_dir(std::env::temp_dir())
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// `llm-host ARGS`, which must exit by itself within [`EXIT_TIMEOUT`]
    /// (if it is still running then, it is killed and the test fails).
    pub fn run(&self, args: &[&str]) -> Exit {
        let mut child = self.command(args).spawn().expect("spawn llm-host");
        let stdout = drain(child.stdout.take().expect("stdout is piped"));
        let stderr = drain(child.stderr.take().expect("stderr is piped"));
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for llm-host") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = stderr.join().unwrap_or_default();
                panic!(
                    "`llm-host {}` did not exit within {EXIT_TIMEOUT:?}; stderr:\n{stderr}",
                    args.join(" ")
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        Exit {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        }
    }

    /// `llm-host --config <this config.toml> ARGS`, which must exit by itself.
    pub fn run_with_config(&self, args: &[&str]) -> Exit {
        let config = self.config_path();
        let config = config.to_str().expect("temporary paths are UTF-8");
        let mut all = vec!["--config", config];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// `llm-host plugins --config <this config.toml>`.
    pub fn list_plugins(&self) -> Exit {
        let config = self.config_path();
        let config = config.to_str().expect("temporary paths are UTF-8");
        self.run(&["plugins", "--config", config])
    }
}

/// Reads all of `stream` on a thread, lossily as UTF-8.
fn drain(mut stream: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

// ---------------------------------------------------------------------------
// A running host
// ---------------------------------------------------------------------------

/// A running `llm-host`, killed on drop.
pub struct Host {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    workdir: Workdir,
}

/// The address in a line containing `listening on ADDR`.
fn listening_address(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let token = rest.split_whitespace().next()?;
    let token = token.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || "[]:.".contains(c)));
    token.parse().ok()
}

impl Host {
    /// Starts the host on `config` with the standard plugins.
    pub fn start(config: &Config) -> Self {
        Self::start_in(Workdir::with_config(config), &[])
    }

    /// Starts the host with the default config.
    pub fn start_default() -> Self {
        Self::start(&Config::default())
    }

    /// Starts `llm-host --config <workdir's config> EXTRA_ARGS` and waits for
    /// its `listening on` line.
    pub fn start_in(workdir: Workdir, extra_args: &[&str]) -> Self {
        Self::start_with_env(workdir, extra_args, &[])
    }

    /// [`Host::start_in`] with more environment variables for the process.
    pub fn start_with_env(workdir: Workdir, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let config = workdir.config_path();
        let config = config.to_str().expect("temporary paths are UTF-8");
        let mut args = vec!["--config", config];
        args.extend_from_slice(extra_args);
        let mut command = workdir.command(&args);
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("spawn llm-host");

        let log = Arc::new(Mutex::new(String::new()));
        let (found, listening) = mpsc::channel::<Option<SocketAddr>>();
        let stderr = child.stderr.take().expect("stderr is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                let mut reader = BufReader::new(stderr);
                let mut line = Vec::new();
                let mut announced = false;
                loop {
                    line.clear();
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let text = String::from_utf8_lossy(&line);
                    log.lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push_str(&text);
                    if !announced {
                        if let Some(addr) = listening_address(&text) {
                            announced = true;
                            let _ = found.send(Some(addr));
                        }
                    }
                }
                // End of stderr: the host exited (or closed it) before listening.
                let _ = found.send(None);
            });
        }
        {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut line = Vec::new();
                while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    log.lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push_str(&format!("[stdout] {}", String::from_utf8_lossy(&line)));
                    line.clear();
                }
            });
        }

        let log_text = |log: &Arc<Mutex<String>>| {
            log.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone()
        };
        match listening.recv_timeout(START_TIMEOUT) {
            Ok(Some(addr)) => Self {
                child,
                addr,
                log,
                workdir,
            },
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("wait for llm-host");
                // Give the reader a moment's worth of certainty: it has hit EOF.
                panic!(
                    "llm-host exited ({status}) without a `listening on` line; log:\n{}",
                    log_text(&log)
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "llm-host printed no `listening on` line within {START_TIMEOUT:?}; log:\n{}",
                    log_text(&log)
                );
            }
        }
    }

    /// The host's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address the host listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The working directory (config and plugins).
    pub fn workdir(&self) -> &Workdir {
        &self.workdir
    }

    /// Everything the host wrote to stderr (and stdout) so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Whether the log shows `needle` within a few seconds (the host writes
    /// its log from a thread of its own, a moment after the event).
    pub async fn logged(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for the host to exit; its status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends the host a signal (`TERM`, `HUP`, ...) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// `ws://ADDR{path_and_query}`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    /// Opens a plain-mode connection.
    pub async fn connect(&self, path_and_query: &str) -> Client {
        Client::connect(&self.url(path_and_query), None).await
    }

    /// Opens a command-mode connection (subprotocol `llm-host.v1`).
    pub async fn connect_command(&self, path_and_query: &str) -> Client {
        Client::connect(&self.url(path_and_query), Some(COMMAND_PROTOCOL)).await
    }

    /// Sends a WebSocket upgrade request for `path_and_query` and returns the
    /// HTTP answer (for the errors the host gives before upgrading).
    pub async fn http_upgrade(&self, path_and_query: &str) -> HttpReply {
        http_upgrade(self.addr, path_and_query).await
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The protocol's JSON Schemas (schema/ at the workspace root)
// ---------------------------------------------------------------------------

/// `schema/server-frame.schema.json`: every frame the host sends, in
/// either envelope.
pub const SERVER_FRAME_SCHEMA: &str = include_str!("../../schema/server-frame.schema.json");

/// `schema/client-command.schema.json`: every command-mode client frame.
pub const CLIENT_COMMAND_SCHEMA: &str = include_str!("../../schema/client-command.schema.json");

/// A schema compiled once per test process.
struct Compiled {
    schemas: boon::Schemas,
    index: boon::SchemaIndex,
}

impl Compiled {
    /// Compiles `text` (draft 2020-12), failing the test if it is not a
    /// valid schema.
    fn new(file: &str, text: &str) -> Self {
        let schema: Value = serde_json::from_str(text)
            .unwrap_or_else(|err| panic!("schema/{file} is not JSON: {err}"));
        let url = format!("file:///schema/{file}");
        let mut compiler = boon::Compiler::new();
        compiler.set_default_draft(boon::Draft::V2020_12);
        let mut schemas = boon::Schemas::new();
        if let Err(err) = compiler.add_resource(&url, schema) {
            panic!("schema/{file} cannot be added: {err:#}");
        }
        let index = compiler
            .compile(&url, &mut schemas)
            .unwrap_or_else(|err| panic!("schema/{file} does not compile: {err:#}"));
        Self { schemas, index }
    }

    fn check(&self, value: &Value) -> Result<(), String> {
        self.schemas
            .validate(value, self.index)
            .map_err(|err| err.to_string())
    }
}

/// Checks `frame` against `schema/server-frame.schema.json`; the error says
/// where and why it does not conform.
pub fn check_server_frame(frame: &Value) -> Result<(), String> {
    static SCHEMA: OnceLock<Compiled> = OnceLock::new();
    SCHEMA
        .get_or_init(|| Compiled::new("server-frame.schema.json", SERVER_FRAME_SCHEMA))
        .check(frame)
}

/// Checks `command` against `schema/client-command.schema.json`; the error
/// says where and why it does not conform.
pub fn check_client_command(command: &Value) -> Result<(), String> {
    static SCHEMA: OnceLock<Compiled> = OnceLock::new();
    SCHEMA
        .get_or_init(|| Compiled::new("client-command.schema.json", CLIENT_COMMAND_SCHEMA))
        .check(command)
}

// ---------------------------------------------------------------------------
// Frames and turns
// ---------------------------------------------------------------------------

/// One JSON text frame from the host.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The frame as sent.
    pub text: String,
    /// The frame parsed.
    pub json: Value,
}

impl Frame {
    /// Parses a frame; fails the test if it is not JSON or does not conform
    /// to `schema/server-frame.schema.json`.
    pub fn parse(text: &str) -> Self {
        let json = serde_json::from_str(text)
            .unwrap_or_else(|err| panic!("the host sent a frame that is not JSON ({err}): {text}"));
        if let Err(err) = check_server_frame(&json) {
            panic!(
                "the host sent a frame that does not conform to \
                 schema/server-frame.schema.json:\n{text}\n{err}"
            );
        }
        Self {
            text: text.to_owned(),
            json,
        }
    }

    /// `name`.
    pub fn name(&self) -> &str {
        self.json["name"].as_str().unwrap_or_default()
    }

    /// The event object, whichever the envelope: `data` (flat) or
    /// `data.event` (nested).
    pub fn body(&self) -> &Value {
        let data = &self.json["data"];
        if data.get("kind").is_some() {
            data
        } else {
            &data["event"]
        }
    }

    /// `kind` of the event object.
    pub fn kind(&self) -> &str {
        self.body()["kind"].as_str().unwrap_or_default()
    }

    /// The inner `event` (model, session and turn events).
    pub fn event(&self) -> &Value {
        &self.body()["event"]
    }

    /// The `entry` of a diagnostic.
    pub fn entry(&self) -> &Value {
        &self.body()["entry"]
    }

    /// `meta`.
    pub fn meta(&self) -> &Value {
        &self.body()["meta"]
    }

    /// `meta.sequence`; fails the test if it is not an integer.
    pub fn sequence(&self) -> u64 {
        self.meta()["sequence"]
            .as_u64()
            .unwrap_or_else(|| panic!("meta.sequence is not an integer in {}", self.text))
    }

    /// `event.type`.
    pub fn event_type(&self) -> &str {
        self.event()["type"].as_str().unwrap_or_default()
    }

    /// Whether this is the `interaction.turn` end frame.
    pub fn is_turn_end(&self) -> bool {
        self.name() == "interaction.turn" && self.event_type() == "end"
    }

    /// Whether this is a diagnostic.
    pub fn is_diagnostic(&self) -> bool {
        self.name() == "interaction.diagnostic"
    }

    /// `entry.data.code` of a diagnostic.
    pub fn diagnostic_code(&self) -> &str {
        self.entry()["data"]["code"].as_str().unwrap_or_default()
    }
}

/// The frames of one turn, up to and including its `interaction.turn` end.
#[derive(Clone, Debug)]
pub struct Turn {
    /// Every frame read, in order (diagnostics included).
    pub frames: Vec<Frame>,
}

impl Turn {
    /// The `interaction.model` frames.
    pub fn model_frames(&self) -> Vec<&Frame> {
        self.frames
            .iter()
            .filter(|frame| frame.name() == "interaction.model")
            .collect()
    }

    /// The `event.type` of each model frame, in order.
    pub fn model_types(&self) -> Vec<&str> {
        self.model_frames()
            .into_iter()
            .map(Frame::event_type)
            .collect()
    }

    /// The text deltas, in order.
    pub fn deltas(&self) -> Vec<&str> {
        self.model_frames()
            .into_iter()
            .filter(|frame| frame.event_type() == "delta")
            .filter_map(|frame| frame.event()["text"].as_str())
            .collect()
    }

    /// The text deltas joined.
    pub fn text(&self) -> String {
        self.deltas().concat()
    }

    /// The model event of `type_`, if there is one.
    pub fn model_event(&self, type_: &str) -> Option<&Value> {
        self.model_frames()
            .into_iter()
            .find(|frame| frame.event_type() == type_)
            .map(Frame::event)
    }

    /// `finishReason` of the model `end` event.
    pub fn finish_reason(&self) -> Option<&str> {
        self.model_event("end")?["finishReason"].as_str()
    }

    /// `usage.inputTokens` of the model `usage` event.
    pub fn input_tokens(&self) -> Option<u64> {
        self.model_event("usage")?["usage"]["inputTokens"].as_u64()
    }

    /// The last frame: the turn end.
    pub fn end(&self) -> &Frame {
        self.frames
            .last()
            .expect("a turn has at least its end frame")
    }

    /// `status` of the turn end.
    pub fn status(&self) -> &str {
        self.end().event()["status"].as_str().unwrap_or_default()
    }

    /// `interactionId` of the turn end.
    pub fn interaction_id(&self) -> &str {
        self.end().event()["interactionId"]
            .as_str()
            .unwrap_or_default()
    }

    /// The frames that belong to the turn (everything but diagnostics).
    pub fn turn_frames(&self) -> Vec<&Frame> {
        self.frames
            .iter()
            .filter(|frame| !frame.is_diagnostic())
            .collect()
    }

    /// `meta.sequence` of the turn's own frames, in order.
    pub fn sequences(&self) -> Vec<u64> {
        self.turn_frames()
            .into_iter()
            .map(Frame::sequence)
            .collect()
    }

    /// The diagnostics read during the turn.
    pub fn diagnostics(&self) -> Vec<&Frame> {
        self.frames
            .iter()
            .filter(|frame| frame.is_diagnostic())
            .collect()
    }

    /// The whole turn as text, for failure messages.
    pub fn dump(&self) -> String {
        self.frames
            .iter()
            .map(|frame| frame.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Words separated by whitespace, as echo counts tokens.
pub fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

// ---------------------------------------------------------------------------
// The WebSocket client
// ---------------------------------------------------------------------------

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the host did instead of sending a data frame.
#[derive(Debug)]
pub enum Ending {
    /// A close frame (with its code and reason, if any).
    Close(Option<CloseFrame>),
    /// The connection ended without a close frame.
    Eof,
    /// Reading failed.
    Error(String),
}

/// A WebSocket connection to the host.
pub struct Client {
    socket: Socket,
    url: String,
    /// The subprotocol the host selected.
    pub protocol: Option<String>,
}

impl Client {
    /// Connects to `url`, asking for `subprotocol` if given.
    pub async fn connect(url: &str, subprotocol: Option<&str>) -> Self {
        let mut request = url
            .into_client_request()
            .unwrap_or_else(|err| panic!("bad test URL {url}: {err}"));
        if let Some(subprotocol) = subprotocol {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(subprotocol).expect("a valid header value"),
            );
        }
        let connecting = tokio_tungstenite::connect_async(request);
        let (socket, response) = tokio::time::timeout(FRAME_TIMEOUT, connecting)
            .await
            .unwrap_or_else(|_| panic!("connecting to {url} took over {FRAME_TIMEOUT:?}"))
            .unwrap_or_else(|err| panic!("connecting to {url} failed: {err}"));
        let protocol = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        Self {
            socket,
            url: url.to_owned(),
            protocol,
        }
    }

    /// Opens a WebSocket to `url` over `stream`, a TCP connection the test
    /// made (from a chosen source address, say).
    pub async fn over(stream: TcpStream, url: &str, subprotocol: Option<&str>) -> Self {
        let mut request = url
            .into_client_request()
            .unwrap_or_else(|err| panic!("bad test URL {url}: {err}"));
        if let Some(subprotocol) = subprotocol {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(subprotocol).expect("a valid header value"),
            );
        }
        let connecting = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream));
        let (socket, response) = tokio::time::timeout(FRAME_TIMEOUT, connecting)
            .await
            .unwrap_or_else(|_| panic!("connecting to {url} took over {FRAME_TIMEOUT:?}"))
            .unwrap_or_else(|err| panic!("connecting to {url} failed: {err}"));
        let protocol = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        Self {
            socket,
            url: url.to_owned(),
            protocol,
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        self.socket
            .send(Message::text(text))
            .await
            .unwrap_or_else(|err| panic!("sending a text frame to {} failed: {err}", self.url));
    }

    /// Sends `value` as a JSON text frame (command mode).
    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(value.to_string()).await;
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.socket
            .send(Message::binary(bytes))
            .await
            .unwrap_or_else(|err| panic!("sending a binary frame to {} failed: {err}", self.url));
    }

    /// The next data frame as text, or how the connection ended instead.
    /// Pings and pongs are skipped. Fails the test after [`FRAME_TIMEOUT`],
    /// and on a frame that is not JSON or does not conform to the
    /// server-frame schema (see [`Frame::parse`]).
    pub async fn next_text(&mut self) -> Result<String, Ending> {
        self.next_frame().await.map(|frame| frame.text)
    }

    /// The next data frame, parsed and checked against the server-frame
    /// schema (see [`Frame::parse`]), or how the connection ended instead.
    /// Pings and pongs are skipped. Fails the test after [`FRAME_TIMEOUT`].
    pub async fn next_frame(&mut self) -> Result<Frame, Ending> {
        loop {
            let next = tokio::time::timeout(FRAME_TIMEOUT, self.socket.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no frame from {} within {FRAME_TIMEOUT:?} (the host sent nothing more)",
                        self.url
                    )
                });
            match next {
                None => return Err(Ending::Eof),
                Some(Err(err)) => return Err(Ending::Error(err.to_string())),
                Some(Ok(Message::Text(text))) => return Ok(Frame::parse(text.as_str())),
                Some(Ok(Message::Binary(bytes))) => {
                    panic!("the host sent a binary frame ({} bytes)", bytes.len())
                }
                Some(Ok(Message::Close(frame))) => return Err(Ending::Close(frame)),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            }
        }
    }

    /// The next frame, parsed. Fails the test if none comes within
    /// [`FRAME_TIMEOUT`] or the connection ends.
    pub async fn next_json(&mut self) -> Frame {
        match self.next_frame().await {
            Ok(frame) => frame,
            Err(ending) => panic!(
                "expected a frame from {}, but the connection ended: {ending:?}",
                self.url
            ),
        }
    }

    /// Frames up to and including the next `interaction.turn` end.
    pub async fn read_turn(&mut self) -> Turn {
        let mut frames = Vec::new();
        loop {
            let frame = match self.next_frame().await {
                Ok(frame) => frame,
                Err(ending) => panic!(
                    "the connection ended ({ending:?}) in the middle of a turn; frames so far:\n{}",
                    Turn { frames }.dump()
                ),
            };
            let end = frame.is_turn_end();
            frames.push(frame);
            if end {
                return Turn { frames };
            }
        }
    }

    /// Reads frames until one of `name` and `event.type` `type_`, and returns
    /// all of them (that one last).
    pub async fn read_until(&mut self, name: &str, type_: &str) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next_json().await;
            let found = frame.name() == name && frame.event_type() == type_;
            frames.push(frame);
            if found {
                return frames;
            }
        }
    }

    /// Reads frames until the connection ends, and returns how it ended.
    pub async fn expect_end(&mut self) -> Ending {
        loop {
            match self.next_text().await {
                Ok(_) => {}
                Err(ending) => return ending,
            }
        }
    }

    /// Closes the connection with a close handshake, skipping frames that
    /// were still on their way.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
        let draining = async {
            while let Some(Ok(message)) = self.socket.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(FRAME_TIMEOUT, draining).await;
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------

/// The host's HTTP answer to an upgrade request.
#[derive(Debug)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The header lines, as received.
    pub headers: String,
    /// The body as text.
    pub body: String,
}

impl HttpReply {
    /// The body parsed as JSON; fails the test if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|err| {
            panic!(
                "the HTTP {} body is not JSON ({err}): {:?}",
                self.status, self.body
            )
        })
    }
}

/// Sends a WebSocket upgrade request for `path_and_query` over a plain TCP
/// connection and reads the answer's status, headers and body (by
/// `Content-Length`, chunked encoding, or until the connection closes).
pub async fn http_upgrade(addr: SocketAddr, path_and_query: &str) -> HttpReply {
    let request = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    exchange(addr, request, &format!("GET {path_and_query}")).await
}

/// Sends a plain HTTP request (`method` `path_and_query`, no body) and reads
/// the whole answer.
pub async fn http(addr: SocketAddr, method: &str, path_and_query: &str) -> HttpReply {
    http_with(addr, method, path_and_query, &[]).await
}

/// [`http`] with extra request headers.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> HttpReply {
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\
         {extra}Connection: close\r\n\r\n"
    );
    exchange(addr, request, &format!("{method} {path_and_query}")).await
}

async fn exchange(addr: SocketAddr, request: String, what: &str) -> HttpReply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to the host");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the request");

        let mut buffer = Vec::new();
        let header_end = loop {
            if let Some(at) = find(&buffer, b"\r\n\r\n") {
                break at;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read the answer");
            assert!(
                n > 0,
                "the connection closed before the answer's headers ended: {:?}",
                String::from_utf8_lossy(&buffer)
            );
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..header_end]).into_owned();
        let mut body = buffer[header_end + 4..].to_vec();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status code in {head:?}"));
        let header = |name: &str| {
            head.lines().skip(1).find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
        };
        if status == 101 {
            // Upgraded: there is no body to read.
        } else if let Some(length) = header("content-length") {
            let length: usize = length.parse().expect("a numeric Content-Length");
            while body.len() < length {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.expect("read the body");
                assert!(n > 0, "the connection closed inside the body");
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(length);
        } else if header("transfer-encoding").is_some_and(|value| value.contains("chunked")) {
            while find(&body, b"0\r\n\r\n").is_none() {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.expect("read the body");
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body = dechunk(&body);
        } else {
            stream.read_to_end(&mut body).await.expect("read the body");
        }
        HttpReply {
            status,
            headers: head,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    };
    tokio::time::timeout(FRAME_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no complete HTTP answer to {what} within {FRAME_TIMEOUT:?}"))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(line_end) = find(data, b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            break;
        };
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        body.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_address_in_a_log_line() {
        let line = "2025-01-01T00:00:00Z  INFO llm_host: listening on 127.0.0.1:4321\n";
        assert_eq!(
            listening_address(line),
            Some("127.0.0.1:4321".parse().expect("an address"))
        );
        let line = "INFO listening on \"127.0.0.1:80\", envelope flat";
        assert_eq!(
            listening_address(line),
            Some("127.0.0.1:80".parse().expect("an address"))
        );
        assert_eq!(listening_address("INFO loading plugins"), None);
    }

    #[test]
    fn decodes_chunked_bodies() {
        assert_eq!(
            dechunk(b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"),
            b"Wikipedia"
        );
    }

    #[test]
    fn reads_both_envelopes() {
        let flat = Frame::parse(
            r#"{"name":"interaction.model","data":{"kind":"model","event":{"type":"start"},"meta":{"sequence":1,"timestamp":1764028800000,"sourceId":"model.primary","interactionId":"turn-1"}}}"#,
        );
        let nested = Frame::parse(
            r#"{"name":"interaction.model","data":{"event":{"kind":"model","event":{"type":"start"},"meta":{"sequence":1,"timestamp":1764028800000,"sourceId":"model.primary","interactionId":"turn-1"}}}}"#,
        );
        for frame in [flat, nested] {
            assert_eq!(frame.kind(), "model");
            assert_eq!(frame.event_type(), "start");
            assert_eq!(frame.sequence(), 1);
        }
    }
}

/// The schemas in schema/ against the host's own parser and frame writer.
#[cfg(test)]
mod schema_tests;
