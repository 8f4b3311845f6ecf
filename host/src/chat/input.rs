//! The command line of `llm-host chat` and the lines typed into it:
//! prompts and the slash commands.

use super::connection::Endpoint;

/// Where the chat connects without `--url`: `[server] listen` of the
/// shipped config.toml.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:3000/v1/ws";

/// What `llm-host chat` was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The host.
    pub endpoint: Endpoint,
    /// The session to resume.
    pub session: Option<String>,
    /// The backend.
    pub model: Option<String>,
    /// `--key`.
    pub key: Option<String>,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Chat.
    Chat(Box<Options>),
    /// Print the usage.
    Help,
}

/// Reads the arguments after `chat`. `session=` and `model=` in the URL's
/// query count as `--session` and `--model`, which win over them.
pub fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut url = None;
    let mut session = None;
    let mut model = None;
    let mut key = None;
    while let Some(arg) = args.next() {
        let mut value = |what: &str| args.next().ok_or(format!("{arg} needs {what}"));
        match arg.as_str() {
            "--help" | "-h" => return Ok(Command::Help),
            "--url" => url = Some(value("a URL")?),
            "--session" => session = Some(value("a session id")?),
            "--model" => model = Some(value("a backend name")?),
            "--key" => key = Some(value("a key")?),
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    let endpoint = Endpoint::parse(url.as_deref().unwrap_or(DEFAULT_URL))?;
    Ok(Command::Chat(Box::new(Options {
        session: session.or_else(|| endpoint.session.clone()),
        model: model.or_else(|| endpoint.model.clone()),
        endpoint,
        key,
    })))
}

/// One line the user typed.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Send this prompt.
    Prompt(String),
    /// An empty line.
    Nothing,
    /// `/quit`.
    Quit,
    /// `/model [NAME]`.
    Model(Option<String>),
    /// `/session [ID]`.
    Session(Option<String>),
    /// `/new`.
    New,
    /// `/help`.
    Help,
    /// A command the chat does not take, and why.
    Bad(String),
}

/// What `line` asks for: a prompt (trimmed) or a slash command.
pub fn parse_input(line: &str) -> Input {
    let line = line.trim();
    if line.is_empty() {
        return Input::Nothing;
    }
    if let Some(escaped) = line.strip_prefix("//") {
        return Input::Prompt(format!("/{escaped}"));
    }
    let Some(command) = line.strip_prefix('/') else {
        return Input::Prompt(line.to_owned());
    };
    let mut words = command.split_whitespace();
    let name = words.next().unwrap_or_default();
    let argument = words.next().map(str::to_owned);
    if words.next().is_some() {
        return Input::Bad(format!("/{name} takes one argument at most"));
    }
    match (name, argument) {
        ("quit" | "exit", None) => Input::Quit,
        ("model", argument) => Input::Model(argument),
        ("session", argument) => Input::Session(argument),
        ("new", None) => Input::New,
        ("help", None) => Input::Help,
        ("quit" | "exit" | "new" | "help", Some(_)) => {
            Input::Bad(format!("/{name} takes no argument"))
        }
        _ => Input::Bad(format!(
            "unknown command /{name} (/help lists them; //TEXT sends /TEXT)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Command, String> {
        parse_args(list.iter().map(|arg| (*arg).to_owned()))
    }

    fn chat(list: &[&str]) -> Options {
        match args(list) {
            Ok(Command::Chat(options)) => *options,
            other => panic!("{list:?}: {other:?}"),
        }
    }

    #[test]
    fn parses_the_arguments() {
        let options = chat(&[]);
        assert_eq!(options.endpoint.url(None, None), DEFAULT_URL);
        assert_eq!(
            (options.session, options.model, options.key),
            (None, None, None)
        );

        let options = chat(&[
            "--url",
            "ws://h:1/",
            "--session",
            "s",
            "--model",
            "fast",
            "--key",
            "k",
        ]);
        assert_eq!(
            options
                .endpoint
                .url(options.session.as_deref(), options.model.as_deref()),
            "ws://h:1/?session=s&model=fast"
        );
        assert_eq!(options.key.as_deref(), Some("k"));

        // The URL's own session and model, unless the flags say otherwise.
        let options = chat(&["--url", "ws://h:1/v1/ws?session=a&model=m"]);
        assert_eq!(
            (options.session.as_deref(), options.model.as_deref()),
            (Some("a"), Some("m"))
        );
        let options = chat(&["--session", "b", "--url", "ws://h:1/v1/ws?session=a"]);
        assert_eq!(options.session.as_deref(), Some("b"));

        assert_eq!(args(&["--help"]), Ok(Command::Help));
        for (list, says) in [
            (&["--url"][..], "--url needs"),
            (&["--frob"][..], "`--frob`"),
            (&["extra"][..], "`extra`"),
            (&["--url", "gopher://x"][..], "scheme"),
        ] {
            let err = args(list).expect_err("refused");
            assert!(err.contains(says), "{list:?}: {err}");
        }
    }

    #[test]
    fn reads_what_the_user_typed() {
        assert_eq!(
            parse_input("  hello there \n"),
            Input::Prompt("hello there".to_owned())
        );
        assert_eq!(parse_input("\n"), Input::Nothing);
        assert_eq!(parse_input("/quit\n"), Input::Quit);
        assert_eq!(parse_input("/model"), Input::Model(None));
        assert_eq!(
            parse_input("/model  fast "),
            Input::Model(Some("fast".to_owned()))
        );
        assert_eq!(parse_input("/session"), Input::Session(None));
        assert_eq!(
            parse_input("/session s-1"),
            Input::Session(Some("s-1".to_owned()))
        );
        assert_eq!(parse_input("/new"), Input::New);
        assert_eq!(parse_input("/help"), Input::Help);
        assert_eq!(
            parse_input("//etc/hosts?"),
            Input::Prompt("/etc/hosts?".to_owned())
        );
        for (line, says) in [
            ("/model a b", "one argument"),
            ("/new x", "no argument"),
            ("/frob", "unknown command /frob"),
        ] {
            match parse_input(line) {
                Input::Bad(why) => assert!(why.contains(says), "{line}: {why}"),
                other => panic!("{line}: {other:?}"),
            }
        }
    }
}
