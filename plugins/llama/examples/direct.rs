//! Generation speed of one model, prompt and thread count, three ways:
//!
//! - `direct`: llama-cpp-2 driven directly (context, prompt decode, greedy
//!   sampling, token pieces to text), the floor;
//! - `adapter`: the plugin's adapter, called in-process through the same
//!   trait object the host calls (`EventSink_TO`), with a sink that only
//!   records times;
//! - `host`: the release `llm-host` with the llama backend, one WebSocket
//!   connection per turn in command mode, frames parsed as a client would.
//!
//! Each way runs one warm-up turn, then `--runs` rounds of one turn per way,
//! interleaved so that load from elsewhere falls on all ways alike.
//! Greedy sampling makes all three generate the same tokens.
//!
//! ```text
//! scripts/fetch-model.sh && cargo build --release
//! cargo run --release -p llm-plugin-llama --example direct -- [--tokens 128] [--runs 5]
//!     [--threads 2] [--pad 0] [--model PATH] [--no-host]
//! ```

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llm_host_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RStr},
    EventSink, EventSink_TO, FinishReason, Flow, LogLevel, Message, ModelRequest, Plugin, Role,
    TurnParams, Usage,
};
use llm_plugin_llama::{backend, LlamaPlugin, Utf8Stream};

type Error = Box<dyn std::error::Error>;

const PROMPT: &str = "Write a long essay about the history of bread.";
/// The plugin decodes prompts in chunks of this many tokens; so does `direct`.
const CHUNK: usize = 256;

struct Options {
    model: PathBuf,
    tokens: u64,
    runs: usize,
    threads: u32,
    host: bool,
    /// Filler sentences before the prompt, for a longer prompt.
    pad: usize,
}

impl Options {
    /// The user message: `pad` filler sentences (about 10 tokens each), then
    /// the request.
    fn prompt(&self) -> String {
        "The quick brown fox jumps over the lazy dog. ".repeat(self.pad) + PROMPT
    }
}

/// One measured turn.
#[derive(Clone, Copy, Debug, Default)]
struct Turn {
    /// From the request to the first piece of text.
    first_text: Duration,
    /// From the request to the last piece of text.
    last_text: Duration,
    /// Tokens generated.
    tokens: u64,
    /// Pieces of text received.
    pieces: u64,
    /// Tokens of the prompt.
    prompt_tokens: u64,
}

impl Turn {
    /// Generation speed after the first token: tokens 2..=n over the time
    /// between the first and the last text.
    fn tokens_per_sec(&self) -> f64 {
        let span = (self.last_text - self.first_text).as_secs_f64();
        if self.tokens < 2 || span <= 0.0 {
            return f64::NAN;
        }
        (self.tokens - 1) as f64 / span
    }
}

fn main() -> Result<(), Error> {
    let options = parse_args()?;
    println!(
        "model {} | prompt {PROMPT:?} after {} filler sentences | greedy, up to {} tokens | \
         {} threads | {} rounds",
        options.model.display(),
        options.pad,
        options.tokens,
        options.threads,
        options.runs
    );

    // Warm-ups (model loads, page cache), and the peak RSS of llama-cpp-2
    // alone before the adapter loads its own copy of the weights.
    direct_turn(&options)?;
    let direct_rss = own_peak_rss_kib()?;
    adapter_turn(&options)?;
    let host = match options.host {
        true => {
            let host = Host::start(&options)?;
            host.turn(&options)?;
            Some(host)
        }
        false => None,
    };

    // Rounds interleave the ways, so that load from elsewhere on the machine
    // falls on all of them alike.
    let mut ways: Vec<(&str, Vec<Turn>)> = vec![
        ("direct (llama-cpp-2)", vec![]),
        ("adapter (in-process)", vec![]),
    ];
    if host.is_some() {
        ways.push(("host (WebSocket)", vec![]));
    }
    for _ in 0..options.runs.max(1) {
        ways[0].1.push(direct_turn(&options)?);
        ways[1].1.push(adapter_turn(&options)?);
        if let Some(host) = &host {
            ways[2].1.push(host.turn(&options)?);
        }
    }

    println!(
        "\n{:<22} {:>6} {:>6} {:>7} {:>12} {:>13} {:>11} {:>15}",
        "way", "prompt", "tokens", "pieces", "first text", "tokens/s", "best tok/s", "vs direct"
    );
    let direct = ways[0].1.clone();
    for (name, turns) in &ways {
        let rates: Vec<f64> = turns.iter().map(Turn::tokens_per_sec).collect();
        // Each round's rate over the same round's direct rate.
        let ratios: Vec<f64> = rates
            .iter()
            .zip(&direct)
            .map(|(rate, direct)| rate / direct.tokens_per_sec())
            .collect();
        let first: Vec<f64> = turns
            .iter()
            .map(|turn| turn.first_text.as_secs_f64() * 1000.0)
            .collect();
        println!(
            "{name:<22} {:>6} {:>6} {:>7} {:>9.1} ms {:>13.1} {:>11.1} {:>14.1}%",
            turns[0].prompt_tokens,
            turns[0].tokens,
            turns[0].pieces,
            median(&first),
            median(&rates),
            rates.iter().copied().fold(f64::NAN, f64::max),
            100.0 * median(&ratios)
        );
    }
    println!("(medians over the rounds; vs direct: median of each round's ratio)");
    println!("peak RSS: direct {} MiB", direct_rss / 1024);
    if let Some(host) = &host {
        println!(
            "host: RSS {} MiB after the turns, peak {} MiB",
            host.rss_kib()? / 1024,
            host.peak_rss_kib()? / 1024
        );
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn parse_args() -> Result<Options, Error> {
    let default_model = std::env::var_os("LLM_HOST_TEST_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/llm-host/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let mut options = Options {
        model: default_model,
        tokens: 128,
        runs: 5,
        threads: 2,
        host: true,
        pad: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--model" => options.model = PathBuf::from(value()?),
            "--tokens" => options.tokens = value()?.parse()?,
            "--runs" => options.runs = value()?.parse()?,
            "--threads" => options.threads = value()?.parse()?,
            "--no-host" => options.host = false,
            "--pad" => options.pad = value()?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if !options.model.is_file() {
        return Err(format!(
            "{} is missing: run scripts/fetch-model.sh",
            options.model.display()
        )
        .into());
    }
    Ok(options)
}

/// llama-cpp-2 alone, doing what the plugin does for one turn.
fn direct_turn(options: &Options) -> Result<Turn, Error> {
    use std::sync::OnceLock;
    static MODEL: OnceLock<LlamaModel> = OnceLock::new();
    let backend = backend()?;
    let model = match MODEL.get() {
        Some(model) => model,
        None => {
            let model =
                LlamaModel::load_from_file(backend, &options.model, &LlamaModelParams::default())?;
            MODEL.get_or_init(|| model)
        }
    };
    let started = Instant::now();
    let template = model.chat_template(None)?;
    let chat = [LlamaChatMessage::new("user".into(), options.prompt())?];
    let prompt = model.apply_chat_template(&template, &chat, true)?;
    let threads = options.threads as i32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(2048))
        .with_n_batch(CHUNK as u32)
        .with_n_ubatch(CHUNK as u32)
        .with_n_seq_max(1)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(backend, params)?;
    let vocab = model.vocab();
    let tokens = vocab.tokenize(prompt.as_bytes(), true, true);
    let mut batch = LlamaBatch::new(CHUNK, 1);
    let mut position = 0;
    for chunk in tokens.chunks(CHUNK) {
        batch.clear();
        for &token in chunk {
            position += 1;
            batch.add(token, position - 1, &[0], position as usize == tokens.len())?;
        }
        ctx.decode(&mut batch)?;
    }
    let mut sampler = LlamaSampler::greedy();
    let mut utf8 = Utf8Stream::new();
    let (mut piece, mut text) = (Vec::new(), String::new());
    let mut logits_at = batch.n_tokens() - 1;
    let mut turn = Turn {
        prompt_tokens: tokens.len() as u64,
        ..Turn::default()
    };
    while turn.tokens < options.tokens {
        let token = sampler.sample(&ctx, logits_at);
        if vocab.is_eog(token) {
            break;
        }
        turn.tokens += 1;
        piece.clear();
        vocab.token_to_piece_into(token, &mut piece, false, None);
        text.clear();
        utf8.push(&piece, &mut text);
        if !text.is_empty() {
            let now = started.elapsed();
            if turn.pieces == 0 {
                turn.first_text = now;
            }
            turn.last_text = now;
            turn.pieces += 1;
            std::hint::black_box(&text);
        }
        if turn.tokens == options.tokens {
            break;
        }
        batch.clear();
        batch.add(token, position, &[0], true)?;
        position += 1;
        ctx.decode(&mut batch)?;
        logits_at = 0;
    }
    Ok(turn)
}

/// The plugin's adapter, in-process, through the host's trait object.
fn adapter_turn(options: &Options) -> Result<Turn, Error> {
    use std::sync::OnceLock;
    static ADAPTER: OnceLock<llm_host_plugin_api::ModelAdapterBox> = OnceLock::new();
    let adapter = match ADAPTER.get() {
        Some(adapter) => adapter,
        None => {
            let settings = serde_json::json!({
                "model_path": options.model,
                "threads": options.threads,
            });
            let adapter = LlamaPlugin::new_model(&settings.to_string())?;
            ADAPTER.get_or_init(|| adapter)
        }
    };
    let request = serde_json::to_string(&ModelRequest {
        messages: vec![Message::new(Role::User, options.prompt())],
        params: TurnParams {
            temperature: Some(0.0),
            max_tokens: Some(options.tokens),
            ..TurnParams::default()
        },
        ..ModelRequest::default()
    })?;
    let mut sink = TimingSink {
        started: Instant::now(),
        turn: Turn::default(),
    };
    adapter
        .generate(
            request.as_str().into(),
            EventSink_TO::from_ptr(&mut sink, TD_Opaque),
        )
        .into_result()?;
    Ok(sink.turn)
}

struct TimingSink {
    started: Instant,
    turn: Turn,
}

impl EventSink for TimingSink {
    fn start(&mut self, _id: RStr<'_>, _model_id: RStr<'_>) -> Flow {
        Flow::CONTINUE
    }
    fn text(&mut self, _text: RStr<'_>) -> Flow {
        let now = self.started.elapsed();
        if self.turn.pieces == 0 {
            self.turn.first_text = now;
        }
        self.turn.last_text = now;
        self.turn.pieces += 1;
        Flow::CONTINUE
    }
    fn reasoning(&mut self, _text: RStr<'_>) -> Flow {
        Flow::CONTINUE
    }
    fn tool_call(&mut self, _id: RStr<'_>, _name: RStr<'_>, _arguments: RStr<'_>) -> Flow {
        Flow::CONTINUE
    }
    fn usage(&mut self, usage: Usage) -> Flow {
        self.turn.tokens = usage.output_tokens;
        self.turn.prompt_tokens = usage.input_tokens;
        Flow::CONTINUE
    }
    fn end(&mut self, _reason: FinishReason) -> Flow {
        Flow::CONTINUE
    }
    fn error(&mut self, code: RStr<'_>, message: RStr<'_>) -> Flow {
        eprintln!("adapter error {code}: {message}");
        Flow::CONTINUE
    }
    fn diagnostic(&mut self, _level: LogLevel, _message: RStr<'_>, _data: RStr<'_>) -> Flow {
        Flow::CONTINUE
    }
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// The release host on a temporary directory holding copies of the llama and
/// memory plugins; killed on drop.
struct Host {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Host {
    fn start(options: &Options) -> Result<Host, Error> {
        let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release");
        let dir = std::env::temp_dir().join(format!("llm-llama-bench-{}", std::process::id()));
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins)?;
        for name in ["libllm_plugin_llama.so", "libllm_plugin_memory.so"] {
            std::fs::copy(release.join(name), plugins.join(name)).map_err(|err| {
                format!(
                    "{}: {err} (run `cargo build --release` first)",
                    release.join(name).display()
                )
            })?;
        }
        let model = serde_json::to_string(&options.model)?;
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[plugins]\ndir = \"plugins\"\nwatch = false\n\n\
             [defaults]\nmodel = \"local\"\nstore = \"memory\"\n\n\
             [models.local]\nplugin = \"llama\"\nsettings = {{ model_path = {model}, threads = {} }}\n\n\
             [stores.memory]\nplugin = \"memory\"\n",
            options.threads
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let mut child = Command::new(release.join("llm-host"))
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("RUST_LOG", "warn,llm_host=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| format!("llm-host: {err} (run `cargo build --release` first)"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line
                    .split("listening on ")
                    .nth(1)
                    .and_then(|rest| rest.trim().parse::<SocketAddr>().ok())
                {
                    let _ = tx.send(addr);
                } else if line.contains("ERROR") || line.contains("WARN") {
                    eprintln!("host: {line}");
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Ok(Host { child, addr, dir }),
            Err(_) => {
                let _ = child.kill();
                Err("the host did not start listening within 30 s".into())
            }
        }
    }

    /// One turn on a new connection (a new session), timed from the prompt frame.
    fn turn(&self, options: &Options) -> Result<Turn, Error> {
        use tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}/v1/ws", self.addr).into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "llm-host.v1".parse()?);
        let (mut socket, _) = tungstenite::connect(request)?;
        let _open = socket.read()?;
        let prompt = serde_json::json!({
            "type": "prompt",
            "text": options.prompt(),
            "params": {"temperature": 0, "maxTokens": options.tokens},
        });
        let started = Instant::now();
        socket.send(tungstenite::Message::text(prompt.to_string()))?;
        let mut turn = Turn::default();
        loop {
            let frame = socket.read()?;
            let now = started.elapsed();
            let tungstenite::Message::Text(text) = frame else {
                continue;
            };
            let event: serde_json::Value = serde_json::from_str(text.as_str())?;
            let name = event["name"].as_str().unwrap_or_default();
            let inner = &event["data"]["event"];
            match (name, inner["type"].as_str().unwrap_or_default()) {
                ("interaction.model", "delta") => {
                    if turn.pieces == 0 {
                        turn.first_text = now;
                    }
                    turn.last_text = now;
                    turn.pieces += 1;
                }
                ("interaction.model", "usage") => {
                    let usage = &inner["usage"];
                    turn.tokens = usage["outputTokens"].as_u64().unwrap_or_default();
                    turn.prompt_tokens = usage["inputTokens"].as_u64().unwrap_or_default();
                }
                ("interaction.model", "error") => return Err(format!("turn failed: {text}").into()),
                ("interaction.turn", "end") => break,
                _ => {}
            }
        }
        let _ = socket.close(None);
        Ok(turn)
    }

    fn rss_kib(&self) -> Result<u64, Error> {
        status_field(self.child.id(), "VmRSS:")
    }

    fn peak_rss_kib(&self) -> Result<u64, Error> {
        status_field(self.child.id(), "VmHWM:")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn own_peak_rss_kib() -> Result<u64, Error> {
    status_field(std::process::id(), "VmHWM:")
}

fn status_field(pid: u32, field: &str) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}
