#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with what the GPU machine lacks: it has Python 3.12 and
# torch 2.11 but no package index. Run here, before each device run, since the
# project's own wheel is built from the working tree.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
rm -f .whl/fuseport-*.whl
python3 -m pip wheel -q --no-deps -w .whl .
# BASE=<commit>: that commit's wheel too, in .whl/base/, for `gpu_check.sh ab` (the same rows
# against both, alternating on one machine: the only comparison these machines allow).
rm -rf .whl/base
if [[ -n ${BASE:-} ]]; then
    tree=$(mktemp -d)
    git worktree add -q --detach "$tree" "$BASE"
    python3 -m pip wheel -q --no-deps -w .whl/base "$tree"
    git worktree remove --force "$tree"
fi
for req in grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
    prometheus-client==0.26.0 crc32c==2.9.post0 uvloop==0.23.0 \
    pytest==9.2.0 pluggy iniconfig hypothesis==6.170.17 sortedcontainers attrs \
    py-spy==0.4.3 perf-analyzer==2.60.0; do  # py-spy: scripts/profile_shm_client.py; perf-analyzer: gpu_check.sh perf
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_38_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$req"
done
ls .whl
