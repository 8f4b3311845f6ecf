//! `llm-host new-plugin NAME --kind model|store [--dir PATH] [--api PATH]`:
//! writes a new plugin crate from one of the templates, with its names
//! filled in, ready for `cargo build --release`.
//!
//! The templates are this repository's `plugins/template` (model) and
//! `plugins/template-store` (store), embedded in the binary with
//! `include_str!`, so an installed `llm-host` writes the templates it was
//! built with. What changes in the copy: the crate name
//! (`llm-plugin-NAME`), the library name (`llm_plugin_NAME`, so the build
//! gives `libllm_plugin_NAME.so`), the plugin's `NAME` (what config.toml
//! names), the descriptions, the dependency paths, and an empty
//! `[workspace]` so the crate builds wherever it is. Beside the template's
//! files it writes a `.gitignore` and a short `README.md`.
//!
//! `llm-host-plugin-api` is not on a registry yet, so the crate depends on a
//! checkout by path: `--api PATH` (the `plugin-api` directory of an llm-host
//! checkout, or the checkout itself) if given, else the `plugin-api` of the
//! source tree this binary was built from if it is still there; otherwise
//! the command refuses and says to pass `--api`. The templates' tests run
//! the conformance suites, so `llm-host-conformance` (`conformance/`, beside
//! `plugin-api/`) becomes a dev-dependency the same way.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The usage text of `llm-host new-plugin`.
pub const USAGE: &str = "\
usage: llm-host new-plugin NAME --kind model|store [--dir PATH] [--api PATH]

Writes a new plugin crate from llm-host's model or store template, with its
names filled in: crate llm-plugin-NAME, library libllm_plugin_NAME.so, and
NAME as the plugin's name (what config.toml says: plugin = \"NAME\").

  NAME          lower-case letters, digits, `-` and `_`, starting with a letter
  --kind KIND   model (a model backend) or store (a session store)
  --dir PATH    where to write the crate (default ./NAME); must not exist or be empty
  --api PATH    the plugin-api crate to build against: its directory in an
                llm-host checkout, or the checkout (default: the plugin-api of
                the source tree this llm-host was built from, if it is still there)";

/// The plugin-api of the source tree this binary was built from.
const BUILT_FROM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-api");

/// The longest plugin name `new-plugin` takes.
const MAX_NAME: usize = 64;

/// What kind of plugin to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A model backend, from `plugins/template`.
    Model,
    /// A session store, from `plugins/template-store`.
    Store,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::Store => "store",
        }
    }

    /// The template's files: path in the new crate, text.
    fn files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Kind::Model => &[
                (
                    "Cargo.toml",
                    include_str!("../../plugins/template/Cargo.toml"),
                ),
                (
                    "src/lib.rs",
                    include_str!("../../plugins/template/src/lib.rs"),
                ),
                (
                    "src/tests.rs",
                    include_str!("../../plugins/template/src/tests.rs"),
                ),
            ],
            Kind::Store => &[
                (
                    "Cargo.toml",
                    include_str!("../../plugins/template-store/Cargo.toml"),
                ),
                (
                    "src/lib.rs",
                    include_str!("../../plugins/template-store/src/lib.rs"),
                ),
                (
                    "src/tests.rs",
                    include_str!("../../plugins/template-store/src/tests.rs"),
                ),
            ],
        }
    }

    /// The template's names, as they appear in its files: crate, library,
    /// plugin `NAME`.
    fn template_names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Kind::Model => ("llm-plugin-template", "llm_plugin_template", "template"),
            Kind::Store => (
                "llm-plugin-template-store",
                "llm_plugin_template_store",
                "template-store",
            ),
        }
    }
}

/// What `llm-host new-plugin` was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The plugin's name.
    pub name: String,
    /// Model or store.
    pub kind: Kind,
    /// Where to write the crate (`./NAME` when not given).
    pub dir: PathBuf,
    /// `--api`, if given.
    pub api: Option<PathBuf>,
}

/// What the arguments asked for: a plugin, or the usage text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Write a plugin.
    New(Options),
    /// `--help`.
    Help,
}

/// Parses the arguments after `new-plugin`.
pub fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut name = None;
    let mut kind = None;
    let mut dir = None;
    let mut api = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--help" | "-h" => return Ok(Command::Help),
            "--kind" => {
                let value = args.next().ok_or("--kind needs `model` or `store`")?;
                kind = Some(match value.as_str() {
                    "model" => Kind::Model,
                    "store" => Kind::Store,
                    other => return Err(format!("--kind `{other}`: `model` or `store`")),
                });
            }
            "--dir" => dir = Some(PathBuf::from(args.next().ok_or("--dir needs a path")?)),
            "--api" => api = Some(PathBuf::from(args.next().ok_or("--api needs a path")?)),
            other if other.starts_with('-') => {
                return Err(format!("unexpected argument `{other}`"));
            }
            other if name.is_none() => name = Some(other.to_owned()),
            other => return Err(format!("unexpected argument `{other}` (one NAME only)")),
        }
    }
    let name = name.ok_or("new-plugin needs the plugin's NAME")?;
    check_name(&name)?;
    let kind = kind.ok_or("--kind model|store is required")?;
    Ok(Command::New(Options {
        dir: dir.unwrap_or_else(|| PathBuf::from(&name)),
        name,
        kind,
        api,
    }))
}

/// Refuses a name that would not make a crate name, a library name and a
/// config value as they are.
fn check_name(name: &str) -> Result<(), String> {
    let valid = name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "NAME `{name}`: up to {MAX_NAME} lower-case letters, digits, `-` and `_`, \
             starting with a letter"
        ))
    }
}

/// The crates the new one depends on by path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sources {
    /// The `llm-host-plugin-api` crate's directory.
    pub api: PathBuf,
    /// Its version.
    pub api_version: String,
    /// The `llm-host-conformance` crate's directory.
    pub conformance: PathBuf,
}

/// The package name and version of the crate in `dir`, if it has one.
fn package(dir: &Path) -> Option<(String, String)> {
    let text = fs::read_to_string(dir.join("Cargo.toml")).ok()?;
    let manifest: toml::Table = toml::from_str(&text).ok()?;
    let package = manifest.get("package")?.as_table()?;
    let name = package.get("name")?.as_str()?.to_owned();
    // A version inherited from a workspace (`version.workspace = true`)
    // shows as unknown.
    let version = package
        .get("version")
        .and_then(|v| v.as_str())
        .unwrap_or("?")
        .to_owned();
    Some((name, version))
}

/// Whether `dir` holds the crate `name`.
fn is_package(dir: &Path, name: &str) -> bool {
    package(dir).is_some_and(|(found, _)| found == name)
}

/// The plugin-api and conformance crates to build against: from `api` (the
/// plugin-api directory, or a checkout holding `plugin-api/`), else from
/// the source tree this binary was built from.
pub fn sources(api: Option<&Path>) -> Result<Sources, String> {
    let api_dir = match api {
        Some(given) => {
            let candidates = [given.to_path_buf(), given.join("plugin-api")];
            candidates
                .into_iter()
                .find(|dir| is_package(dir, "llm-host-plugin-api"))
                .ok_or_else(|| {
                    format!(
                        "--api {}: neither the plugin-api crate (llm-host-plugin-api) nor an \
                         llm-host checkout holding it in plugin-api/",
                        given.display()
                    )
                })?
        }
        None => {
            let built_from = PathBuf::from(BUILT_FROM);
            if !is_package(&built_from, "llm-host-plugin-api") {
                return Err(format!(
                    "the plugin-api this llm-host was built from ({}) is not there any more, and \
                     llm-host-plugin-api is not on a registry yet: pass --api PATH, the \
                     plugin-api directory of an llm-host checkout (of plugin-api {} to match \
                     this host)",
                    built_from.display(),
                    llm_host_plugin_api::API_VERSION
                ));
            }
            built_from
        }
    };
    let api_dir =
        fs::canonicalize(&api_dir).map_err(|err| format!("{}: {err}", api_dir.display()))?;
    let api_version = package(&api_dir).map(|(_, v)| v).unwrap_or_default();
    let conformance = api_dir
        .parent()
        .map(|parent| parent.join("conformance"))
        .filter(|dir| is_package(dir, "llm-host-conformance"))
        .ok_or_else(|| {
            format!(
                "{}: no conformance/ crate (llm-host-conformance) beside it; the template's tests \
                 run its suites: pass --api the plugin-api of a whole llm-host checkout",
                api_dir.display()
            )
        })?;
    Ok(Sources {
        api: api_dir,
        api_version,
        conformance,
    })
}

/// `text` as a TOML string, quoted and escaped.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The new crate's names.
struct Names<'a> {
    plugin: &'a str,
    krate: String,
    lib: String,
}

impl<'a> Names<'a> {
    fn new(plugin: &'a str) -> Self {
        Self {
            plugin,
            krate: format!("llm-plugin-{plugin}"),
            lib: format!("llm_plugin_{}", plugin.replace('-', "_")),
        }
    }
}

/// Replaces every `from` in `text`; an error if there is none (the
/// embedded template is not what this code expects).
fn replace(text: &mut String, file: &str, from: &str, to: &str) -> Result<(), String> {
    if !text.contains(from) {
        return Err(format!(
            "the embedded template's {file} has no `{from}` (a bug in llm-host)"
        ));
    }
    *text = text.replace(from, to);
    Ok(())
}

/// The files of the new crate (path in the crate, text), without writing
/// anything.
pub fn render(name: &str, kind: Kind, sources: &Sources) -> Result<Vec<(String, String)>, String> {
    check_name(name)?;
    let names = Names::new(name);
    let (template_crate, template_lib, template_name) = kind.template_names();
    let mut files = Vec::new();
    for (path, text) in kind.files() {
        let mut text = (*text).to_owned();
        // Each rule must apply: a template changed without this code is an
        // error here (and in this module's tests), not a half-renamed copy.
        let mut rules = vec![(template_lib.to_owned(), names.lib.clone())];
        match *path {
            "Cargo.toml" => {
                rules.insert(0, (template_crate.to_owned(), names.krate.clone()));
            }
            "src/lib.rs" => rules.extend([
                (format!("\"{template_name}\""), format!("\"{name}\"")),
                (format!("`{template_name}`"), format!("`{name}`")),
                // The template calls itself an example; the copy does what
                // the example did until it is changed.
                (format!("\"example {}: ", kind.as_str()), "\"".to_owned()),
            ]),
            _ => {
                rules = vec![(format!("\"{template_name}\""), format!("\"{name}\""))];
                if kind == Kind::Model {
                    // The model's id and its diagnostic name the plugin.
                    rules.extend([
                        (format!("start {template_name}-"), format!("start {name}-")),
                        (
                            format!("the {template_name} model"),
                            format!("the {name} model"),
                        ),
                    ]);
                }
            }
        }
        for (from, to) in &rules {
            replace(&mut text, path, from, to)?;
        }
        if *path == "Cargo.toml" {
            text = cargo_toml(&text, kind, &names, sources)?;
        }
        files.push(((*path).to_owned(), text));
    }
    files.push((".gitignore".to_owned(), gitignore(kind)));
    files.push(("README.md".to_owned(), readme(kind, &names, sources)));
    Ok(files)
}

/// The template's Cargo.toml made the new crate's: its own header comment
/// and description, the dependencies at `sources`, and a workspace of its
/// own.
fn cargo_toml(
    text: &str,
    kind: Kind,
    names: &Names<'_>,
    sources: &Sources,
) -> Result<String, String> {
    let package = text
        .find("[package]")
        .ok_or("the embedded template's Cargo.toml has no [package] (a bug in llm-host)")?;
    let mut text = text[package..].to_owned();
    let description = text
        .lines()
        .find(|line| line.starts_with("description = "))
        .ok_or("the embedded template's Cargo.toml has no description (a bug in llm-host)")?
        .to_owned();
    replace(
        &mut text,
        "Cargo.toml",
        &description,
        &format!(
            "description = {}",
            toml_string(&format!(
                "{}: an llm-host {} plugin",
                names.plugin,
                kind.as_str()
            ))
        ),
    )?;
    replace(
        &mut text,
        "Cargo.toml",
        "{ path = \"../../plugin-api\" }",
        &format!("{{ path = {} }}", toml_string(&path_text(&sources.api)?)),
    )?;
    replace(
        &mut text,
        "Cargo.toml",
        "{ path = \"../../conformance\" }",
        &format!(
            "{{ path = {} }}",
            toml_string(&path_text(&sources.conformance)?)
        ),
    )?;
    let header = format!(
        "# The llm-host {kind} plugin `{plugin}`, written by `llm-host new-plugin` (llm-host \
         {version})\n# from its {kind} template. `cargo build --release` builds\n# \
         target/release/lib{lib}.so.\n",
        kind = kind.as_str(),
        plugin = names.plugin,
        version = env!("CARGO_PKG_VERSION"),
        lib = names.lib,
    );
    Ok(format!(
        "{header}{text}\n# A workspace of its own, so the crate builds wherever it is. Remove \
         these lines\n# to make it a member of an enclosing workspace instead.\n[workspace]\n"
    ))
}

fn path_text(path: &Path) -> Result<String, String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{}: not a UTF-8 path", path.display()))
}

fn gitignore(kind: Kind) -> String {
    match kind {
        Kind::Model => "/target/\n".to_owned(),
        // `llm-host check` with no settings keeps its sessions in ./sessions.
        Kind::Store => "/target/\n/sessions/\n".to_owned(),
    }
}

/// `text` with its words wrapped at 80 columns.
fn wrap(text: &str) -> String {
    let mut wrapped = String::new();
    let mut width = 0;
    for word in text.split_whitespace() {
        if width > 0 && width + 1 + word.len() > 80 {
            wrapped.push('\n');
            width = 0;
        } else if width > 0 {
            wrapped.push(' ');
            width += 1;
        }
        wrapped.push_str(word);
        width += word.len();
    }
    wrapped
}

fn readme(kind: Kind, names: &Names<'_>, sources: &Sources) -> String {
    let plugin = names.plugin;
    let library = format!("lib{}.so", names.lib);
    let (what, check_args, config, after_config) = match kind {
        Kind::Model => (
            "It starts as the template's model, which answers the prompt back word by word, \
             upper-cased or reversed",
            " --settings '{\"transform\": \"reverse\"}'",
            format!(
                "[models.{plugin}]\nplugin = \"{plugin}\"\nsettings = {{ transform = \"upper\", \
                 delay_ms = 20 }}"
            ),
            format!("Clients choose it with `?model={plugin}`, or make it `[defaults] model`."),
        ),
        Kind::Store => (
            "It starts as the template's store, which keeps each session as a file in a \
             directory, shared safely by the hosts of one machine",
            " --kind store",
            format!(
                "[stores.{plugin}]\nplugin = \"{plugin}\"\nsettings = {{ dir = \"sessions\", \
                 ttl_secs = 86400 }}\n\n[defaults]\nstore = \"{plugin}\""
            ),
            "`llm-host check` with no settings keeps its test sessions in `./sessions`, which \
             git ignores."
                .to_owned(),
        ),
    };
    let kind = kind.as_str();
    let krate = &names.krate;
    let intro = wrap(&format!(
        "The llm-host {kind} plugin `{plugin}`, written by `llm-host new-plugin` from the \
         {kind} template of llm-host {}. {what}: change `src/lib.rs` into your own. \
         PLUGIN-GUIDE.md in llm-host's repository is the whole contract.",
        env!("CARGO_PKG_VERSION")
    ));
    let deploy = wrap(
        "Copy the library into the host's plugin directory under a temporary name, then \
         rename it into place (a running host watches the directory):",
    );
    let after_config = wrap(&after_config);
    let api = wrap(&format!(
        "`llm-host-plugin-api` is not on a registry yet. `Cargo.toml` depends on it by path, \
         {} (plugin-api {}), and on `llm-host-conformance` beside it for the tests. To build \
         elsewhere, point both at another llm-host checkout, or at its repository by git:",
        sources.api.display(),
        sources.api_version,
    ));
    let api_version =
        wrap("Build against a plugin-api with the host's 0.minor, at least as new as the host's.");
    format!(
        "# {krate}\n\n{intro}\n\n## Build, test, check\n\n```sh\n\
         cargo build --release   # target/release/{library}\n\
         cargo test              # the unit tests and the conformance suite\n\
         llm-host check target/release/{library}{check_args}\n```\n\n\
         ## Deploy\n\n{deploy}\n\n```sh\n\
         cp target/release/{library} \"$PLUGINS/.{library}.tmp\"\n\
         mv -f \"$PLUGINS/.{library}.tmp\" \"$PLUGINS/{library}\"\n```\n\n\
         and name it in the host's `config.toml`:\n\n```toml\n{config}\n```\n\n\
         {after_config}\n\n## plugin-api\n\n{api}\n\n```toml\n\
         llm-host-plugin-api = {{ git = \"URL\", rev = \"COMMIT\" }}\n\
         llm-host-conformance = {{ git = \"URL\", rev = \"COMMIT\" }}\n```\n\n{api_version}\n"
    )
}

/// Whether `path` is missing or an empty directory.
fn usable_dir(path: &Path) -> Result<(), String> {
    match fs::read_dir(path) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(format!(
                "{} is not empty; choose another --dir",
                path.display()
            )),
        },
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(format!("{}: {err}", path.display())),
    }
}

/// Writes the crate `options` describe, with the dependencies at `sources`.
/// Answers the paths written.
pub fn write(options: &Options, sources: &Sources) -> Result<Vec<PathBuf>, String> {
    let files = render(&options.name, options.kind, sources)?;
    usable_dir(&options.dir)?;
    let mut written = Vec::new();
    for (relative, text) in files {
        let path = options.dir.join(&relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(|err| format!("creating {}: {err}", parent.display()))?;
        }
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|err| format!("writing {}: {err}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// `llm-host new-plugin ARGS` (the arguments after `new-plugin`).
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let options = match parse_args(args) {
        Ok(Command::New(options)) => options,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("llm-host new-plugin: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let sources = match sources(options.api.as_deref()) {
        Ok(sources) => sources,
        Err(message) => {
            eprintln!("llm-host new-plugin: {message}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(message) = write(&options, &sources) {
        eprintln!("llm-host new-plugin: {message}");
        return ExitCode::FAILURE;
    }
    let names = Names::new(&options.name);
    let ours = llm_host_plugin_api::API_VERSION;
    if sources.api_version != "?" && minor(&sources.api_version) != minor(ours) {
        eprintln!(
            "llm-host new-plugin: note: {} is plugin-api {}; this host loads plugins built \
             against {}.x only",
            sources.api.display(),
            sources.api_version,
            minor(ours)
        );
    }
    println!(
        "wrote the {} plugin `{}` in {} (crate {}), against plugin-api {} at {}\n\nnext:\n  \
         cd {}\n  cargo build --release\n  llm-host check target/release/lib{}.so{}",
        options.kind.as_str(),
        options.name,
        options.dir.display(),
        names.krate,
        sources.api_version,
        sources.api.display(),
        options.dir.display(),
        names.lib,
        match options.kind {
            Kind::Model => "",
            Kind::Store => " --kind store",
        }
    );
    ExitCode::SUCCESS
}

/// `0.minor` of a version (`0.1.1` -> `0.1`).
fn minor(version: &str) -> &str {
    version
        .match_indices('.')
        .nth(1)
        .map_or(version, |(at, _)| &version[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Command, String> {
        parse_args(list.iter().map(|s| (*s).to_owned()))
    }

    fn fake_sources() -> Sources {
        Sources {
            api: PathBuf::from("/src/llm host/plugin-api"),
            api_version: "0.1.1".to_owned(),
            conformance: PathBuf::from("/src/llm host/conformance"),
        }
    }

    fn file<'a>(files: &'a [(String, String)], path: &str) -> &'a str {
        files
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, text)| text.as_str())
            .unwrap_or_else(|| panic!("no {path}"))
    }

    #[test]
    fn parses_the_arguments() {
        assert_eq!(
            args(&["mine", "--kind", "model"]),
            Ok(Command::New(Options {
                name: "mine".to_owned(),
                kind: Kind::Model,
                dir: PathBuf::from("mine"),
                api: None,
            }))
        );
        assert_eq!(
            args(&["--kind", "store", "s", "--dir", "/x/y", "--api", "/a"]),
            Ok(Command::New(Options {
                name: "s".to_owned(),
                kind: Kind::Store,
                dir: PathBuf::from("/x/y"),
                api: Some(PathBuf::from("/a")),
            }))
        );
        assert_eq!(args(&["--help"]), Ok(Command::Help));
        for (list, says) in [
            (&["--kind", "model"][..], "NAME"),
            (&["mine"][..], "--kind"),
            (&["mine", "--kind", "both"][..], "`both`"),
            (&["mine", "other", "--kind", "model"][..], "`other`"),
            (&["mine", "--kind", "model", "--frob"][..], "--frob"),
            (&["Mine", "--kind", "model"][..], "lower-case"),
            (&["../x", "--kind", "model"][..], "`../x`"),
            (&["1x", "--kind", "model"][..], "starting with a letter"),
            (&["mine", "--dir"][..], "--dir needs"),
        ] {
            let err = args(list).expect_err("refused");
            assert!(err.contains(says), "{list:?}: {err}");
        }
    }

    #[test]
    fn the_model_template_gets_the_new_names() {
        let files = render("my-model", Kind::Model, &fake_sources()).expect("render");
        let names: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "Cargo.toml",
                "src/lib.rs",
                "src/tests.rs",
                ".gitignore",
                "README.md"
            ]
        );
        let cargo = file(&files, "Cargo.toml");
        let manifest: toml::Table = toml::from_str(cargo).expect("valid TOML");
        assert_eq!(
            manifest["package"]["name"].as_str(),
            Some("llm-plugin-my-model")
        );
        assert_eq!(
            manifest["package"]["description"].as_str(),
            Some("my-model: an llm-host model plugin")
        );
        assert_eq!(
            manifest["lib"]["name"].as_str(),
            Some("llm_plugin_my_model")
        );
        assert_eq!(
            manifest["dependencies"]["llm-host-plugin-api"]["path"].as_str(),
            Some("/src/llm host/plugin-api")
        );
        assert_eq!(
            manifest["dev-dependencies"]["llm-host-conformance"]["path"].as_str(),
            Some("/src/llm host/conformance")
        );
        assert!(manifest["workspace"]
            .as_table()
            .is_some_and(|t| t.is_empty()));
        assert!(
            !cargo.contains(".workspace") && !cargo.contains("workspace = true"),
            "{cargo}"
        );

        let lib = file(&files, "src/lib.rs");
        assert!(
            lib.contains("const NAME: &'static str = \"my-model\";"),
            "{lib}"
        );
        assert!(lib.contains("plugin = \"my-model\""));
        assert!(lib.contains("libllm_plugin_my_model.so"));
        let tests = file(&files, "src/tests.rs");
        assert!(tests.contains("assert_eq!(TemplatePlugin::NAME, \"my-model\")"));
        assert!(tests.contains("\"start my-model-upper\""));
        assert!(tests.contains("the my-model model ignores"));
        for (path, text) in &files {
            for left in [
                "\"template",
                "`template`",
                "template-",
                "llm_plugin_template",
                "example model",
            ] {
                assert!(!text.contains(left), "{path} still has {left}");
            }
        }
        assert_eq!(file(&files, ".gitignore"), "/target/\n");
        let readme = file(&files, "README.md");
        assert!(
            readme.contains("[models.my-model]\nplugin = \"my-model\""),
            "{readme}"
        );
        assert!(readme.contains("llm-host check target/release/libllm_plugin_my_model.so"));
    }

    #[test]
    fn the_store_template_gets_the_new_names() {
        let files = render("files", Kind::Store, &fake_sources()).expect("render");
        let manifest: toml::Table = toml::from_str(file(&files, "Cargo.toml")).expect("valid TOML");
        assert_eq!(
            manifest["package"]["name"].as_str(),
            Some("llm-plugin-files")
        );
        assert_eq!(manifest["lib"]["name"].as_str(), Some("llm_plugin_files"));
        let lib = file(&files, "src/lib.rs");
        assert!(
            lib.contains("const NAME: &'static str = \"files\";"),
            "{lib}"
        );
        assert!(lib.contains("libllm_plugin_files.so --kind store"));
        assert!(file(&files, "src/tests.rs").contains("FileStorePlugin::NAME, \"files\""));
        for (path, text) in &files {
            for left in ["template-store", "template_store", "example store"] {
                assert!(!text.contains(left), "{path} still has {left}");
            }
        }
        assert!(file(&files, ".gitignore").contains("/sessions/"));
        assert!(file(&files, "README.md").contains("[defaults]\nstore = \"files\""));
    }

    #[test]
    fn writes_the_crate_into_an_empty_or_new_directory_only() {
        let root =
            std::env::temp_dir().join(format!("llm-host-scaffold-test-{}", uuid::Uuid::new_v4()));
        let options = Options {
            name: "mine".to_owned(),
            kind: Kind::Model,
            dir: root.join("mine"),
            api: None,
        };
        let written = write(&options, &fake_sources()).expect("write");
        assert_eq!(written.len(), 5);
        assert!(root.join("mine/src/lib.rs").is_file());
        assert!(root.join("mine/.gitignore").is_file());
        let err = write(&options, &fake_sources()).expect_err("not empty");
        assert!(err.contains("not empty"), "{err}");
        fs::create_dir_all(root.join("empty")).expect("mkdir");
        let options = Options {
            dir: root.join("empty"),
            ..options
        };
        write(&options, &fake_sources()).expect("an empty directory is fine");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn finds_the_plugin_api_it_was_built_from_or_the_one_given() {
        let built = sources(None).expect("the source tree is here");
        assert!(built.api.ends_with("plugin-api"), "{built:?}");
        assert!(built.conformance.ends_with("conformance"), "{built:?}");
        assert_eq!(built.api_version, llm_host_plugin_api::API_VERSION);
        // The checkout itself will do too.
        let checkout = built.api.parent().expect("a parent").to_path_buf();
        assert_eq!(sources(Some(&checkout)), Ok(built.clone()));
        assert_eq!(sources(Some(&built.api)), Ok(built));
        let err = sources(Some(Path::new("/surely/not/here"))).expect_err("no plugin-api");
        assert!(err.contains("--api /surely/not/here"), "{err}");
    }

    #[test]
    fn minor_versions() {
        assert_eq!(minor("0.1.1"), "0.1");
        assert_eq!(minor("0.12.0-rc.1"), "0.12");
        assert_eq!(minor("1"), "1");
    }
}
