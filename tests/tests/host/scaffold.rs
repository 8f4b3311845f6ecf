//! PLUGIN-GUIDE.md's quick start, as a plugin author runs it:
//! `llm-host new-plugin` writes a model plugin and a store plugin into a
//! directory outside this workspace; each builds there with cargo, passes
//! `llm-host check`, and serves in a host. The model, dropped into a running
//! host's plugin directory and named in its config, runs a turn; the store
//! keeps a session that a second host, given its files, reads back.
//!
//! The commands and the config entries are the guide's, checked to be there
//! word for word. Two things differ, to keep the test cheap and offline:
//! cargo builds in the tests' profile into the tests' target directory
//! (where the dependencies are compiled already), and the new crate gets this
//! workspace's Cargo.lock first (the same versions; nothing is fetched).
//!
//! The guide's other way to depend on the plugin-api and the conformance
//! crate, by git, is built too: against a git repository made in a temporary
//! directory from this checkout's files (uncommitted changes included), by
//! a `file://` URL.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llm_host_tests::{
    artifacts, http, workspace_root, Config, Exit, Host, Workdir, STANDARD_PLUGINS,
};
use serde_json::Value;

use crate::common::stored_messages;

/// How long a reload may take to show (debounce is 200 ms).
const RELOAD_WAIT: Duration = Duration::from_secs(20);

/// The guide's quick start: its text before section 1.
fn quick_start() -> String {
    let path = workspace_root().join("PLUGIN-GUIDE.md");
    let guide = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    let end = guide.find("\n## 1.").expect("the guide has a section 1");
    guide[..end].to_owned()
}

/// Fails unless the quick start says `text` word for word.
fn assert_says(quick_start: &str, text: &str) {
    assert!(
        quick_start.contains(text),
        "PLUGIN-GUIDE.md's quick start no longer says `{text}`; keep it and this test in \
         step:\n{quick_start}"
    );
}

/// The quick start's ```toml block that contains `table`.
fn toml_block(quick_start: &str, table: &str) -> String {
    quick_start
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .find(|block| block.contains(table))
        .unwrap_or_else(|| panic!("no ```toml block with {table} in the quick start"))
        .to_owned()
}

/// A temporary directory outside this workspace (no Cargo.toml above it
/// belongs to it), as a plugin author's would be.
fn outside() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("llm-host-quick-start-")
        .tempdir()
        .expect("create a temporary directory");
    assert!(
        !dir.path().starts_with(workspace_root()),
        "{} is inside the workspace",
        dir.path().display()
    );
    dir
}

/// `llm-host ARGS`, run in `dir`.
fn llm_host(dir: &Path, args: &[&str]) -> Exit {
    let output = Command::new(&artifacts().host)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run llm-host");
    Exit {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `llm-host new-plugin ARGS` in `dir`, which must succeed; answers the
/// crate's directory, `dir/NAME`.
fn new_plugin(dir: &Path, args: &[&str]) -> PathBuf {
    let mut all = vec!["new-plugin"];
    all.extend_from_slice(args);
    let exit = llm_host(dir, &all);
    assert_eq!(exit.status.code(), Some(0), "{exit}");
    let crate_dir = dir.join(args[0]);
    assert!(
        exit.stdout.contains(&format!("cd {}", args[0])),
        "it says what to do next: {exit}"
    );
    for file in [
        "Cargo.toml",
        "src/lib.rs",
        "src/tests.rs",
        ".gitignore",
        "README.md",
    ] {
        assert!(crate_dir.join(file).is_file(), "no {file}: {exit}");
    }
    crate_dir
}

/// `cargo build` in `crate_dir` (the guide's `cargo build --release`, in the
/// tests' profile and target directory, with this workspace's Cargo.lock);
/// answers the built library `lib<lib>.so`. `offline`: cargo may not
/// fetch anything (a git dependency, even by a `file://` URL, is a fetch).
fn build(quick_start: &str, crate_dir: &Path, lib: &str, offline: bool) -> PathBuf {
    assert_says(quick_start, "cargo build --release");
    let profile_dir = artifacts()
        .host
        .parent()
        .expect("the profile directory")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("the target directory");
    let profile = profile_dir
        .file_name()
        .and_then(|name| name.to_str())
        .expect("a profile name");
    std::fs::copy(
        workspace_root().join("Cargo.lock"),
        crate_dir.join("Cargo.lock"),
    )
    .expect("copy the workspace's Cargo.lock");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    command
        .arg("build")
        .current_dir(crate_dir)
        .env("CARGO_TARGET_DIR", target_dir)
        .env("CARGO_NET_OFFLINE", offline.to_string())
        .stdin(Stdio::null());
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.arg("--profile").arg(other);
        }
    }
    let began = Instant::now();
    let output = command.output().expect("run cargo");
    assert!(
        output.status.success(),
        "{command:?} in {} failed:\n{}{}",
        crate_dir.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("built {} in {:.1?}", crate_dir.display(), began.elapsed());
    let library = profile_dir.join(format!("lib{lib}.so"));
    assert!(library.is_file(), "the build made no {}", library.display());
    library
}

/// Fails unless `exit` is a report that the plugin `name` conforms.
fn assert_conforms(exit: &Exit, name: &str) {
    assert_eq!(exit.status.code(), Some(0), "{exit}");
    assert!(
        exit.stdout.contains(&format!("PASS load: plugin `{name}`")),
        "{exit}"
    );
    assert!(!exit.stdout.contains("FAIL"), "{exit}");
    let summary = exit.stdout.lines().last().unwrap_or_default();
    assert!(summary.ends_with(" conforms"), "{exit}");
}

/// The operator's drop-in, as the guide shows it: a copy under a temporary
/// name in the plugin directory, renamed into place.
fn drop_in(library: &Path, plugin_dir: &Path) {
    let name = library
        .file_name()
        .and_then(|name| name.to_str())
        .expect("a library name");
    let temporary = plugin_dir.join(format!(".{name}.tmp"));
    std::fs::copy(library, &temporary).expect("copy the library in");
    std::fs::rename(&temporary, plugin_dir.join(name)).expect("rename it into place");
}

async fn plugins(host: &Host) -> Value {
    let reply = http(host.addr(), "GET", "/v1/plugins").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// Waits until `GET /v1/plugins` says plugin `name` serves `entry`.
async fn wait_until_used(host: &Host, name: &str, entry: &str) {
    let deadline = Instant::now() + RELOAD_WAIT;
    loop {
        let status = plugins(host).await;
        let used = status["plugins"].as_array().is_some_and(|plugins| {
            plugins.iter().any(|p| {
                p["name"] == name
                    && p["usedBy"]
                        .as_array()
                        .is_some_and(|u| u.contains(&Value::from(entry)))
            })
        });
        if used {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waited {RELOAD_WAIT:?} for plugin {name} to serve {entry}; /v1/plugins: \
             {status:#}\nlog:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// The quick start's model plugin: written, built outside the workspace,
// checked, then dropped into a running host and named in its config, where
// it answers a turn.
#[tokio::test]
async fn the_quick_starts_model_plugin_serves_a_turn() {
    let guide = quick_start();
    let dir = outside();
    assert_says(&guide, "llm-host new-plugin mine --kind model ");
    let crate_dir = new_plugin(dir.path(), &["mine", "--kind", "model"]);
    assert_says(&guide, "\ncd mine\n");
    let library = build(&guide, &crate_dir, "llm_plugin_mine", true);
    assert_says(&guide, "target/release/libllm_plugin_mine.so");

    let settings = r#"{"transform": "reverse"}"#;
    assert_says(
        &guide,
        &format!("llm-host check target/release/libllm_plugin_mine.so --settings '{settings}'"),
    );
    let library_path = library.to_str().expect("UTF-8 build paths");
    let exit = llm_host(&crate_dir, &["check", library_path, "--settings", settings]);
    assert_conforms(&exit, "mine");

    // A host already serving; the library goes into its plugin directory the
    // guide's way, and the guide's entry into its config.
    let host = Host::start_default();
    assert_says(
        &guide,
        "cp target/release/libllm_plugin_mine.so /srv/llm-host/plugins/.libllm_plugin_mine.so.tmp \\\n  \
         && mv -f /srv/llm-host/plugins/.libllm_plugin_mine.so.tmp \
         /srv/llm-host/plugins/libllm_plugin_mine.so",
    );
    drop_in(&library, &host.workdir().path().join("plugins"));
    let entry = toml_block(&guide, "[models.mine]");
    host.workdir()
        .write_config(&format!("{}\n{entry}", Config::default().to_toml()));
    wait_until_used(&host, "mine", "mine").await;

    assert_says(&guide, "`?model=mine`");
    let mut client = host.connect("/v1/ws?model=mine").await;
    client.next_json().await;
    client.send_text("hello plugin world").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.text(), "olleh nigulp dlrow", "{}", turn.dump());
    assert_eq!(
        turn.model_event("start")
            .map(|start| start["modelId"].clone()),
        Some(Value::from("mine-reverse")),
        "{}",
        turn.dump()
    );
}

// The quick start's store plugin: written (against `--api`, the plugin-api
// of this checkout), built outside the workspace, checked with no settings
// (sessions in ./sessions), then a host's store: a turn's session is a file
// in the directory the guide's entry names, and a second host given those
// files resumes the session.
#[tokio::test]
async fn the_quick_starts_store_plugin_keeps_sessions() {
    let guide = quick_start();
    let dir = outside();
    assert_says(&guide, "`llm-host new-plugin mystore --kind store`");
    let api = workspace_root().join("plugin-api");
    let api = api.to_str().expect("UTF-8 paths");
    let crate_dir = new_plugin(dir.path(), &["mystore", "--kind", "store", "--api", api]);
    let library = build(&guide, &crate_dir, "llm_plugin_mystore", true);

    assert_says(
        &guide,
        "`llm-host check target/release/libllm_plugin_mystore.so --kind store`",
    );
    let library_path = library.to_str().expect("UTF-8 build paths");
    let exit = llm_host(&crate_dir, &["check", library_path, "--kind", "store"]);
    assert_conforms(&exit, "mystore");
    assert!(
        crate_dir.join("sessions/.lock").is_file(),
        "the check's store was in ./sessions: {exit}"
    );

    assert_says(&guide, "`[defaults] store = \"mystore\"`");
    let config = Config {
        store: "mystore".to_owned(),
        extra: format!("\n{}", toml_block(&guide, "[stores.mystore]")),
        ..Config::default()
    };
    let start = |sessions: Option<&Path>| {
        let workdir = Workdir::new(STANDARD_PLUGINS);
        drop_in(&library, &workdir.path().join("plugins"));
        workdir.write_config(&config.to_toml());
        if let Some(sessions) = sessions {
            copy_dir(sessions, &workdir.path().join("sessions"));
        }
        Host::start_in(workdir, &[])
    };

    let host = start(None);
    let mut client = host.connect("/v1/ws?session=quick-start").await;
    client.next_json().await;
    client.send_text("remember this").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    client.close().await;
    let sessions = host.workdir().path().join("sessions");
    let file = std::fs::read_to_string(sessions.join("quick-start.session"))
        .unwrap_or_else(|err| panic!("the session's file: {err}\nlog:\n{}", host.log()));
    assert!(file.contains("remember this"), "{file}");

    // Another host, with the files: the session goes on where it stopped.
    let kept = tempfile::tempdir().expect("a temporary directory");
    copy_dir(&sessions, kept.path());
    drop(host);
    let host = start(Some(kept.path()));
    let mut client = host.connect("/v1/ws?session=quick-start").await;
    let open = client.next_json().await;
    assert_eq!(open.event()["resumed"], true, "{}", open.text);
    client.send_text("and this").await;
    let turn = client.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.interaction_id(), "turn-2", "{}", turn.dump());
    assert_eq!(
        stored_messages(&host, "quick-start").await,
        [
            "user: remember this",
            "assistant: echo: remember this",
            "user: and this",
            "assistant: echo: and this"
        ]
    );
}

/// `git ARGS` in `dir`, which must succeed; answers its stdout, trimmed.
fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=llm-host tests",
            "-c",
            "user.email=tests@localhost",
        ])
        .args([
            "-c",
            "commit.gpgsign=false",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run git");
    assert!(
        output.status.success(),
        "git {args:?} in {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Copies the tree `from` into `to`, leaving out `target` directories.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the directory");
    for entry in std::fs::read_dir(from).expect("list the directory") {
        let entry = entry.expect("an entry");
        let (source, name) = (entry.path(), entry.file_name());
        if source.is_dir() {
            if name != "target" {
                copy_tree(&source, &to.join(&name));
            }
        } else {
            std::fs::copy(&source, to.join(&name)).expect("copy a file");
        }
    }
}

/// A git repository at `dir` with one commit of this checkout's plugin-api,
/// conformance crate and memory plugin (the conformance crate's tests use
/// it), under a root manifest with this workspace's `[workspace.*]` tables,
/// which they inherit from. Answers the commit.
fn llm_host_repository(dir: &Path) -> String {
    let root = workspace_root();
    for member in ["plugin-api", "conformance", "plugins/memory"] {
        copy_tree(&root.join(member), &dir.join(member));
    }
    let manifest =
        std::fs::read_to_string(root.join("Cargo.toml")).expect("read the root Cargo.toml");
    let mut kept = String::from(
        "[workspace]\nresolver = \"2\"\nmembers = [\"plugin-api\", \"conformance\", \
         \"plugins/memory\"]\n",
    );
    let mut keep = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            keep = line.starts_with("[workspace.");
        }
        if keep {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    std::fs::write(dir.join("Cargo.toml"), kept).expect("write the root Cargo.toml");
    git(dir, &["init", "--quiet"]);
    git(dir, &["add", "--all"]);
    git(
        dir,
        &[
            "commit",
            "--quiet",
            "--message",
            "llm-host for a git dependency",
        ],
    );
    git(dir, &["rev-parse", "HEAD"])
}

/// The quick start's `# or: NAME = { git = ... }` line for crate `name`,
/// its URL and commit filled in.
fn git_line(quick_start: &str, name: &str, url: &str, commit: &str) -> String {
    let prefix = format!("# or: {name} = {{ git = ");
    let line = quick_start
        .lines()
        .map(str::trim_start)
        .find(|line| line.starts_with(&prefix))
        .and_then(|line| line.strip_prefix("# or: "))
        .unwrap_or_else(|| panic!("the quick start shows no `{prefix}...` line:\n{quick_start}"));
    assert!(
        line.contains("\"URL of the llm-host repository\"") && line.contains("rev = \"COMMIT\""),
        "{line}"
    );
    line.replace("URL of the llm-host repository", url)
        .replace("COMMIT", commit)
}

// The quick start's git dependency lines: a model plugin written by
// new-plugin, its path dependencies replaced by the guide's git lines
// pointing at a git repository of this checkout (a `file://` URL and a
// commit), builds outside the workspace against the plugin-api from that
// repository (the lock file says so, the conformance crate's included) and
// passes `llm-host check`.
#[test]
fn a_plugin_depending_on_the_plugin_api_by_git_builds_and_conforms() {
    let guide = quick_start();
    let dir = outside();
    let repository = dir.path().join("llm-host");
    let commit = llm_host_repository(&repository);
    let url = format!("file://{}", repository.display());
    let crate_dir = new_plugin(dir.path(), &["gitmine", "--kind", "model"]);
    let manifest_path = crate_dir.join("Cargo.toml");
    let mut manifest = std::fs::read_to_string(&manifest_path).expect("read Cargo.toml");
    for name in ["llm-host-plugin-api", "llm-host-conformance"] {
        let by_path = manifest
            .lines()
            .find(|line| line.starts_with(&format!("{name} = {{ path = ")))
            .unwrap_or_else(|| panic!("no path dependency on {name}:\n{manifest}"))
            .to_owned();
        manifest = manifest.replace(&by_path, &git_line(&guide, name, &url, &commit));
    }
    std::fs::write(&manifest_path, &manifest).expect("write Cargo.toml");
    let library = build(&guide, &crate_dir, "llm_plugin_gitmine", false);

    let lock = std::fs::read_to_string(crate_dir.join("Cargo.lock")).expect("read Cargo.lock");
    let source = format!("source = \"git+{url}?rev={commit}#{commit}\"");
    for name in ["llm-host-plugin-api", "llm-host-conformance"] {
        let package = lock
            .split("[[package]]")
            .find(|package| package.contains(&format!("name = \"{name}\"\n")))
            .unwrap_or_else(|| panic!("{name} is not in the lock file:\n{lock}"));
        assert!(package.contains(&source), "{name} from {url}:\n{package}");
    }

    let library_path = library.to_str().expect("UTF-8 build paths");
    let exit = llm_host(&crate_dir, &["check", library_path]);
    assert_conforms(&exit, "gitmine");
}

/// Copies the files of directory `from` into `to` (created).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the directory");
    for entry in std::fs::read_dir(from).expect("list the directory") {
        let entry = entry.expect("an entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy a file");
    }
}

// Without --kind, or with a name that would not make a crate, nothing is
// written; a directory that is not empty is left alone.
#[test]
fn new_plugin_refuses_what_it_cannot_write() {
    let dir = outside();
    for (args, says) in [
        (&["mine"][..], "--kind"),
        (&["My Plugin", "--kind", "model"][..], "lower-case"),
        (&["mine", "--kind", "both"][..], "`both`"),
    ] {
        let mut all = vec!["new-plugin"];
        all.extend_from_slice(args);
        let exit = llm_host(dir.path(), &all);
        assert_eq!(exit.status.code(), Some(2), "{args:?}: {exit}");
        assert!(exit.stderr.contains(says), "{args:?}: {exit}");
        assert!(exit.stderr.contains("usage: llm-host new-plugin"), "{exit}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);

    std::fs::create_dir(dir.path().join("taken")).expect("mkdir");
    std::fs::write(dir.path().join("taken/notes.txt"), "mine").expect("write");
    let exit = llm_host(
        dir.path(),
        &["new-plugin", "mine", "--kind", "store", "--dir", "taken"],
    );
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert!(exit.stderr.contains("not empty"), "{exit}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("taken"))
            .expect("list")
            .count(),
        1
    );

    let exit = llm_host(
        dir.path(),
        &[
            "new-plugin",
            "mine",
            "--kind",
            "model",
            "--api",
            "/surely/not/here",
        ],
    );
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert!(exit.stderr.contains("--api /surely/not/here"), "{exit}");
}
