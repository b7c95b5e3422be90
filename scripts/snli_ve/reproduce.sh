#!/usr/bin/env bash
# Reproduce the paper's snli_ve tables: scripts/reproduce.py --task snli_ve with the arguments given.
#
#   scripts/snli_ve/reproduce.sh --data DIR --out DIR [--ofa-checkpoint CKPT] [--ngpu N] [fairseq-train options...]
#   scripts/snli_ve/reproduce.sh --synthetic --data DIR --out DIR [--tiny]
#
# See scripts/reproduce.py --help. PYTHON: the interpreter with mue and fairseq installed (default: the
# repository's .venv, else python on PATH).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    [[ -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"
fi
exec "$PYTHON" "$ROOT/scripts/reproduce.py" --task snli_ve "$@"
