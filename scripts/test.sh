#!/usr/bin/env bash
# Installs the test requirements and runs the test suite (README Quick start, command 2).
. "$(dirname "$0")/_setup.sh" requirements-test.txt
exec .venv/bin/python -m pytest -q tests "$@"
