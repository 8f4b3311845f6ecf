//! Operating the host: draining behind a load balancer on SIGTERM.

use std::time::Duration;

use llm_host_tests::{http, Config, Host};

// With server.drain_secs, SIGTERM turns /readyz to 503 at once while the
// host goes on serving, new connections included; then it stops.
#[tokio::test]
async fn sigterm_drains_before_it_stops() {
    let mut host = Host::start(&Config {
        server_extra: "drain_secs = 3\nshutdown_grace_secs = 1\n".to_owned(),
        ..Config::default()
    });
    assert_eq!(http(host.addr(), "GET", "/readyz").await.status, 200);
    host.signal("TERM");
    let mut draining = false;
    for _ in 0..20 {
        if http(host.addr(), "GET", "/readyz").await.status == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(draining, "/readyz did not turn 503 on SIGTERM");
    // Still serving: a new client connects and runs a turn.
    let mut client = host.connect("/v1/ws").await;
    client.next_json().await;
    client.send_text("during the drain").await;
    assert_eq!(client.read_turn().await.text(), "echo: during the drain");
    let exit = host.wait_exit(Duration::from_secs(30));
    assert!(
        exit.is_some_and(|status| status.success()),
        "the host did not stop after draining:\n{}",
        host.log()
    );
    assert!(host.log().contains("draining"), "{}", host.log());
}
