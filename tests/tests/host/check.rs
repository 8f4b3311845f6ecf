//! `llm-host check PATH.so`: the shipped plugins and the templates conform; a
//! plugin that breaks the contract (a stepped one that blocks in its steps
//! included), a foreign or truncated library, and bad arguments are each
//! reported for what they are.

use std::time::{Duration, Instant};

use llm_host_tests::{Exit, Plugin, Workdir};

/// `llm-host check ARGS` (run from a temporary directory).
fn check(args: &[&str]) -> Exit {
    let workdir = Workdir::new(&[]);
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    workdir.run(&all)
}

fn path(plugin: Plugin) -> &'static str {
    plugin.path().to_str().expect("build paths are UTF-8")
}

/// The verdict line of check `name` (`PASS name: ...`, `FAIL name: ...`).
fn line<'a>(exit: &'a Exit, name: &str) -> &'a str {
    exit.stdout
        .lines()
        .find(|line| {
            line.split_whitespace().nth(1) == Some(&format!("{name}:"))
                && ["PASS ", "WARN ", "FAIL ", "SKIP "]
                    .iter()
                    .any(|verdict| line.starts_with(verdict))
        })
        .unwrap_or_else(|| panic!("no verdict line for {name}:\n{exit}"))
}

fn assert_verdict(exit: &Exit, verdict: &str, name: &str, detail: &str) {
    let line = line(exit, name);
    assert!(
        line.starts_with(&format!("{verdict} {name}:")),
        "{name} should be {verdict}: {line}\n{exit}"
    );
    assert!(
        line.contains(detail),
        "{name} should say {detail:?}: {line}\n{exit}"
    );
}

const MODEL_CHECKS: &[&str] = &[
    "model.construct",
    "model.event_order",
    "model.cancel",
    "model.errors",
    "model.no_panic",
    "model.unknown_settings",
];

/// The checks of a stepped adapter's turns run in steps.
const STEP_CHECKS: &[&str] = &[
    "model.steps.event_order",
    "model.steps.cancel",
    "model.steps.errors",
    "model.steps.no_panic",
    "model.steps.no_blocking",
    "model.steps.wake",
];

/// The step checks but the wake check, which an adapter that never answers
/// PENDING skips.
fn step_checks_but_wake() -> Vec<&'static str> {
    STEP_CHECKS
        .iter()
        .copied()
        .filter(|name| *name != "model.steps.wake")
        .collect()
}

const STORE_CHECKS: &[&str] = &[
    "store.construct",
    "store.load_absent",
    "store.create",
    "store.create_conflict",
    "store.update_round_trip",
    "store.large_document",
    "store.stale_save",
    "store.absent_save",
    "store.delete",
    "store.recreate_after_delete",
    "store.list_by_owner",
    "store.list_after",
    "store.list_all_owners",
    "store.concurrent_create",
    "store.concurrent_cas",
    "store.concurrent_increments",
    "store.updated_at",
    "store.ping",
    "store.unknown_settings",
];

/// The store checks of two adapters built from the same settings racing on
/// one session, and of two processes doing the same (check_processes.rs has
/// more), which a store in process skips.
const SHARED_CHECKS: &[&str] = &[
    "store.shared_cas",
    "store.shared_increments",
    "store.process_cas",
    "store.process_increments",
];

/// The expiry check, which runs only with `ttl_secs` in the settings.
const EXPIRY: &str = "store.expiry";

/// `checks` pass and `skipped` are skipped (which does not fail the run),
/// with nothing else in the report.
fn assert_conforms(exit: &Exit, checks: &[&str], skipped: &[&str]) {
    assert_eq!(exit.status.code(), Some(0), "{exit}");
    assert_verdict(exit, "PASS", "load", "built against plugin-api");
    for name in checks {
        assert_verdict(exit, "PASS", name, "");
    }
    for name in skipped {
        assert_verdict(exit, "SKIP", name, "");
    }
    assert!(
        !exit
            .stdout
            .lines()
            .any(|l| l.starts_with("FAIL") || l.starts_with("WARN")),
        "{exit}"
    );
    let summary = exit
        .stdout
        .lines()
        .last()
        .expect("a summary line comes last");
    assert!(
        summary.starts_with(&format!(
            "summary: {} passed, 0 failed, 0 warnings, {} skipped",
            checks.len() + 1,
            skipped.len()
        )),
        "{summary}"
    );
    assert!(summary.ends_with(" conforms"), "{summary}");
}

// The echo plugin passes every model check, through generate and in steps;
// it never answers PENDING, so the wake check is skipped.
#[test]
fn echo_conforms() {
    let exit = check(&[path(Plugin::Echo)]);
    let passed = [MODEL_CHECKS, &step_checks_but_wake()].concat();
    assert_conforms(&exit, &passed, &["model.steps.wake"]);
    assert_verdict(&exit, "PASS", "load", "plugin `echo`");
    assert_verdict(&exit, "PASS", "model.cancel", "sending nothing more");
    assert_verdict(
        &exit,
        "PASS",
        "model.steps.cancel",
        "the step returned and the stepper was dropped",
    );
    assert_verdict(&exit, "PASS", "model.steps.event_order", "1 step: 1 done");
    assert_verdict(&exit, "PASS", "model.steps.no_blocking", "none over 20ms");
    assert_verdict(
        &exit,
        "SKIP",
        "model.steps.wake",
        "no step of the simple request answered PENDING",
    );
    assert_verdict(
        &exit,
        "PASS",
        "model.unknown_settings",
        "surely_not_a_setting",
    );
    assert!(!exit.stdout.contains("store."), "{exit}");

    // Paced, echo answers Step::sleep between tokens rather than sleeping
    // in its steps.
    let exit = check(&[path(Plugin::Echo), "--settings", r#"{"delay_ms": 5}"#]);
    assert_conforms(&exit, &passed, &["model.steps.wake"]);
    assert_verdict(
        &exit,
        "PASS",
        "model.steps.event_order",
        "start, 20 text, usage",
    );
    assert_verdict(&exit, "PASS", "model.steps.event_order", " sleep, 1 done");
    assert_verdict(&exit, "PASS", "model.steps.no_blocking", "none over 20ms");
}

// The memory plugin passes every store check. It is in process, so the
// checks of two adapters or two processes sharing one store are skipped;
// expiry is checked only with the ttl_secs given.
#[test]
fn memory_conforms() {
    let exit = check(&[path(Plugin::Memory)]);
    let skipped = [SHARED_CHECKS, &[EXPIRY]].concat();
    assert_conforms(&exit, STORE_CHECKS, &skipped);
    assert!(!exit.stdout.contains("model."), "{exit}");
    for name in SHARED_CHECKS {
        assert_verdict(
            &exit,
            "SKIP",
            name,
            "the store is in process (its in_process() answers true)",
        );
    }
    assert_verdict(
        &exit,
        "SKIP",
        EXPIRY,
        "give ttl_secs in --settings to check expiry",
    );

    let began = Instant::now();
    let exit = check(&[path(Plugin::Memory), "--settings", r#"{"ttl_secs": 1}"#]);
    let passed = [STORE_CHECKS, &[EXPIRY]].concat();
    assert_conforms(&exit, &passed, SHARED_CHECKS);
    assert_verdict(
        &exit,
        "PASS",
        EXPIRY,
        "sessions left alone for 2.0 s with ttl_secs 1 were absent",
    );
    assert!(began.elapsed() < Duration::from_secs(60), "{exit}");
}

// The template plugin passes every model check, with settings of its own
// too; it is not stepped, so the step checks are skipped.
#[test]
fn the_template_conforms() {
    let exit = check(&[path(Plugin::Template)]);
    assert_conforms(&exit, MODEL_CHECKS, STEP_CHECKS);
    for name in STEP_CHECKS {
        assert_verdict(&exit, "SKIP", name, "not stepped: the adapter's stepped()");
    }
    let exit = check(&[
        path(Plugin::Template),
        "--settings",
        r#"{"transform": "reverse", "delay_ms": 5}"#,
    ]);
    assert_conforms(&exit, MODEL_CHECKS, STEP_CHECKS);
    assert_verdict(&exit, "PASS", "model.construct", "reverse");
}

// The store template passes every store check, with sessions as files in
// the directory its settings name (a short TTL set, so loads touch the files
// and expiry is checked), the races between two adapters and between two
// processes on one directory included, and leaves none of them behind.
#[test]
fn the_store_template_conforms() {
    let workdir = Workdir::new(&[]);
    let dir = workdir.path().join("sessions");
    let settings = serde_json::json!({ "dir": dir, "ttl_secs": 2 }).to_string();
    let exit = workdir.run(&[
        "check",
        path(Plugin::TemplateStore),
        "--kind",
        "store",
        "--settings",
        &settings,
    ]);
    let passed = [STORE_CHECKS, SHARED_CHECKS, &[EXPIRY]].concat();
    assert_conforms(&exit, &passed, &[]);
    assert_verdict(&exit, "PASS", "load", "plugin `template-store`");
    assert_verdict(
        &exit,
        "PASS",
        "store.shared_cas",
        "exactly one won each round",
    );
    assert_verdict(
        &exit,
        "PASS",
        "store.process_cas",
        "two processes with adapters built from the same settings share one store",
    );
    assert_verdict(&exit, "PASS", EXPIRY, "with ttl_secs 2 were absent");
    assert!(!exit.stdout.contains("model."), "{exit}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("the store made its directory")
        .map(|entry| entry.expect("an entry").file_name())
        .collect();
    assert_eq!(left, [".lock"], "{exit}");
}

// The broken plugin fails: text after `end`, streaming on after a cancel,
// unconditional saves; accepting unknown settings is a warning only.
#[test]
fn a_plugin_that_breaks_the_contract_fails() {
    let exit = check(&[path(Plugin::Broken)]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert_verdict(&exit, "PASS", "load", "model+store");
    assert_verdict(&exit, "PASS", "model.construct", "");
    assert_verdict(&exit, "FAIL", "model.event_order", "`text` after `end`");
    assert_verdict(
        &exit,
        "FAIL",
        "model.cancel",
        "after the sink answered stop to the first text",
    );
    assert_verdict(&exit, "PASS", "model.errors", "invalid_input");
    assert_verdict(&exit, "PASS", "model.no_panic", "");
    assert_verdict(&exit, "WARN", "model.unknown_settings", "accepted");
    assert_verdict(&exit, "SKIP", "model.steps.event_order", "not stepped");
    for name in [
        "store.create_conflict",
        "store.stale_save",
        "store.absent_save",
        "store.concurrent_create",
        "store.concurrent_cas",
    ] {
        assert_verdict(&exit, "FAIL", name, "Saved");
    }
    for name in ["store.load_absent", "store.list_by_owner", "store.ping"] {
        assert_verdict(&exit, "PASS", name, "");
    }
    assert_verdict(&exit, "WARN", "store.unknown_settings", "accepted");
    let summary = exit.stdout.lines().last().unwrap_or_default();
    assert!(summary.contains("does NOT conform"), "{summary}");
    assert!(summary.contains(" 2 warnings"), "{summary}");
}

/// The milliseconds in `... a step took N ms; ...`.
fn step_millis(line: &str) -> u64 {
    line.split("a step took ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no step duration in {line}"))
}

// A stepped adapter that sleeps inside its steps fails no_blocking, and only
// that: the same steps are fine on generate's thread of their own, and they
// keep the order. The report names the path that failed.
#[test]
fn a_stepped_adapter_that_blocks_in_its_steps_fails() {
    let exit = check(&[
        path(Plugin::Broken),
        "--kind",
        "model",
        "--settings",
        r#"{"stepped": true, "block_ms": 100}"#,
    ]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert_verdict(
        &exit,
        "FAIL",
        "model.steps.no_blocking",
        "ms; steps run on the host's shared workers and must not block (answer Step::sleep \
         or PENDING instead)",
    );
    let took = step_millis(line(&exit, "model.steps.no_blocking"));
    assert!(took >= 100, "{took} ms\n{exit}");
    for name in MODEL_CHECKS[..5].iter().chain(STEP_CHECKS) {
        if *name != "model.steps.no_blocking" {
            assert_verdict(&exit, "PASS", name, "");
        }
    }
    let summary = exit.stdout.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("summary: 11 passed, 1 failed, 1 warning, 0 skipped"),
        "{summary}"
    );
    assert!(summary.contains("does NOT conform"), "{summary}");
}

// The same adapter without the sleep keeps the step contract, the wake from
// its own threads included (unknown settings are still only a warning).
#[test]
fn a_stepped_adapter_that_waits_for_wakes_conforms() {
    let exit = check(&[
        path(Plugin::Broken),
        "--kind",
        "model",
        "--settings",
        r#"{"stepped": true}"#,
    ]);
    assert_eq!(exit.status.code(), Some(0), "{exit}");
    for name in MODEL_CHECKS[..5].iter().chain(STEP_CHECKS) {
        assert_verdict(&exit, "PASS", name, "");
    }
    assert_verdict(
        &exit,
        "PASS",
        "model.steps.event_order",
        "start, 5 text, usage (1 in, 5 out, 6 total), end stop; 8 steps: 7 pending, 1 done",
    );
    assert_verdict(
        &exit,
        "PASS",
        "model.steps.wake",
        "7 steps answered PENDING, each was woken and stepped again (7 wakes, 7 from another \
         thread)",
    );
    assert_verdict(&exit, "WARN", "model.unknown_settings", "accepted");
}

// An adapter stuck after a cancel fails within the cancel bound, without the
// check waiting for it; --kind limits the run to the model.
#[test]
fn an_adapter_that_hangs_after_a_cancel_fails_in_bounded_time() {
    let began = Instant::now();
    let exit = check(&[
        path(Plugin::Broken),
        "--kind",
        "model",
        "--settings",
        r#"{"stall_ms": 60000}"#,
    ]);
    let took = began.elapsed();
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert_verdict(
        &exit,
        "FAIL",
        "model.cancel",
        "did not return within 5s after the sink answered stop",
    );
    assert!(took < Duration::from_secs(25), "took {took:?}\n{exit}");
    assert!(!exit.stdout.contains("store."), "--kind model:\n{exit}");
}

// An error event without a code fails the errors check.
#[test]
fn an_error_event_without_a_code_fails() {
    let exit = check(&[
        path(Plugin::Broken),
        "--kind",
        "model",
        "--settings",
        r#"{"empty_error": true}"#,
    ]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert_verdict(&exit, "FAIL", "model.errors", "an empty code");
    assert_verdict(&exit, "FAIL", "model.event_order", "`text` after `error`");
}

// A panic caught by the plugin-api's guard comes back as `plugin_panic`: the
// check (like the host) survives it and fails no_panic.
#[test]
fn a_caught_panic_fails_no_panic() {
    let exit = check(&[path(Plugin::Echo), "--settings", r#"{"panic_after": 0}"#]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert_verdict(&exit, "FAIL", "model.no_panic", "panic_after");
    assert_verdict(&exit, "FAIL", "model.steps.no_panic", "panic_after");
    assert!(exit
        .stdout
        .lines()
        .last()
        .unwrap_or_default()
        .starts_with("summary:"));
}

// Settings the plugin refuses fail construct with the plugin's own words;
// the checks that need an adapter are skipped.
#[test]
fn refused_settings_are_reported_verbatim() {
    let exit = check(&[path(Plugin::Echo), "--settings", r#"{"tokens": "many"}"#]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert_verdict(
        &exit,
        "FAIL",
        "model.construct",
        "invalid_settings: tokens: invalid type: string \"many\"",
    );
    assert_verdict(&exit, "SKIP", "model.cancel", "see construct");
    assert_verdict(&exit, "SKIP", "model.steps.cancel", "see construct");
    // The settings alone are refused: a typo added to them tells nothing.
    assert_verdict(
        &exit,
        "SKIP",
        "model.unknown_settings",
        "the settings alone were refused",
    );
    assert!(!exit.stdout.contains("WARN"), "{exit}");
}

// Libraries the host would refuse are refused the same way.
#[test]
fn libraries_the_host_refuses_fail_to_load() {
    let exit = check(&[path(Plugin::Foreign)]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert_verdict(&exit, "FAIL", "load", "plugin-api");

    let workdir = Workdir::new(&[]);
    let bytes = std::fs::read(Plugin::Echo.path()).expect("read echo");
    let truncated = workdir.path().join("libtruncated.so");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("write a truncated copy");
    let truncated = truncated.to_str().expect("temporary paths are UTF-8");
    let exit = workdir.run(&["check", truncated]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert_verdict(&exit, "FAIL", "load", "truncated");

    let exit = check(&[path(Plugin::Echo), "--kind", "store"]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert_verdict(&exit, "FAIL", "store", "provides model, not store");
}

// Usage errors exit with 2 and say what is wrong.
#[test]
fn usage_errors_exit_2() {
    let echo = path(Plugin::Echo);
    for (args, says) in [
        (vec![], "needs the path"),
        (vec!["/surely/not/here.so"], "no such file"),
        (vec![echo, "--kind", "both"], "--kind"),
        (vec![echo, "--settings", "[1]"], "not a JSON object"),
        (vec![echo, "--settings", "{oops"], "not JSON"),
        (vec![echo, "--frobnicate"], "--frobnicate"),
    ] {
        let exit = check(&args);
        assert_eq!(exit.status.code(), Some(2), "{args:?}\n{exit}");
        assert!(exit.stderr.contains(says), "{args:?}\n{exit}");
        assert!(exit.stderr.contains("usage: llm-host check"), "{exit}");
    }
    let exit = check(&["--help"]);
    assert_eq!(exit.status.code(), Some(0), "{exit}");
    assert!(exit.stdout.contains("--settings JSON"), "{exit}");
}

// `--json` prints one report a CI job can gate on: the verdicts and the
// summary, with the exit code; the plugin's log stays on stderr.
#[test]
fn a_json_report_for_ci() {
    let exit = check(&[path(Plugin::Broken), "--json"]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    let report: serde_json::Value =
        serde_json::from_str(exit.stdout.trim()).unwrap_or_else(|err| panic!("{err}: {exit}"));
    assert_eq!(report["conforms"], false);
    let checks = report["checks"].as_array().expect("checks");
    let verdict = |name: &str| {
        checks
            .iter()
            .find(|check| check["name"] == name)
            .map(|check| check["verdict"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(verdict("load").as_deref(), Some("PASS"));
    assert_eq!(verdict("store.stale_save").as_deref(), Some("FAIL"));
    assert_eq!(verdict("model.unknown_settings").as_deref(), Some("WARN"));
    let failed = checks.iter().filter(|c| c["verdict"] == "FAIL").count();
    assert_eq!(report["summary"]["failed"], failed as u64);

    let exit = check(&[path(Plugin::Memory), "--json"]);
    assert_eq!(exit.status.code(), Some(0), "{exit}");
    let report: serde_json::Value = serde_json::from_str(exit.stdout.trim()).expect("JSON");
    assert_eq!(report["conforms"], true);
    assert_eq!(report["summary"]["failed"], 0);
    assert!(!exit.stdout.contains(" INFO "), "{exit}");
}

// A store that refuses its settings fails construct; the suite and the
// unknown-settings check, which need settings it takes, are skipped.
#[test]
fn a_store_that_refuses_its_settings_skips_the_rest() {
    let exit = check(&[
        path(Plugin::TemplateStore),
        "--settings",
        r#"{"ttl_secs": 0}"#,
    ]);
    assert_eq!(exit.status.code(), Some(1), "{exit}");
    assert_verdict(
        &exit,
        "FAIL",
        "store.construct",
        "ttl_secs: must be at least 1",
    );
    assert_verdict(&exit, "SKIP", "store.suite", "see store.construct");
    assert_verdict(
        &exit,
        "SKIP",
        "store.unknown_settings",
        "the settings alone were refused",
    );
}
