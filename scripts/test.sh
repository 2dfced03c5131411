#!/usr/bin/env bash
# The test suite: fast CPU tests (tiny Swins, small generated data). GPU tests are marked `gpu` and
# skip themselves without CUDA. Extra args go to pytest (e.g. -k lora, -m gpu). The tests run in
# ORCA_TEST_WORKERS pytest-xdist processes (default 2, one per core of the CI machine; 0 runs them in
# this process, in order); the GPU tests share one worker.
ORCA_ENV=dev source "$(dirname "$0")/_env.sh"
set +e
"$PY" -m pytest -q -n "${ORCA_TEST_WORKERS:-2}" --dist loadgroup "$@"
rc=$?
# pytest exits 5 when it collected no test: that must fail, never pass silently.
[ $rc -eq 5 ] && echo "pytest collected no tests" >&2
exit $rc
