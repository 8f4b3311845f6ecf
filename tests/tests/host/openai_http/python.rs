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

/// The steps a script printed (one JSON object a line, named by `step`),
/// run with the API's base URL, alice's key and a wrong key as arguments;
/// fails the test when the script fails.
async fn run_script(host: &Host, script: &str) -> Steps {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let path = dir.path().join("client.py");
    std::fs::write(&path, script).expect("write the script");
    let base = format!("http://{}/v1", host.addr());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(&path)
            .args([base.as_str(), ALICE, "sk-wrong-0123456789abcdef"])
            .output()
            .expect("run python3")
    })
    .await
    .expect("the script ran");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the script failed ({}):\n{stdout}\n{stderr}\nhost log:\n{}",
        output.status,
        host.log()
    );
    let steps = stdout
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).expect("one JSON object a line");
            (value["step"].as_str().expect("step").to_owned(), value)
        })
        .collect();
    Steps { steps, stdout }
}

/// What a script printed, by step.
struct Steps {
    steps: std::collections::HashMap<String, Value>,
    stdout: String,
}

impl Steps {
    fn get(&self, name: &str) -> &Value {
        self.steps
            .get(name)
            .unwrap_or_else(|| panic!("no step {name} in:\n{}", self.stdout))
    }
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
    let started = Instant::now();
    let steps = run_script(&host, SCRIPT).await;
    let step = |name: &str| steps.get(name);

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

const TOOLS_SCRIPT: &str = r#"
import json, sys
import openai

base, alice = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key=alice, max_retries=0, timeout=20)

def out(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)

def tool(name):
    return {"type": "function", "function": {"name": name, "description": name,
            "parameters": {"type": "object", "properties": {"prompt": {"type": "string"}}}}}
tools = [tool("lookup"), tool("weather")]
results = {"lookup": "found it", "weather": "rain later"}

messages = [{"role": "user", "content": "plan my day"}]
first = client.chat.completions.create(model="tools", messages=messages, tools=tools)
calls = first.choices[0].message.tool_calls
out("first", finish=first.choices[0].finish_reason, content=first.choices[0].message.content,
    calls=[[c.id, c.type, c.function.name, json.loads(c.function.arguments)] for c in calls])
messages.append(first.choices[0].message.model_dump(exclude_none=True))
for call in calls:
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": results[call.function.name]})

# The second round streamed: tool calls arrive as deltas by index.
streamed, finish = {}, None
for chunk in client.chat.completions.create(model="tools", messages=messages, tools=tools,
                                            stream=True):
    choice = chunk.choices[0]
    finish = choice.finish_reason or finish
    for delta in choice.delta.tool_calls or []:
        entry = streamed.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
        entry["id"] = delta.id or entry["id"]
        if delta.function:
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
out("second", finish=finish, calls=[streamed[i] for i in sorted(streamed)])
messages.append({"role": "assistant", "content": None, "tool_calls": [
    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
    for c in (streamed[i] for i in sorted(streamed))]})
for c in (streamed[i] for i in sorted(streamed)):
    messages.append({"role": "tool", "tool_call_id": c["id"], "content": results[c["name"]]})

last = client.chat.completions.create(model="tools", messages=messages, tools=tools)
out("last", finish=last.choices[0].finish_reason, content=last.choices[0].message.content,
    calls=last.choices[0].message.tool_calls)

try:
    client.chat.completions.create(model="tools", messages=messages, tools=tools,
                                   extra_headers={"X-Session-Id": "tools-session"})
    out("session", error=None)
except openai.APIError as err:
    out("session", error={"status": err.status_code, "code": err.code})
"#;

// Tool round trips through the official client: a backend that calls the two
// declared tools twice (echo with `call_tools`, `tool_rounds = 2`) gets the
// calls to the client, plain and streamed, and answers with the results the
// client sent back as `tool` messages.
#[tokio::test]
async fn the_openai_python_client_runs_tool_round_trips() {
    if !python_openai() {
        return;
    }
    let mut config = with_keys();
    config.models.push((
        "tools".to_owned(),
        "{ call_tools = true, tool_rounds = 2 }".to_owned(),
    ));
    let host = Host::start(&config);
    let steps = run_script(&host, TOOLS_SCRIPT).await;

    let first = steps.get("first");
    assert_eq!(first["finish"], "tool_calls");
    assert_eq!(first["content"], Value::Null);
    let arguments = json!({"prompt": "plan my day"});
    assert_eq!(
        first["calls"],
        json!([
            ["call_1_0", "function", "lookup", arguments],
            ["call_1_1", "function", "weather", arguments]
        ])
    );

    let second = steps.get("second");
    assert_eq!(second["finish"], "tool_calls");
    let calls = second["calls"].as_array().expect("calls");
    let names: Vec<_> = calls.iter().map(|c| c["name"].clone()).collect();
    assert_eq!(names, [json!("lookup"), json!("weather")]);
    assert_eq!(calls[0]["id"], "call_4_0", "{calls:?}");
    for call in calls {
        let parsed: Value =
            serde_json::from_str(call["arguments"].as_str().expect("text")).expect("JSON");
        assert_eq!(parsed, arguments);
    }

    let last = steps.get("last");
    assert_eq!(last["finish"], "stop");
    assert_eq!(last["calls"], Value::Null);
    assert_eq!(
        last["content"],
        "echo: plan my day found it rain later found it rain later"
    );

    // A session's turn is the last user message: a request ending in tool
    // results cannot be one, and says so.
    assert_eq!(
        steps.get("session")["error"],
        json!({"status": 400, "code": "invalid_request"})
    );
}
