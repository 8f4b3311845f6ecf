//! Shared pieces of the benchmarks: finding the release build, running a
//! host on a temporary config, raw HTTP to its admin API, and RSS readings.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// `target/release` of this workspace (or `$CARGO_TARGET_DIR/release`).
pub fn release_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release")
}

/// A running `llm-host` on a temporary directory; killed on drop.
pub struct Host {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its working directory (config.toml, plugins/).
    pub dir: PathBuf,
}

impl Host {
    /// Writes `config` into a fresh directory holding copies of `plugins`
    /// (file names from the release directory), starts the release host on
    /// it and waits for its `listening on` line.
    pub fn start(config: &str, plugins: &[&str]) -> Result<Host, String> {
        let release = release_dir();
        let dir = std::env::temp_dir().join(format!("llm-host-bench-{}", std::process::id()));
        let plugin_dir = dir.join("plugins");
        std::fs::create_dir_all(&plugin_dir)
            .map_err(|e| format!("{}: {e}", plugin_dir.display()))?;
        for name in plugins {
            let from = release.join(name);
            std::fs::copy(&from, plugin_dir.join(name)).map_err(|e| {
                format!(
                    "{}: {e} (run `cargo build --release` first)",
                    from.display()
                )
            })?;
        }
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let host = release.join("llm-host");
        // A profiler to run the host under: `LLM_HOST_BENCH_WRAPPER="valgrind
        // --tool=callgrind --callgrind-out-file=/tmp/host.cg"`.
        let wrapper = std::env::var("LLM_HOST_BENCH_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(words).arg(&host);
                command
            }
            None => Command::new(&host),
        };
        let mut child = command
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn,llm_host=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "{}: {e} (run `cargo build --release` first)",
                    host.display()
                )
            })?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(addr) = line
                        .split("listening on ")
                        .nth(1)
                        .and_then(|rest| rest.trim().parse::<SocketAddr>().ok())
                    {
                        sent = tx.send(addr).is_ok();
                    }
                }
            }
        });
        // Under a profiler the start takes many times longer.
        let limit = if wrapper.trim().is_empty() { 30 } else { 600 };
        match rx.recv_timeout(Duration::from_secs(limit)) {
            Ok(addr) => {
                on_start(child.id());
                Ok(Host { child, addr, dir })
            }
            Err(_) => {
                let _ = child.kill();
                Err(format!("the host did not start listening within {limit} s"))
            }
        }
    }

    /// The host's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the host, in KiB.
    pub fn rss_kib(&self) -> Result<u64, String> {
        rss_kib(self.pid())
    }

    /// Peak resident memory of the host, in KiB.
    pub fn peak_rss_kib(&self) -> Result<u64, String> {
        peak_rss_kib(self.pid())
    }

    /// Stops the host as an operator does (SIGTERM), so that a profiler
    /// wrapped around it writes its output; kills it if it has not exited
    /// within a minute.
    pub fn stop(mut self) {
        let terminated = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .is_ok_and(|status| status.success());
        if terminated {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `LLM_HOST_BENCH_ON_START`, if set, with the host's pid appended,
/// once the host listens: with the host under `valgrind --tool=callgrind
/// --instr-atstart=no`, `"callgrind_control -i on"` starts the profile
/// there, leaving out the start (hashing and loading the plugins).
fn on_start(pid: u32) {
    let hook = std::env::var("LLM_HOST_BENCH_ON_START").unwrap_or_default();
    let mut words = hook.split_whitespace();
    if let Some(program) = words.next() {
        let status = Command::new(program)
            .args(words)
            .arg(pid.to_string())
            .stdout(std::io::stderr())
            .status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("LLM_HOST_BENCH_ON_START `{hook}` failed: {status:?}");
        }
    }
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    status_field(pid, "VmRSS:")
}

/// Peak resident memory of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64, String> {
    status_field(pid, "VmHWM:")
}

fn status_field(pid: u32, field: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))
}

/// One HTTP request with no body; answers the status and the body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {answer:?}"))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// GET `path` and parse the JSON body.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let (status, body) = http(addr, "GET", path)?;
    if status != 200 {
        return Err(format!("GET {path}: {status} {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}: {body}"))
}

/// The p-th percentile (0..=100) of sorted `values`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
