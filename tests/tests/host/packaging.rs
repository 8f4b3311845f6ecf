//! The packaging in `packaging/`, run where this machine can run it.
//!
//! - The container: its config (`packaging/config.toml`) on the layout its builder
//!   stage makes (`scripts/install.sh`), validated and served with its keys from
//!   the environment, its healthcheck script against a live and a dead host, the
//!   libraries its slim runtime must provide, and its Dockerfile's shell steps
//!   and sources. This machine has the docker client but no engine: the image
//!   itself is never built here.
//! - The systemd unit: `systemd-analyze verify` and `security --offline`, then the
//!   host run as the unit runs it (its runtime directory and environment, reload
//!   by SIGHUP, stop by SIGTERM within `TimeoutStopSec`). No systemd runs here as
//!   a service manager, so the unit is never started by one.
//! - The nginx example in front of two hosts sharing Redis: WebSocket turns, a
//!   session resumed through either host, the HTTP API, `/readyz`, and a new
//!   connection after one host stopped.
//!
//! nginx, Redis and systemd-analyze are the machine's (`.ci/run` installs nginx);
//! a test that misses one says it skipped, and fails instead under `CI=true`.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use llm_host_conformance::support::{env_or, skip_or_fail, unique_token};
use llm_host_tests::{
    artifacts, build_packages, http, http_with, words, workspace_root, Client, Config, Host,
    Workdir,
};
use tempfile::TempDir;

use crate::common::{free_port, SHIPPED};

/// The secrets the packaged config reads from `LLM_HOST_API_KEY` and
/// `LLM_HOST_ADMIN_KEY`.
const CLIENT_KEY: &str = "packaging-client-key-0123456789";
const ADMIN_KEY: &str = "packaging-admin-key-0123456789";

fn packaging_file(name: &str) -> String {
    let path = workspace_root().join("packaging").join(name);
    fs::read_to_string(&path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

/// `text` with its one `from` replaced by `to`; fails if `from` is not there
/// exactly once (the packaged file changed under the test).
fn replace_once(text: &str, from: &str, to: &str) -> String {
    let found = text.matches(from).count();
    assert_eq!(
        found, 1,
        "expected `{from}` once in the packaged file, found it {found} times:\n{text}"
    );
    text.replacen(from, to, 1)
}

/// The value of the first `key = N` line of `text`.
fn number_setting(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let (name, rest) = line.split_once('=')?;
            (name.trim() == key)
                .then(|| rest.split('#').next().unwrap_or("").trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no numeric `{key} = ...` line in:\n{text}"))
}

/// The value of the first `Key=value` line of a unit file.
fn unit_setting<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("the unit has no {key}= line"))
}

fn run(command: &mut Command) -> (ExitStatus, String) {
    let described = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("run {described}: {err}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, text)
}

/// `packaging/healthcheck.sh ADDR`, the container's HEALTHCHECK.
fn healthcheck(addr: SocketAddr) -> (ExitStatus, String) {
    run(Command::new("bash")
        .arg(workspace_root().join("packaging/healthcheck.sh"))
        .arg(addr.to_string()))
}

// ---------------------------------------------------------------------------
// The installed layout, as the image and the unit have it
// ---------------------------------------------------------------------------

/// `scripts/install.sh` run into `ROOT/opt/llm-host` (the builder stage), with
/// `packaging/config.toml` as `ROOT/etc/llm-host/config.toml` reading that
/// layout and keeping its sessions in `ROOT/var/lib/llm-host`: the two
/// absolute paths of the config are the only changes.
struct Installation {
    root: TempDir,
    config_text: String,
}

impl Installation {
    fn new() -> Self {
        let built = build_packages(SHIPPED);
        let root = tempfile::Builder::new()
            .prefix("llm-host-packaging-")
            .tempdir()
            .expect("a temporary directory");
        let opt = root.path().join("opt/llm-host");
        let (status, output) = run(Command::new("bash")
            .arg(workspace_root().join("scripts/install.sh"))
            .arg("--from")
            .arg(&built)
            .arg(&opt));
        assert!(status.success(), "install.sh failed:\n{output}");
        let state = root.path().join("var/lib/llm-host");
        fs::create_dir_all(&state).expect("create the state directory");
        // The image's /tmp: where the host stages plugin copies when
        // XDG_RUNTIME_DIR is not set.
        let tmp = root.path().join("tmp");
        fs::create_dir_all(&tmp).expect("create tmp");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).expect("chmod tmp");

        let text = packaging_file("config.toml");
        let text = replace_once(
            &text,
            "\"/opt/llm-host/plugins\"",
            &format!("\"{}\"", opt.join("plugins").display()),
        );
        let config_text = replace_once(
            &text,
            "\"/var/lib/llm-host/sessions.db\"",
            &format!("\"{}\"", state.join("sessions.db").display()),
        );
        let etc = root.path().join("etc/llm-host");
        fs::create_dir_all(&etc).expect("create etc/llm-host");
        fs::write(etc.join("config.toml"), &config_text).expect("write the config");
        Self { root, config_text }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.path().join(relative)
    }

    /// `opt/llm-host/bin/llm-host validate --config etc/llm-host/config.toml`
    /// with `env` (and nothing of the test's own logging or runtime directory).
    fn validate(&self, env: &[(&str, &str)]) -> (ExitStatus, String) {
        let mut command = Command::new(self.path("opt/llm-host/bin/llm-host"));
        command
            .arg("validate")
            .arg("--config")
            .arg(self.path("etc/llm-host/config.toml"))
            .current_dir(self.path("var/lib/llm-host"))
            .env_remove("RUST_LOG")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("LLM_HOST_API_KEY")
            .env_remove("LLM_HOST_ADMIN_KEY")
            .env("TMPDIR", self.path("tmp"))
            .envs(env.iter().copied());
        run(&mut command)
    }

    /// The host serving this config on a loopback port of its own, with `env`.
    fn serve(&self, env: &[(&str, &str)]) -> Host {
        let workdir = Workdir::new(&[]);
        workdir.write_config(&self.config_text);
        Host::start_with_env(workdir, &["--listen", "127.0.0.1:0"], env)
    }
}

/// The effective uid of this process (the owner of a file it creates).
fn own_uid(installation: &Installation) -> u32 {
    fs::metadata(installation.path("tmp/.."))
        .expect("metadata of the temporary directory")
        .uid()
}

// The container: its config validates on the builder stage's layout with the two keys in
// the environment (and names the missing one without), stages plugins in /tmp as the
// image leaves it, and serves: clients need the key, the admin routes the admin key, and
// the healthcheck script passes against the live host and fails once it is gone.
#[tokio::test]
async fn the_container_config_validates_and_serves_with_its_keys() {
    let installation = Installation::new();
    let keys = [
        ("LLM_HOST_API_KEY", CLIENT_KEY),
        ("LLM_HOST_ADMIN_KEY", ADMIN_KEY),
    ];
    let (status, output) = installation.validate(&keys);
    assert!(
        status.success(),
        "the container's config does not validate:\n{output}"
    );
    assert!(output.contains("valid"), "{output}");
    let staging = installation.path(&format!("tmp/llm-host-staging-{}", own_uid(&installation)));
    assert!(
        staging.is_dir(),
        "the plugins were not staged in {}:\n{output}",
        staging.display()
    );

    let (status, output) = installation.validate(&keys[..1]);
    assert!(
        !status.success(),
        "validated without LLM_HOST_ADMIN_KEY:\n{output}"
    );
    assert!(output.contains("LLM_HOST_ADMIN_KEY"), "{output}");

    let tmp = installation.path("tmp");
    let tmp = tmp.to_str().expect("temporary paths are UTF-8");
    let host = installation.serve(&[
        keys[0],
        keys[1],
        ("TMPDIR", tmp),
        // Unset in the image: not absolute, so not used.
        ("XDG_RUNTIME_DIR", ""),
    ]);
    let addr = host.addr();
    let (status, output) = healthcheck(addr);
    assert!(
        status.success(),
        "the healthcheck failed on a live host: {output}"
    );

    let refused = host.http_upgrade("/v1/ws").await;
    assert_eq!(
        refused.status, 401,
        "an upgrade without a key: {}",
        refused.body
    );
    let mut client = host.connect(&format!("/v1/ws?token={CLIENT_KEY}")).await;
    let open = client.next_json().await;
    assert_eq!(open.event_type(), "open", "{}", open.text);
    client.send_text("hello from the container").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.text(), "echo: hello from the container");
    client.close().await;

    let bearer = |key: &str| format!("Bearer {key}");
    let client_metrics = http_with(
        addr,
        "GET",
        "/metrics",
        &[("Authorization", &bearer(CLIENT_KEY))],
    )
    .await;
    assert_eq!(client_metrics.status, 403, "{}", client_metrics.body);
    let admin_metrics = http_with(
        addr,
        "GET",
        "/metrics",
        &[("Authorization", &bearer(ADMIN_KEY))],
    )
    .await;
    assert_eq!(admin_metrics.status, 200, "{}", admin_metrics.body);
    assert!(
        installation.path("var/lib/llm-host/sessions.db").is_file(),
        "no sessions.db in the state directory"
    );

    drop(host);
    let (status, _) = healthcheck(addr);
    assert!(!status.success(), "the healthcheck passed with no host");
}

// The runtime stage is debian:bookworm-slim with nothing added: every library the
// installed binaries and plugins need must be one of glibc's or libgcc_s.
#[test]
fn the_installed_files_need_only_what_the_slim_image_has() {
    let installation = Installation::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["opt/llm-host/bin", "opt/llm-host/plugins"] {
        for entry in fs::read_dir(installation.path(dir)).expect("read the installation") {
            files.push(entry.expect("an entry").path());
        }
    }
    assert!(files.len() >= 10, "{files:?}");
    let in_slim = |name: &str| {
        name.starts_with("linux-vdso.so")
            || name.starts_with("ld-linux")
            || [
                "libc.so.6",
                "libm.so.6",
                "libgcc_s.so.1",
                "libpthread.so.0",
                "libdl.so.2",
                "librt.so.1",
            ]
            .contains(&name)
    };
    for file in files {
        let (status, output) = run(Command::new("ldd").arg(&file));
        assert!(status.success(), "ldd {}: {output}", file.display());
        for line in output.lines() {
            let Some(first) = line.split_whitespace().next() else {
                continue;
            };
            let name = Path::new(first)
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or(first);
            assert!(
                in_slim(name) && !line.contains("not found"),
                "{} needs {name}, which debian:bookworm-slim does not have:\n{output}",
                file.display()
            );
        }
    }
}

/// The instructions of a Dockerfile: continuation lines joined, comments dropped.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let mut all = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (word, rest) = current.split_once(' ').unwrap_or((current.as_str(), ""));
                all.push((word.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    all
}

/// `(major, minor)` of a version like `1.89` or `1.89.0`.
fn major_minor(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor),
        _ => panic!("not a version: {version:?}"),
    }
}

// What of the image build runs without an engine: each RUN step's shell is valid, each
// file the build copies from the context exists and is not ignored, the builder's Rust is
// at least the workspace's rust-version on the runtime's Debian release, and the
// HEALTHCHECK, USER, EXPOSE and STOPSIGNAL agree with the files they name.
#[test]
fn the_dockerfile_builds_from_what_the_repository_has() {
    let dockerfile = packaging_file("Dockerfile");
    let steps = instructions(&dockerfile);
    let root = workspace_root();
    let ignored: Vec<String> = fs::read_to_string(root.join(".dockerignore"))
        .expect("a .dockerignore at the repository root")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            line.trim_start_matches("**/")
                .trim_end_matches('/')
                .to_owned()
        })
        .collect();
    for excluded in ["target", "dist"] {
        assert!(ignored.iter().any(|line| line == excluded), "{ignored:?}");
    }

    let arg = |name: &str| {
        steps
            .iter()
            .find_map(|(word, rest)| {
                (word == "ARG").then(|| rest.strip_prefix(name)?.strip_prefix('='))?
            })
            .unwrap_or_else(|| panic!("no ARG {name}=... in the Dockerfile"))
    };
    let cargo_toml = fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let wanted = cargo_toml
        .lines()
        .find_map(|line| line.strip_prefix("rust-version = "))
        .expect("the workspace's rust-version")
        .trim_matches('"');
    let pinned = arg("RUST_VERSION");
    assert!(
        major_minor(pinned) >= major_minor(wanted),
        "the builder's Rust {pinned} is older than rust-version {wanted}"
    );
    let images: Vec<&str> = steps
        .iter()
        .filter(|(word, _)| word == "FROM")
        .map(|(_, rest)| rest.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        images,
        ["rust:${RUST_VERSION}-bookworm", "debian:bookworm-slim"],
        "a Rust builder and a slim runtime of one Debian release (one glibc)"
    );

    let mut destinations = Vec::new();
    for (word, rest) in &steps {
        match word.as_str() {
            "RUN" => {
                let script: Vec<&str> = rest
                    .split_whitespace()
                    .skip_while(|part| part.starts_with("--mount="))
                    .collect();
                let script = script.join(" ");
                let (status, output) = run(Command::new("sh").arg("-n").arg("-c").arg(&script));
                assert!(status.success(), "RUN {script}\nis not valid sh: {output}");
            }
            "COPY" => {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                let (flags, paths): (Vec<&str>, Vec<&str>) =
                    parts.iter().partition(|part| part.starts_with("--"));
                let (destination, sources) = paths.split_last().expect("COPY SRC... DEST");
                destinations.push((*destination).to_owned());
                if flags.iter().any(|flag| flag.starts_with("--from=")) {
                    continue;
                }
                for source in sources {
                    let relative = source.trim_end_matches('/');
                    if relative != "." {
                        assert!(
                            root.join(relative).exists(),
                            "COPY {source}: not in the repository"
                        );
                        assert!(
                            !ignored
                                .iter()
                                .any(|line| relative.starts_with(line.as_str())),
                            "COPY {source}: excluded by .dockerignore"
                        );
                    }
                }
            }
            _ => {}
        }
    }

    let value = |name: &str| {
        steps
            .iter()
            .find(|(word, _)| word == name)
            .map(|(_, rest)| rest.as_str())
            .unwrap_or_else(|| panic!("no {name} in the Dockerfile"))
    };
    let healthcheck = value("HEALTHCHECK");
    let command = healthcheck
        .split_once("CMD [\"")
        .and_then(|(_, rest)| rest.split('"').next())
        .expect("HEALTHCHECK ... CMD [\"PROGRAM\", ...]");
    assert!(
        destinations
            .iter()
            .any(|destination| destination == command),
        "the HEALTHCHECK runs {command}, which no COPY puts there ({destinations:?})"
    );
    let (status, output) = run(Command::new("bash")
        .arg("-n")
        .arg(root.join("packaging/healthcheck.sh")));
    assert!(status.success(), "healthcheck.sh: {output}");

    let user = value("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| panic!("USER {user}: not a numeric uid"));
    assert_ne!(uid, 0, "the container runs as root");
    assert_eq!(value("STOPSIGNAL"), "SIGTERM");
    let config = packaging_file("config.toml");
    assert!(config.contains("listen = \"0.0.0.0:3000\""), "{config}");
    assert_eq!(value("EXPOSE"), "3000");
    assert!(destinations
        .iter()
        .any(|d| d == "/etc/llm-host/config.toml"));
    assert!(destinations.iter().any(|d| d == "/opt/llm-host/plugins/"));
}

// ---------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------

#[path = "packaging/nginx.rs"]
mod nginx;
#[path = "packaging/systemd.rs"]
mod systemd;
