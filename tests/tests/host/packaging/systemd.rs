//! packaging/llm-host.service: verified by systemd-analyze, and the host run
//! the way the unit runs it.

use super::*;

fn systemd_analyze() -> Option<PathBuf> {
    let found = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file());
    if found.is_none() {
        skip_or_fail("systemd-analyze is not installed");
    }
    found
}

// `systemd-analyze verify` finds nothing to say about the unit (with ExecStart pointing
// at the test-built binary, since /opt/llm-host is not installed here), its hardening
// scores as such (`security --offline`), and it waits longer than the config's drain and
// grace before SIGKILL.
#[test]
fn the_systemd_unit_verifies() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let unit = packaging_file("llm-host.service");
    assert_eq!(
        unit_setting(&unit, "ExecStart"),
        "/opt/llm-host/bin/llm-host --config /etc/llm-host/config.toml"
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let copy = dir.path().join("llm-host.service");
    let host = artifacts().host.to_str().expect("UTF-8 paths").to_owned();
    fs::write(
        &copy,
        replace_once(
            &unit,
            "ExecStart=/opt/llm-host/bin/llm-host ",
            &format!("ExecStart={host} "),
        ),
    )
    .expect("write the unit");

    let (status, output) = run(Command::new(&analyze).arg("verify").arg(&copy));
    assert!(
        status.success() && output.trim().is_empty(),
        "systemd-analyze verify ({status}):\n{output}"
    );

    let (status, output) = run(Command::new(&analyze)
        .arg("security")
        .arg("--offline=true")
        .arg(&copy));
    assert!(status.success(), "systemd-analyze security: {output}");
    let exposure: f64 = output
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for llm-host.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{output}"));
    assert!(
        exposure <= 2.0,
        "the unit's exposure is {exposure}:\n{output}"
    );
    for line in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit has no `{line}`");
    }
    assert!(
        !unit.lines().any(|line| {
            line.starts_with("MemoryDenyWriteExecute=") || line.starts_with("NoExecPaths=")
        }),
        "the host maps its staged plugin copies executable"
    );

    let config = packaging_file("config.toml");
    let stop_within =
        number_setting(&config, "drain_secs") + number_setting(&config, "shutdown_grace_secs");
    let timeout: u64 = unit_setting(&unit, "TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        timeout > stop_within,
        "TimeoutStopSec={timeout} does not outlast drain + grace ({stop_within} s)"
    );
}

// The host as the unit runs it: XDG_RUNTIME_DIR is the unit's RuntimeDirectory, made with
// its RuntimeDirectoryMode, and the plugin copies are staged there; ExecReload's SIGHUP
// reloads; KillSignal's SIGTERM drains (/readyz 503 while the healthcheck still passes)
// and the host exits 0 within TimeoutStopSec.
#[tokio::test]
async fn the_host_runs_as_the_unit_runs_it() {
    let unit = packaging_file("llm-host.service");
    let installation = Installation::new();
    let runtime_root = installation.path("run");
    let environment = unit_setting(&unit, "Environment");
    let runtime_dir = environment
        .strip_prefix("XDG_RUNTIME_DIR=%t/")
        .unwrap_or_else(|| panic!("Environment={environment}: not XDG_RUNTIME_DIR=%t/..."));
    assert_eq!(runtime_dir, unit_setting(&unit, "RuntimeDirectory"));
    let runtime = runtime_root.join(runtime_dir);
    fs::create_dir_all(&runtime).expect("create the runtime directory");
    let mode = u32::from_str_radix(unit_setting(&unit, "RuntimeDirectoryMode"), 8)
        .expect("an octal RuntimeDirectoryMode");
    fs::set_permissions(&runtime, fs::Permissions::from_mode(mode)).expect("chmod");
    let runtime_text = runtime.to_str().expect("UTF-8 paths").to_owned();

    let mut host = installation.serve(&[
        ("LLM_HOST_API_KEY", CLIENT_KEY),
        ("LLM_HOST_ADMIN_KEY", ADMIN_KEY),
        ("XDG_RUNTIME_DIR", &runtime_text),
    ]);
    let staged = runtime.join("llm-host-staging");
    let copies = fs::read_dir(&staged)
        .unwrap_or_else(|err| {
            panic!(
                "no staging directory in the runtime directory ({err}); log:\n{}",
                host.log()
            )
        })
        .count();
    assert!(copies >= 2, "{copies} files in {}", staged.display());

    host.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host.log().contains("SIGHUP") {
        assert!(
            Instant::now() < deadline,
            "no reload after SIGHUP; log:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let addr = host.addr();
    let asked = Instant::now();
    host.signal(unit_setting(&unit, "KillSignal").trim_start_matches("SIG"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = http(addr, "GET", "/readyz").await;
        if ready.status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {} after SIGTERM",
            ready.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, output) = healthcheck(addr);
    assert!(
        status.success(),
        "the healthcheck failed while draining: {output}"
    );
    let timeout = Duration::from_secs(
        unit_setting(&unit, "TimeoutStopSec")
            .parse()
            .expect("TimeoutStopSec in seconds"),
    );
    let status = host
        .wait_exit(timeout.saturating_sub(asked.elapsed()))
        .unwrap_or_else(|| panic!("still running after TimeoutStopSec; log:\n{}", host.log()));
    assert!(status.success(), "{status}; log:\n{}", host.log());
}

// ---------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------
