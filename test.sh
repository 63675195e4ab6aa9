#!/bin/sh
# The test command: set up what running and testing need (idempotent), lint, then every
# test, mounts included.  ROFS_REQUIRE_FUSE=1 turns a missing FUSE prerequisite into a
# failure, not a skip.
set -eu
cd "$(dirname "$0")"
./setup.sh --test
.venv/bin/ruff check rofs tests benchmarks
ROFS_REQUIRE_FUSE=1 exec .venv/bin/python -m pytest "$@"
