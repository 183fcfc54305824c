#!/usr/bin/env bash
# Set up the project on a fresh machine: a virtual environment with every Python package
# (requirements.txt + requirements-dev.txt) and WordNet 3.0 for nltk (Debian's WordNet
# packages where apt is available, turned into an nltk data folder inside the venv).
# Idempotent; `make setup` runs it when a requirements file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
echo "setup: installing Python packages (torch 2.13.0 CPU build, see requirements.txt)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt

if ! "$VENV/bin/python" scripts/setup_wordnet.py 2>/dev/null; then
    if [ ! -e /usr/share/wordnet/data.noun ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian's wordnet-base and wordnet-sense-index"
        SUDO=""
        [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
        $SUDO apt-get update -qq || true
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            wordnet-base wordnet-sense-index >/dev/null || echo "setup: apt-get could not install WordNet"
    fi
    "$VENV/bin/python" scripts/setup_wordnet.py || \
        echo "setup: WordNet unavailable; terrain's WordNet stages and their tests will be skipped"
fi
echo "setup: done ($VENV)"
