#!/usr/bin/env bash
# Installs the test requirements and runs the test suite (README Quick start, command 2).
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast tier.
. "$(dirname "$0")/_setup.sh" requirements-test.txt
exec .venv/bin/python -m pytest -q --durations=25 tests "$@"
