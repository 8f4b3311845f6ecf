//! The official `openai` Python package as the client.

use super::*;

/// Whether `python3` can import `openai`; says it skipped (fails under CI)
/// when not.
fn python_openai() -> bool {
    let found = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        skip_or_fail("python3 with the `openai` package is not installed (pip install openai)");
    }
    found
}

const SCRIPT: &str = r#"
import json, sys
import openai

base, alice, wrong = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key=alice, max_retries=0, timeout=20)

def out(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)

def error_of(call):
    try:
        call()
    except openai.APIError as err:
        return {"class": type(err).__name__, "status": getattr(err, "status_code", None),
                "code": err.code}
    return None

out("models", ids=[m.id for m in client.models.list()])

r = client.chat.completions.create(
    model="echo",
    messages=[{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hello from python"}],
    max_tokens=50, temperature=0.2, top_p=0.9, stop=["\n\n"], seed=1,
    tools=[{"type": "function", "function": {"name": "lookup", "description": "Looks up.",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}])
out("completion", object=r.object, content=r.choices[0].message.content,
    role=r.choices[0].message.role, finish=r.choices[0].finish_reason,
    usage=[r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens])

text, finish, usage, first_role = "", None, None, None
stream = client.chat.completions.create(
    model="echo", messages=[{"role": "user", "content": "Stream this please"}],
    stream=True, stream_options={"include_usage": True})
for chunk in stream:
    if chunk.choices:
        delta = chunk.choices[0].delta
        if first_role is None:
            first_role = delta.role
        text += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage.total_tokens
out("stream", content=text, finish=finish, usage=usage, role=first_role)

out("unknown_model", error=error_of(lambda: client.chat.completions.create(
    model="nope", messages=[{"role": "user", "content": "hi"}])))

stranger = openai.OpenAI(base_url=base, api_key=wrong, max_retries=0, timeout=20)
out("wrong_key", error=error_of(lambda: stranger.chat.completions.create(
    model="echo", messages=[{"role": "user", "content": "hi"}])))

out("failing", error=error_of(lambda: client.chat.completions.create(
    model="failing", messages=[{"role": "user", "content": "one two three"}])))

def failing_stream():
    for _ in client.chat.completions.create(
            model="failing", messages=[{"role": "user", "content": "one two three"}],
            stream=True):
        pass
out("failing_stream", error=error_of(failing_stream))

session = {"X-Session-Id": "py-session-1"}
first = client.chat.completions.create(
    model="echo", messages=[{"role": "user", "content": "remember this"}],
    extra_headers=session)
second = client.chat.completions.create(
    model="echo", messages=[{"role": "user", "content": "and this"}], extra_headers=session)
out("session", first=first.choices[0].message.content,
    second=second.choices[0].message.content, prompt_tokens=second.usage.prompt_tokens)

stream = client.chat.completions.create(
    model="slow", messages=[{"role": "user", "content": "go"}], stream=True)
seen = 0
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        seen += 1
    if seen >= 2:
        break
stream.close()
out("closed", seen=seen)
"#;

// The official `openai` Python client against the host: models, a completion,
// a stream with usage, its error classes (404, 401, 500, an error mid-stream),
// a session that persists, and a stream closed early, which cancels its turn.
#[tokio::test]
async fn the_openai_python_client_works_against_the_host() {
    if !python_openai() {
        return;
    }
    let host = Host::start(&with_keys());
    let dir = tempfile::tempdir().expect("a scratch directory");
    let script = dir.path().join("client.py");
    std::fs::write(&script, SCRIPT).expect("write the script");
    let base = format!("http://{}/v1", host.addr());
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(&script)
            .args([base.as_str(), ALICE, "sk-wrong-0123456789abcdef"])
            .output()
            .expect("run python3")
    })
    .await
    .expect("the script ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the script failed ({}):\n{stdout}\n{stderr}\nhost log:\n{}",
        output.status,
        host.log()
    );
    let steps: std::collections::HashMap<String, Value> = stdout
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).expect("one JSON object a line");
            (value["step"].as_str().expect("step").to_owned(), value)
        })
        .collect();
    let step = |name: &str| {
        steps
            .get(name)
            .unwrap_or_else(|| panic!("no step {name} in:\n{stdout}"))
    };

    let ids = step("models")["ids"].as_array().expect("ids").clone();
    assert!(
        ids.contains(&json!("echo")) && ids.contains(&json!("slow")),
        "{ids:?}"
    );

    let completion = step("completion");
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["content"], "echo: Hello from python");
    assert_eq!(completion["role"], "assistant");
    assert_eq!(completion["finish"], "stop");
    assert_eq!(completion["usage"], json!([5, 4, 9]));

    let stream = step("stream");
    assert_eq!(stream["content"], "echo: Stream this please");
    assert_eq!(stream["finish"], "stop");
    assert_eq!(stream["role"], "assistant");
    assert_eq!(stream["usage"], 7);

    let error = |name: &str| step(name)["error"].clone();
    assert_eq!(
        error("unknown_model"),
        json!({"class": "NotFoundError", "status": 404, "code": "model_not_found"})
    );
    assert_eq!(error("wrong_key")["class"], "AuthenticationError");
    assert_eq!(error("wrong_key")["status"], 401);
    assert_eq!(
        error("failing"),
        json!({"class": "InternalServerError", "status": 500, "code": "injected_failure"})
    );
    assert_eq!(error("failing_stream")["class"], "APIError");
    assert_eq!(error("failing_stream")["code"], "injected_failure");

    let session = step("session");
    assert_eq!(session["first"], "echo: remember this");
    assert_eq!(session["second"], "echo: and this");
    // remember this + echo: remember this + and this
    assert_eq!(session["prompt_tokens"], 7);
    let alice = format!("Bearer {ALICE}");
    let stored = http_with(
        host.addr(),
        "GET",
        "/v1/sessions/py-session-1",
        &[("Authorization", &alice)],
    )
    .await;
    assert_eq!(stored.status, 200, "{}", stored.body);
    let messages = stored.json()["messages"].clone();
    assert_eq!(messages.as_array().map(Vec::len), Some(4), "{messages}");
    assert_eq!(messages[3]["content"], "echo: and this");

    assert_eq!(step("closed")["seen"], 2);
    let ops = format!("Bearer {OPS}");
    assert!(
        wait_for_turns(
            &host,
            &[("Authorization", &ops)],
            ("slow", "cancelled", 1),
            Duration::from_secs(3)
        )
        .await,
        "the stream closed early did not cancel its turn; log:\n{}",
        host.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the slow turn ran on"
    );
}
