//! Plugin files as a hostile local user would use them: a staging directory
//! created first, files planted in it under the names the host will load,
//! symlinks at the names it writes, libraries dropped into the plugin
//! directory or left writable by others, two libraries claiming one plugin.

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use llm_host_tests::{http, Config, Host, Plugin, Workdir, STANDARD_PLUGINS};

/// A workdir with `plugins` and the default config, staging into
/// `<workdir>/staging` (which the test may create first).
fn staged_workdir(plugins: &[Plugin]) -> Workdir {
    let workdir = Workdir::new(plugins);
    let staging = staging_dir(&workdir);
    let text = Config::default().to_toml().replace(
        "[plugins]\n",
        &format!("[plugins]\nstaging_dir = \"{}\"\n", staging.display()),
    );
    assert!(
        text.contains("staging_dir"),
        "the config names the staging directory"
    );
    workdir.write_config(&text);
    workdir
}

fn staging_dir(workdir: &Workdir) -> PathBuf {
    workdir.path().join("staging")
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The staged copy of `plugin` in `staging` (`<stem>-<hash>.so`).
fn staged_copy(staging: &Path, plugin: Plugin) -> PathBuf {
    let stem = plugin.file_name().trim_end_matches(".so");
    std::fs::read_dir(staging)
        .expect("list the staging directory")
        .map(|entry| entry.expect("an entry").path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{stem}-")) && n.ends_with(".so"))
        })
        .unwrap_or_else(|| panic!("no staged copy of {stem} in {}", staging.display()))
}

/// Stages every library of `workdir` (as `llm-host plugins` does) and
/// answers where echo's staged copy is.
fn stage_echo(workdir: &Workdir) -> PathBuf {
    let listing = workdir.list_plugins();
    assert!(listing.status.success(), "{listing}");
    staged_copy(&staging_dir(workdir), Plugin::Echo)
}

/// What the host's default backend answers to `text`.
async fn answer(host: &Host, text: &str) -> String {
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text(text).await;
    client.read_turn().await.text()
}

/// The host's memory map.
fn maps(host: &Host) -> String {
    std::fs::read_to_string(format!("/proc/{}/maps", host.pid())).expect("read the host's maps")
}

// A staging directory that group or others may enter (as one created by another user would be) stops the start, naming it.
#[test]
fn a_staging_directory_others_can_enter_is_refused_at_start() {
    for mode in [0o777, 0o755] {
        let workdir = staged_workdir(STANDARD_PLUGINS);
        let staging = staging_dir(&workdir);
        std::fs::create_dir(&staging).expect("create the staging directory first");
        chmod(&staging, mode);
        let exit = workdir.run_with_config(&[]);
        assert!(!exit.status.success(), "{exit}");
        assert!(!exit.stderr.contains("listening on"), "{exit}");
        for needed in [
            staging.display().to_string(),
            format!("{mode:04o}"),
            "chmod 700".to_owned(),
            "plugins.staging_dir".to_owned(),
        ] {
            assert!(exit.stderr.contains(&needed), "names {needed}:\n{exit}");
        }
        // Nothing was staged in it.
        let staged = std::fs::read_dir(&staging).expect("list").count();
        assert_eq!(staged, 0, "{exit}");
    }
}

// A staging directory owned by another user is refused even with mode 0700 (needs root to chown).
#[test]
fn a_staging_directory_of_another_user_is_refused_at_start() {
    let workdir = staged_workdir(STANDARD_PLUGINS);
    if std::fs::metadata(workdir.path()).expect("stat").uid() != 0 {
        eprintln!("skipped: only root can give a directory to another user");
        return;
    }
    let staging = staging_dir(&workdir);
    std::fs::create_dir(&staging).expect("create the staging directory first");
    chmod(&staging, 0o700);
    std::os::unix::fs::chown(&staging, Some(54321), Some(54321)).expect("chown");
    let exit = workdir.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    assert!(exit.stderr.contains("owned by uid 54321"), "{exit}");
    assert!(
        exit.stderr.contains(&staging.display().to_string()),
        "{exit}"
    );
}

// Another library planted under echo's staged name is not loaded: it is re-hashed, replaced, and real echo serves.
#[tokio::test]
async fn a_file_planted_under_a_staged_name_is_not_loaded() {
    let workdir = staged_workdir(STANDARD_PLUGINS);
    let staged = stage_echo(&workdir);
    std::fs::copy(Plugin::EchoV2.path(), &staged).expect("plant echo v2 under echo's name");
    chmod(&staged, 0o600);

    let host = Host::start_in(workdir, &[]);
    assert_eq!(
        answer(&host, "Hello").await,
        "echo: Hello",
        "the planted library serves:\n{}",
        host.log()
    );
    let bytes = std::fs::read(&staged).expect("read the staged copy");
    let real = std::fs::read(Plugin::Echo.path()).expect("read echo");
    assert!(bytes == real, "the staged copy is echo again");
    assert!(
        host.log().contains("replacing a staged file"),
        "{}",
        host.log()
    );
}

// A symlink planted under echo's staged name, to another library outside, is not followed: it is replaced by a real copy.
#[tokio::test]
async fn a_symlink_planted_under_a_staged_name_is_not_followed() {
    let workdir = staged_workdir(STANDARD_PLUGINS);
    let staged = stage_echo(&workdir);
    let outside = workdir.path().join("outside.so");
    std::fs::copy(Plugin::EchoV2.path(), &outside).expect("a library outside");
    std::fs::remove_file(&staged).expect("remove the staged copy");
    symlink(&outside, &staged).expect("plant a symlink");

    let host = Host::start_in(workdir, &[]);
    assert_eq!(
        answer(&host, "Hello").await,
        "echo: Hello",
        "{}",
        host.log()
    );
    let meta = std::fs::symlink_metadata(&staged).expect("stat the staged copy");
    assert!(
        meta.file_type().is_file(),
        "the staged copy is a regular file"
    );
    assert_eq!(meta.mode() & 0o777, 0o600);
    let outside_bytes = std::fs::read(&outside).expect("read");
    let echo_v2 = std::fs::read(Plugin::EchoV2.path()).expect("read");
    assert!(
        outside_bytes == echo_v2,
        "the symlink's target is untouched"
    );
}

// Symlinks at the temporary names an earlier host used (`<stem>-<hash>.<pid>.tmp`) are never written through.
#[tokio::test]
async fn symlinks_at_temporary_names_are_not_written_through() {
    let workdir = staged_workdir(STANDARD_PLUGINS);
    let staged = stage_echo(&workdir);
    std::fs::remove_file(&staged).expect("remove the staged copy, so it is written again");
    let name = staged
        .file_stem()
        .and_then(|n| n.to_str())
        .expect("a UTF-8 name")
        .to_owned();
    let outside = workdir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    // The host will get one of the next process ids.
    let last = std::process::Command::new("true")
        .spawn()
        .and_then(|mut child| {
            let pid = child.id();
            child.wait().map(|_| pid)
        })
        .expect("run true");
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(4_194_304);
    for step in 1..=4_000 {
        let mut pid = last + step;
        if pid > pid_max {
            pid = pid - pid_max + 300;
        }
        let planted = staged.with_file_name(format!("{name}.{pid}.tmp"));
        symlink(outside.join(format!("written-{pid}")), planted).expect("plant a symlink");
    }

    let host = Host::start_in(workdir, &[]);
    assert_eq!(
        answer(&host, "Hello").await,
        "echo: Hello",
        "{}",
        host.log()
    );
    let written: Vec<_> = std::fs::read_dir(&outside)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(
        written.is_empty(),
        "the host (pid {}) wrote through a planted symlink: {written:?}",
        host.pid()
    );
    let meta = std::fs::symlink_metadata(&staged).expect("the staged copy exists");
    assert!(
        meta.file_type().is_file(),
        "the staged copy is a regular file"
    );
}

// A library no config entry names is never mapped into the host (its name is learned in a probe process); `llm-host plugins` still lists it, as unused.
#[tokio::test]
async fn an_unconfigured_library_never_runs_in_the_host() {
    let mut plugins = STANDARD_PLUGINS.to_vec();
    plugins.push(Plugin::Broken);
    let workdir = staged_workdir(&plugins);
    let host = Host::start_in(workdir, &[]);
    assert_eq!(answer(&host, "Hello").await, "echo: Hello");
    let maps = maps(&host);
    let broken = Plugin::Broken.file_name().trim_end_matches(".so");
    assert!(
        maps.contains("libllm_plugin_echo-"),
        "echo's staged copy is mapped:\n{maps}"
    );
    assert!(
        !maps.contains(broken),
        "the unconfigured library is mapped into the host:\n{maps}"
    );
    let log = host.log();
    assert!(
        !log.lines()
            .any(|line| line.contains("plugin loaded") && line.contains("broken")),
        "{log}"
    );

    let listing = host.workdir().list_plugins();
    assert!(listing.status.success(), "{listing}");
    let line = |file: &str| {
        listing
            .stdout
            .lines()
            .find(|line| line.contains(file))
            .unwrap_or_else(|| panic!("no line names {file}:\n{listing}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let broken_line = line(Plugin::Broken.file_name());
    assert!(broken_line.contains(&"broken".to_owned()), "{listing}");
    assert!(broken_line.contains(&"unused".to_owned()), "{listing}");
    assert!(
        line(Plugin::Echo.file_name()).contains(&"used".to_owned()),
        "{listing}"
    );
}

// A library that group or others may write is refused, naming it; the start fails when the config needs it.
#[test]
fn a_library_others_can_write_is_refused() {
    let workdir = staged_workdir(STANDARD_PLUGINS);
    let echo = workdir
        .path()
        .join("plugins")
        .join(Plugin::Echo.file_name());
    chmod(&echo, 0o664);
    let listing = workdir.list_plugins();
    let output = listing.all_output();
    let refusal = output
        .lines()
        .find(|line| line.contains(Plugin::Echo.file_name()))
        .unwrap_or_else(|| panic!("echo is not named:\n{listing}"));
    assert!(
        refusal.contains("writable by group") && refusal.contains("chmod go-w"),
        "{listing}"
    );

    let exit = workdir.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    assert!(exit.stderr.contains(Plugin::Echo.file_name()), "{exit}");
    assert!(exit.stderr.contains("writable by group"), "{exit}");

    chmod(&echo, 0o646);
    let exit = workdir.run_with_config(&[]);
    assert!(exit.stderr.contains("writable by others"), "{exit}");
}

// A symlink in the plugin directory is judged by its target: refused (naming both paths) while the target is writable by others or another user's, loaded once it is not.
#[tokio::test]
async fn a_symlinked_library_is_judged_by_its_target() {
    let workdir = staged_workdir(&[Plugin::Memory]);
    let elsewhere = workdir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    let target = elsewhere.join("echo-build.so");
    std::fs::copy(Plugin::Echo.path(), &target).expect("copy echo");
    let link = workdir
        .path()
        .join("plugins")
        .join(Plugin::Echo.file_name());
    symlink(&target, &link).expect("symlink into the plugin directory");

    chmod(&target, 0o666);
    let exit = workdir.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    assert!(exit.stderr.contains(&link.display().to_string()), "{exit}");
    let target_name = std::fs::canonicalize(&target).expect("canonical");
    assert!(
        exit.stderr.contains(&target_name.display().to_string()),
        "names the target:\n{exit}"
    );
    assert!(
        exit.stderr.contains("writable by group and others"),
        "{exit}"
    );

    if std::fs::metadata(workdir.path()).expect("stat").uid() == 0 {
        chmod(&target, 0o644);
        std::os::unix::fs::chown(&target, Some(54321), None).expect("chown");
        let exit = workdir.run_with_config(&[]);
        assert!(!exit.status.success(), "{exit}");
        assert!(exit.stderr.contains("owned by uid 54321"), "{exit}");
        std::os::unix::fs::chown(&target, Some(0), None).expect("chown back");
    }

    chmod(&target, 0o644);
    let host = Host::start_in(workdir, &[]);
    assert_eq!(
        answer(&host, "Hello").await,
        "echo: Hello",
        "{}",
        host.log()
    );
}

// Two libraries providing plugin `echo` stop the start, naming both files; dropped in while serving, the reload is refused and echo keeps serving.
#[tokio::test]
async fn two_libraries_providing_one_plugin_are_an_error_naming_both() {
    let mut plugins = STANDARD_PLUGINS.to_vec();
    plugins.push(Plugin::EchoV2);
    let workdir = staged_workdir(&plugins);
    let exit = workdir.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    for file in [Plugin::Echo.file_name(), Plugin::EchoV2.file_name()] {
        assert!(exit.stderr.contains(file), "names {file}:\n{exit}");
    }
    assert!(exit.stderr.contains("remove all but one"), "{exit}");
    let listing = workdir.list_plugins();
    assert!(listing.status.success(), "{listing}");
    assert!(listing.stdout.contains("CONFLICT"), "{listing}");

    let workdir = staged_workdir(STANDARD_PLUGINS);
    let host = Host::start_in(workdir, &[]);
    let plugin_dir = host.workdir().path().join("plugins");
    let tmp = plugin_dir.join(".echo-v2.tmp");
    std::fs::copy(Plugin::EchoV2.path(), &tmp).expect("copy");
    std::fs::rename(&tmp, plugin_dir.join(Plugin::EchoV2.file_name())).expect("move in");
    let reply = http(host.addr(), "POST", "/v1/reload").await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    for file in [Plugin::Echo.file_name(), Plugin::EchoV2.file_name()] {
        assert!(reply.body.contains(file), "names {file}: {}", reply.body);
    }
    assert_eq!(answer(&host, "still").await, "echo: still");
}
