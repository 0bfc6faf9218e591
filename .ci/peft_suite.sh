#!/usr/bin/env bash
# peft's own TestPeftCustomModel against our PEFT types (tests/test_peft_suite.py). It is also part of the default
# `pytest -q` run (about 45 s on one thread); this entry point runs it alone and reports its run time. The sdist of
# the installed peft is fetched from PyPI into .cache/peft-suite/ when absent (first run only).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .ci-venv/bin/activate ]; then . .ci-venv/bin/activate; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import sys; sys.path.insert(0, 'tests'); from peft_suite_source import peft_tests_package as p; print('peft tests:', p())"
start=$(date +%s)
python -m pytest -q -rsx tests/test_peft_suite.py "$@"
echo "peft suite run time: $(( $(date +%s) - start )) s"
