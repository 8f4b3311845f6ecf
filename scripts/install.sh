#!/usr/bin/env bash
# Assembles an installation of llm-host from a release build:
#
#   DEST/bin/llm-host, DEST/bin/llm-host-check
#   DEST/plugins/lib*.so      the shipped plugins, and nothing else
#   DEST/config.toml          the shipped config, reading DEST/plugins (kept if present)
#
# usage: scripts/install.sh [--from DIR] [--with-llama] [DEST]   (DEST defaults to dist)
#   --from DIR     take the binaries from DIR (a cargo output directory such as
#                  target/debug) instead of building in release mode
#   --with-llama   also build and install the llama plugin (needs cmake and clang)
#
# Plugins are copied with mode 0644 and the binaries with 0755: the host refuses a
# library that its group or others may write.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
from=""
llama=false
dest="dist"
while [ $# -gt 0 ]; do
    case "$1" in
        --from) from="$2"; shift 2 ;;
        --with-llama) llama=true; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; exit 2 ;;
        *) dest="$1"; shift ;;
    esac
done
plugins=(echo memory sqlite redis postgres openai anthropic ollama)
if [ -z "$from" ]; then
    (cd "$root" && cargo build --release)
    if $llama; then
        (cd "$root" && cargo build --release -p llm-plugin-llama)
    fi
    from="${CARGO_TARGET_DIR:-$root/target}/release"
fi
if $llama; then
    plugins+=(llama)
fi
mkdir -p "$dest/bin" "$dest/plugins"
install -m 0755 "$from/llm-host" "$from/llm-host-check" "$dest/bin/"
for plugin in "${plugins[@]}"; do
    install -m 0644 "$from/libllm_plugin_$plugin.so" "$dest/plugins/"
done
if [ ! -e "$dest/config.toml" ]; then
    sed 's|^dir = "[^"]*"|dir = "plugins"        |' "$root/config.toml" > "$dest/config.toml"
fi
echo "installed in $dest: start it with $dest/bin/llm-host --config $dest/config.toml"
