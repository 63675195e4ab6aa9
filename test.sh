#!/bin/sh
# The test command: set up what running and testing need (idempotent), lint, then every
# test, mounts included.  ROFS_REQUIRE_FUSE=1 turns a missing FUSE prerequisite into a
# failure, not a skip.
set -eu
cd "$(dirname "$0")"
./setup.sh --test
.venv/bin/ruff check rofs tests benchmarks
# -n auto: one worker per CPU (the tests wait on mounts and processes far more than on
# the CPU); `./test.sh -n 0` runs them one at a time.
ROFS_REQUIRE_FUSE=1 exec .venv/bin/python -m pytest -n auto "$@"
