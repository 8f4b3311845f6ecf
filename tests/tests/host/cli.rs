//! The command line and the config file: listing plugins, starting, refusing bad configs.

use llm_host_tests::{Config, Host, Workdir, STANDARD_PLUGINS};

/// A default config with `edit` applied to its text.
fn workdir_with_config(edit: impl FnOnce(String) -> String) -> Workdir {
    let workdir = Workdir::new(STANDARD_PLUGINS);
    workdir.write_config(&edit(Config::default().to_toml()));
    workdir
}

// `llm-host plugins` lists each library of the plugin directory (name, version, kinds, file) and exits 0.
#[test]
fn the_plugins_command_lists_the_plugin_directory() {
    let workdir = workdir_with_config(|text| text);
    let listing = workdir.list_plugins();
    assert!(listing.status.success(), "{listing}");
    let output = listing.all_output();
    // One line per plugin, with its name, version and kinds as words, and its file.
    for (file, name, kind) in [
        ("libllm_plugin_echo.so", "echo", "model"),
        ("libllm_plugin_memory.so", "memory", "store"),
    ] {
        let line = output
            .lines()
            .find(|line| line.contains(file))
            .unwrap_or_else(|| panic!("no line names {file}:\n{listing}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        for word in [name, "0.1.0", kind] {
            assert!(
                words.contains(&word),
                "the line of {file} lacks {word:?}: {line}\n{listing}"
            );
        }
    }
}

// The host announces its real address (config port 0), without ANSI colours when not on a tty.
#[test]
fn the_host_logs_its_bound_address_without_colours() {
    let host = Host::start_default();
    assert_ne!(
        host.addr().port(),
        0,
        "the bound port, not the configured 0"
    );
    assert!(host.addr().ip().is_loopback(), "{}", host.addr());
    let log = host.log();
    assert!(
        log.contains(&format!("listening on {}", host.addr())),
        "{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI escapes in a piped log:\n{log:?}"
    );
}

// --listen overrides server.listen (the config's address could not be bound here).
#[test]
fn the_listen_flag_overrides_the_config() {
    let workdir = Workdir::with_config(&Config {
        listen: "203.0.113.1:9".to_owned(), // TEST-NET-3: not an address of this machine
        ..Config::default()
    });
    let host = Host::start_in(workdir, &["--listen", "127.0.0.1:0"]);
    assert!(host.addr().ip().is_loopback(), "{}", host.addr());
}

// A backend naming a plugin no library provides stops the start, naming the plugin.
#[test]
fn a_missing_plugin_fails_the_start() {
    let workdir =
        workdir_with_config(|text| text + "\n[models.ghost]\nplugin = \"nope\"\nsettings = {}\n");
    let exit = workdir.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    assert!(exit.stderr.contains("nope"), "names the plugin:\n{exit}");
    assert!(!exit.stderr.contains("listening on"), "{exit}");
}

// An unknown key stops the start, naming the key.
#[test]
fn an_unknown_config_key_fails_the_start() {
    let workdir =
        workdir_with_config(|text| text.replace("max_frame_bytes = ", "max_frame_byte = "));
    let exit = workdir.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    assert!(
        exit.stderr.contains("max_frame_byte"),
        "names the key:\n{exit}"
    );
    assert!(!exit.stderr.contains("listening on"), "{exit}");
}

// Every error of the config file is reported at once: two undefined defaults.
#[test]
fn every_config_error_is_reported_at_once() {
    let workdir = workdir_with_config(|text| {
        text.replace("model = \"echo\"", "model = \"undefined_backend\"")
            .replace("store = \"memory\"", "store = \"undefined_store\"")
    });
    let exit = workdir.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    assert!(
        exit.stderr.contains("undefined_backend"),
        "names the undefined default backend:\n{exit}"
    );
    assert!(
        exit.stderr.contains("undefined_store"),
        "names the undefined default store:\n{exit}"
    );
}

// Config errors and plugin errors are reported together: an undefined default backend and a missing plugin.
#[test]
fn config_and_plugin_errors_are_reported_together() {
    let workdir = workdir_with_config(|text| {
        text.replace("model = \"echo\"", "model = \"undefined_backend\"")
            + "\n[models.ghost]\nplugin = \"nope\"\n"
    });
    let exit = workdir.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    assert!(
        exit.stderr.contains("undefined_backend"),
        "names the undefined default backend:\n{exit}"
    );
    assert!(
        exit.stderr.contains("nope"),
        "names the missing plugin:\n{exit}"
    );
}

// A broken plugin setting is reported naming the backend and the setting.
#[test]
fn a_bad_backend_setting_fails_the_start() {
    let workdir = workdir_with_config(|text| {
        text.replace("settings = { delay_ms = 0 }", "settings = { dela_ms = 0 }")
    });
    let exit = workdir.run_with_config(&[]);
    assert!(!exit.status.success(), "{exit}");
    assert!(
        exit.stderr.contains("dela_ms"),
        "names the setting:\n{exit}"
    );
}

// `scripts/install.sh` assembles bin/, plugins/ (the shipped plugins and
// nothing else, none writable by others) and config.toml reading plugins/;
// the installed host serves a turn from that layout.
#[tokio::test]
async fn the_install_script_assembles_a_layout_that_serves() {
    let built = llm_host_tests::build_packages(crate::common::SHIPPED);
    let dest = tempfile::tempdir().expect("a temporary directory");
    let output = std::process::Command::new("bash")
        .arg(llm_host_tests::workspace_root().join("scripts/install.sh"))
        .arg("--from")
        .arg(&built)
        .arg(dest.path())
        .output()
        .expect("run install.sh");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut plugins: Vec<String> = std::fs::read_dir(dest.path().join("plugins"))
        .expect("plugins/")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    plugins.sort();
    assert_eq!(plugins.len(), 8, "{plugins:?}");
    assert!(
        plugins
            .iter()
            .all(|name| name.starts_with("libllm_plugin_")),
        "{plugins:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    for name in &plugins {
        let mode = std::fs::metadata(dest.path().join("plugins").join(name))
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o022, 0, "{name} is writable by others: {mode:o}");
    }
    let config = std::fs::read_to_string(dest.path().join("config.toml")).expect("config.toml");
    assert!(config.contains("dir = \"plugins\""), "{config}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let mut host = std::process::Command::new(dest.path().join("bin/llm-host"))
        .arg("--config")
        .arg(dest.path().join("config.toml"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the installed host");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let mut ready = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "the installed host did not start listening");
    let mut client =
        llm_host_tests::Client::connect(&format!("ws://{addr}/v1/ws?model=fast"), None).await;
    client.next_json().await;
    client.send_text("installed").await;
    assert_eq!(client.read_turn().await.text(), "echo: installed");
    let _ = host.kill();
    let _ = host.wait();
}
