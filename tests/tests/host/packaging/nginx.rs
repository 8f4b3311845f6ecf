//! packaging/nginx.conf in front of two hosts on one Redis: balancing,
//! resuming through either host, and failover when one stops.

use super::*;

/// nginx run from a directory of its own (config, pid file, logs, temporary
/// files), in the foreground as this test's child; stopped on drop.
struct Nginx {
    child: Child,
    dir: TempDir,
    addr: SocketAddr,
}

impl Nginx {
    fn binary() -> Option<PathBuf> {
        let found = [
            "/usr/sbin/nginx",
            "/usr/local/sbin/nginx",
            "/usr/local/nginx/sbin/nginx",
            "/usr/bin/nginx",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file());
        if found.is_none() {
            skip_or_fail("nginx is not installed (apt-get install nginx)");
        }
        found
    }

    /// `packaging/nginx.conf` with the upstream servers replaced by `upstreams`,
    /// listening on a free loopback port.
    fn start(binary: &Path, upstreams: [SocketAddr; 2]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("llm-host-nginx-")
            .tempdir()
            .expect("a temporary directory");
        for sub in ["logs", "tmp"] {
            fs::create_dir(dir.path().join(sub)).expect("create a directory for nginx");
        }
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let text = packaging_file("nginx.conf");
        let text = replace_once(
            &text,
            "server 127.0.0.1:3001 ",
            &format!("server {} ", upstreams[0]),
        );
        let text = replace_once(
            &text,
            "server 127.0.0.1:3002 ",
            &format!("server {} ", upstreams[1]),
        );
        let text = replace_once(&text, "listen 80;", &format!("listen {addr};"));
        // Nothing outside the directory: the access log and the temporary files of
        // the distribution's build (/var/log/nginx, /var/lib/nginx) are moved in.
        let text = replace_once(
            &text,
            "\nhttp {\n",
            "\nhttp {\n    access_log logs/access.log;\n    client_body_temp_path tmp/body;\n    \
             proxy_temp_path tmp/proxy;\n    fastcgi_temp_path tmp/fastcgi;\n    \
             uwsgi_temp_path tmp/uwsgi;\n    scgi_temp_path tmp/scgi;\n",
        );
        fs::write(dir.path().join("nginx.conf"), text).expect("write nginx.conf");
        let stderr = fs::File::create(dir.path().join("logs/stderr.log")).expect("stderr.log");
        let mut child = Command::new(binary)
            .arg("-p")
            .arg(format!("{}/", dir.path().display()))
            .arg("-c")
            .arg("nginx.conf")
            .arg("-e")
            .arg("logs/error.log")
            .arg("-g")
            .arg("daemon off; pid nginx.pid; error_log logs/error.log info;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nginx exited ({status}):\n{}",
                    fs::read_to_string(dir.path().join("logs/error.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nginx did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, dir, addr }
    }

    fn error_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("logs/error.log")).unwrap_or_default()
    }

    fn ws(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too (SIGKILL would leave them serving).
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A host whose sessions live in Redis under `prefix`, with the packaged
/// config's two keys.
fn host_on_redis(url: &str, prefix: &str) -> Host {
    let config = Config {
        store: "shared".to_owned(),
        extra: format!(
            "\n[stores.shared]\nplugin = \"redis\"\nsettings = {{ url = \"{url}\", prefix = \"{prefix}\" }}\n\
             \n[[auth.keys]]\nid = \"clients\"\nkey = \"{CLIENT_KEY}\"\n\
             \n[[auth.keys]]\nid = \"ops\"\nadmin = true\nkey = \"{ADMIN_KEY}\"\n"
        ),
        ..Config::default()
    };
    let workdir = Workdir::with_config(&config);
    let library = artifacts()
        .host
        .parent()
        .expect("the profile directory")
        .join("libllm_plugin_redis.so");
    fs::copy(
        &library,
        workdir.path().join("plugins/libllm_plugin_redis.so"),
    )
    .unwrap_or_else(|err| panic!("copy {}: {err}", library.display()));
    Host::start_in(workdir, &[])
}

/// `llm_host_connections` of `host` (its open sockets), asked directly.
async fn open_sockets(host: &Host) -> f64 {
    let reply = http_with(
        host.addr(),
        "GET",
        "/metrics",
        &[("Authorization", &format!("Bearer {ADMIN_KEY}"))],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply
        .body
        .lines()
        .find_map(|line| line.strip_prefix("llm_host_connections "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no llm_host_connections in:\n{}", reply.body))
}

// packaging/nginx.conf in front of two hosts on one Redis: /readyz, a turn, the same
// session resumed on the other host (least_conn sends a second socket there) with its
// history, the HTTP API with the key passed through; then one host stops and new
// connections through nginx still resume the session, on the other.
#[tokio::test]
async fn nginx_balances_two_hosts_and_fails_over() {
    let Some(binary) = Nginx::binary() else {
        return;
    };
    let url = env_or("LLM_HOST_TEST_REDIS_URL", "redis://127.0.0.1:6379");
    let redis: Option<SocketAddr> = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .ok();
    let reachable =
        redis.is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if !reachable {
        skip_or_fail(&format!("no Redis server at {url}"));
        return;
    }
    let prefix = format!("llm-host-nginx-{}:", unique_token());
    let mut first = host_on_redis(&url, &prefix);
    let second = host_on_redis(&url, &prefix);
    let nginx = Nginx::start(&binary, [first.addr(), second.addr()]);

    let ready = http(nginx.addr, "GET", "/readyz").await;
    assert_eq!(ready.status, 200, "/readyz through nginx: {}", ready.body);

    let token = format!("token={CLIENT_KEY}");
    let mut one = Client::connect(&nginx.ws(&format!("/v1/ws?{token}")), None).await;
    let open = one.next_json().await;
    assert_eq!(open.event()["resumed"], false, "{}", open.text);
    let session = open.event()["sessionId"]
        .as_str()
        .expect("a session id")
        .to_owned();
    let prompt = "first turn through nginx";
    one.send_text(prompt).await;
    let turn = one.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    assert_eq!(turn.text(), format!("echo: {prompt}"));
    let last = *turn.sequences().last().expect("sequences");

    // The first socket is still open: least_conn gives the second to the other host.
    let mut two = Client::connect(
        &nginx.ws(&format!("/v1/ws?session={session}&{token}")),
        None,
    )
    .await;
    let open = two.next_json().await;
    assert_eq!(open.event()["resumed"], true, "{}", open.text);
    assert_eq!(open.event()["lastSequence"], last, "{}", open.text);
    assert_eq!(
        (open_sockets(&first).await, open_sockets(&second).await),
        (1.0, 1.0),
        "one socket on each host"
    );
    let again = "second turn";
    two.send_text(again).await;
    let turn = two.read_turn().await;
    assert_eq!(turn.status(), "completed", "{}", turn.dump());
    let history = words(prompt) + words(&format!("echo: {prompt}")) + words(again);
    assert_eq!(
        turn.input_tokens(),
        Some(history),
        "the history reached the model: {}",
        turn.dump()
    );
    one.close().await;
    two.close().await;

    let path = format!("/v1/sessions/{session}");
    let stored = http_with(
        nginx.addr,
        "GET",
        &path,
        &[("Authorization", &format!("Bearer {CLIENT_KEY}"))],
    )
    .await;
    assert_eq!(
        stored.status, 200,
        "GET {path} through nginx: {}",
        stored.body
    );
    assert_eq!(
        stored.json()["messages"].as_array().map(Vec::len),
        Some(4),
        "{}",
        stored.body
    );
    let anonymous = http(nginx.addr, "GET", &path).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);

    // One host stops; new connections through nginx reach the other.
    let stopped = first.addr();
    first.signal("TERM");
    first
        .wait_exit(Duration::from_secs(30))
        .expect("the first host stopped");
    for round in 0..4 {
        let mut client = Client::connect(
            &nginx.ws(&format!("/v1/ws?session={session}&{token}")),
            None,
        )
        .await;
        let open = client.next_json().await;
        assert_eq!(open.event()["resumed"], true, "{}", open.text);
        let prompt = format!("after the stop {round}");
        client.send_text(prompt.as_str()).await;
        let turn = client.read_turn().await;
        assert_eq!(turn.status(), "completed", "{}", turn.dump());
        assert_eq!(turn.text(), format!("echo: {prompt}"));
        client.close().await;
    }
    let ready = http(nginx.addr, "GET", "/readyz").await;
    assert_eq!(ready.status, 200, "/readyz through nginx: {}", ready.body);
    let deleted = http_with(
        nginx.addr,
        "DELETE",
        &path,
        &[("Authorization", &format!("Bearer {CLIENT_KEY}"))],
    )
    .await;
    assert_eq!(
        deleted.status, 204,
        "DELETE {path} through nginx: {}",
        deleted.body
    );
    let log = nginx.error_log();
    assert!(
        log.contains("Connection refused") && log.contains(&stopped.to_string()),
        "nginx never tried the stopped host {stopped}, so failing over was not exercised:\n{log}"
    );
}
