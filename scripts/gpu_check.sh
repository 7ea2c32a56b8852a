#!/usr/bin/env bash
# On the GPU machine: the `gpu` tests, then `fuseport bench` on CUDA.
# Prepare here with scripts/gpu_prepare.sh; run there with `.whl` carried, e.g.
#   device run --carry .whl -- bash scripts/gpu_check.sh          # both
#   device run --carry .whl -- bash scripts/gpu_check.sh tests    # or one part per call,
#   device run --carry .whl -- bash scripts/gpu_check.sh bench    # each well inside 10 minutes
#   device run --carry .whl -- bash scripts/gpu_check.sh procs    # concurrency, 1 vs 2 serving processes
#   device run --carry .whl -- bash scripts/gpu_check.sh gpus2    # 2 GPUs vs 1 (needs a 2-GPU machine)
#   device run --carry .whl -- bash scripts/gpu_check.sh probe    # echo floor matrix + per-stage server costs
#   device run --carry .whl -- bash scripts/gpu_check.sh perf     # Triton's perf_analyzer (KServe) + the echo
#   device run --carry .whl -- bash scripts/gpu_check.sh hot      # a small call: device part, stages, bench rows (~3 min)
#   device run --carry .whl -- bash scripts/gpu_check.sh staging  # --cuda-staging-bytes off vs on, in process (~3 min)
#   device run --carry .whl -- bash scripts/gpu_check.sh isolation  # other callers' calls while one runs ~20 s (issue 20)
#   device run --carry .whl -- bash scripts/gpu_check.sh batch    # 16 and 64 client processes, batching off vs on (issue 24)
#   device run --carry .whl -- bash scripts/gpu_check.sh mps      # the concurrency section under CUDA MPS, 1 and 4 processes
#   device run --carry .whl -- bash scripts/gpu_check.sh ab       # call_stages, BASE's wheel vs this tree's, alternating (~5 min)
#   device run --carry .whl -- bash scripts/gpu_check.sh poll     # call_stages + bench rows, --busy-poll-us 0 vs default (~8 min; POLL_ROUNDS=1: ~4)
#   ... POLL_SETTING=BUSY_POLL_GPU_US POLL_VALUES="0 200" POLL_BENCH=0 gpu_check.sh poll   # the poll's keep-warm kernel off/on
#   device run --carry .whl -- bash scripts/gpu_check.sh shm      # shared memory 16/256 MiB vs the echo, regions page-locked or not
#   ... gpu_check.sh tests tests/test_ops.py                      # some test files only
# Logs, JSON and the plot land in $OUT (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PART=${1:-all}
shift || true
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
# The tests import fuseport from the wheel, not from this tree.
REPO=$PWD
cd /tmp
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, grpc; print("torch", torch.__version__, "grpc", grpc.__version__)' | tee -a "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
rc=0
if [[ $PART == all || $PART == tests ]]; then
    # By default only the files that hold `gpu` tests: the others import test-only
    # packages this machine lacks (cryptography, kubernetes-validate) just to be collected.
    default=$(cd "$REPO" && grep -l 'mark.gpu' tests/test_*.py)
    # shellcheck disable=SC2206
    paths=(${@:-$default})
    python3 -m pytest -m gpu -q -p no:cacheprovider --durations=10 --rootdir "$REPO" "${paths[@]/#/$REPO/}" 2>&1 \
        | tee "$OUT/gpu-tests.log"
    rc=${PIPESTATUS[0]}
fi
if [[ $PART == all || $PART == bench ]]; then
    python3 -m fuseport.cli bench --device cuda ${BENCH_ARGS:-} --json "$OUT/bench-cuda.json" \
        --plot "$OUT/bench-cuda.png" 2>&1 | tee "$OUT/bench-cuda.log"
    rc=$(( rc || PIPESTATUS[0] ))
fi
if [[ $PART == procs ]]; then
    # Serving processes (--processes): the concurrency section against 1, 2, 4 and 8 ($PROCS)
    # processes on one GPU, each beside the same raw echo, in one run.
    python3 -m fuseport.cli bench --device cuda --sections concurrency --processes ${PROCS:-1,2,4,8} ${BENCH_ARGS:-} \
        --json "$OUT/bench-procs.json" --no-plot 2>&1 | tee "$OUT/bench-procs.log"
    rc=$(( rc || PIPESTATUS[0] ))
fi
if [[ $PART == all || $PART == probe ]]; then
    # Where a small call's time goes: the transport floor's variants (why a bench's
    # echo can be slower than a plain one) and the server's stages in process.
    python3 "$REPO/scripts/echo_floor_probe.py" ${PROBE_ARGS:-} 2>&1 | tee "$OUT/echo-floor-probe.log"
    rc=$(( rc || PIPESTATUS[0] ))
    python3 "$REPO/scripts/profile_small.py" cuda 2>&1 | tee "$OUT/profile-small-cuda.log"
    rc=$(( rc || PIPESTATUS[0] ))
    # A small call end to end beside the echo, with each process's CPU per call,
    # on the default event loop (uvloop) and on asyncio's own.
    for loop in uvloop asyncio; do
        python3 "$REPO/scripts/call_stages.py" --device cuda --n "${STAGES_N:-3000}" --server-flags "EVENT_LOOP=$loop" \
            2>&1 | tee "$OUT/call-stages-cuda-$loop.log"
        rc=$(( rc || PIPESTATUS[0] ))
    done
fi
if [[ $PART == hot ]]; then
    # The small-call path (issue 19) in one call of a few minutes: a 1 KiB call's device
    # part alone by how the GPU idled, then end to end by stage beside the echo (server
    # CPU by thread), then the bench's transport and resident rows at 1 KiB.
    python3 "$REPO/scripts/cuda_small_call.py" --n 2000 2>&1 | tee "$OUT/cuda-small-call.log"
    rc=$(( rc || PIPESTATUS[0] ))
    python3 "$REPO/scripts/call_stages.py" --device cuda --n "${STAGES_N:-3000}" 2>&1 | tee "$OUT/call-stages-cuda.log"
    rc=$(( rc || PIPESTATUS[0] ))
    python3 -m fuseport.cli bench --device cuda --sections transport,resident --sizes 1K ${BENCH_ARGS:-} \
        --json "$OUT/bench-hot.json" --no-plot 2>&1 | tee "$OUT/bench-hot.log"
    rc=$(( rc || PIPESTATUS[0] ))
fi
if [[ $PART == staging ]]; then
    # --cuda-staging-bytes off and on, in process (no gRPC, so no server instance's noise:
    # end to end, three fresh servers differed more than the change), alternating. The
    # first run compiles (about a minute on a fresh machine); the others load from
    # Inductor's cache.
    for staging in 0 1048576 0 1048576; do
        echo "== FUSEPORT_CUDA_STAGING_BYTES=$staging" | tee -a "$OUT/profile-small-staging.log"
        FUSEPORT_CUDA_STAGING_BYTES=$staging timeout 240 python3 "$REPO/scripts/profile_small.py" cuda 2>&1 \
            | sed -n 1,14p | tee -a "$OUT/profile-small-staging.log"
        rc=$(( rc || PIPESTATUS[0] ))
    done
fi
if [[ $PART == isolation ]]; then
    # Issue 20 on the device: another token's small calls and health while one token's
    # call holds the GPU for ~20 s (the heavy kernel is sized on this device).
    python3 "$REPO/scripts/isolation_p99.py" --device cuda --seconds "${ISOLATION_SECONDS:-20}" --n 1000 2>&1 \
        | tee "$OUT/isolation-cuda.log"
    rc=$(( rc || PIPESTATUS[0] ))
fi
if [[ $PART == batch ]]; then
    # Issue 24: the same small kernel from 16 and 64 client processes, batched and not
    # (per call, on one server per window of $BATCH_WINDOWS), and a kernel that is not
    # batchable. Each round is logged as it ends: a run cut short still tells something.
    # Give it about 300 s for 16,64: on the H100 the server's start and the batched graph's
    # compile took 105 s before the first round, and two runs cut at 170-200 s printed no summary.
    for w in ${BATCH_WINDOWS:-200}; do
        python3 "$REPO/scripts/batch_bench.py" --device cuda --clients "${BATCH_CLIENTS:-16,64}" --window-us "$w" \
            --json "$OUT/batch-cuda-$w.json" 2>&1 | tee "$OUT/batch-cuda-$w.log"
        rc=$(( rc || PIPESTATUS[0] ))
    done
fi
if [[ $PART == ab ]]; then
    # The small call's stages (call_stages.py) with the base wheel (BASE=<commit> for
    # gpu_prepare.sh) and this tree's, alternating on this one machine: a change's effect
    # end to end, which separate machines (their echo differs 2x) cannot show.
    if ! compgen -G "$REPO/.whl/base/*.whl" >/dev/null; then
        echo "gpu_check.sh ab: no base wheel: run BASE=<commit> scripts/gpu_prepare.sh first" | tee "$OUT/ab.log" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-base \
        "$REPO"/.whl/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-base \
        "$REPO"/.whl/base/*.whl || exit 1
    for round in 1 2; do
        for side in base this; do
            site=/tmp/site; [[ $side == base ]] && site=/tmp/site-base
            echo "== round $round, $side $(date -u +%T)" | tee -a "$OUT/ab.log"
            PYTHONPATH=$site python3 "$REPO/scripts/call_stages.py" --device cuda --n "${STAGES_N:-1000}" 2>&1 \
                | grep -v INFO | tee -a "$OUT/ab.log"
            rc=$(( rc || PIPESTATUS[0] ))
        done
    done
fi
if [[ $PART == poll ]]; then
    # The serving loop's busy poll (--busy-poll-us, server/rpc/poll.py) off and at its
    # default, alternating, one server each: the small call's stages beside the echo,
    # then the bench's transport rows at 1 KiB. Each row is logged as it ends.
    # POLL_SETTING/POLL_VALUES compare another setting the same way, e.g. the poll's
    # keep-warm kernel: POLL_SETTING=BUSY_POLL_GPU_US POLL_VALUES="0 200" (POLL_BENCH=0:
    # the call_stages rows only).
    setting=${POLL_SETTING:-BUSY_POLL_US}
    for round in $(seq "${POLL_ROUNDS:-2}"); do
        for us in ${POLL_VALUES:-0 default}; do
            echo "== round $round, call_stages, FUSEPORT_$setting=$us $(date -u +%T)" | tee -a "$OUT/poll.log"
            env=(); [[ $us != default ]] && env=(--server-env "FUSEPORT_$setting=$us")
            python3 "$REPO/scripts/call_stages.py" --device cuda --n "${STAGES_N:-1000}" "${env[@]}" 2>&1 \
                | grep -v INFO | tee -a "$OUT/poll.log"
            rc=$(( rc || PIPESTATUS[0] ))
        done
        [[ ${POLL_BENCH:-1} == 0 ]] && continue
        for us in ${POLL_VALUES:-0 default}; do
            echo "== round $round, bench, FUSEPORT_$setting=$us $(date -u +%T)" | tee -a "$OUT/poll.log"
            env=(); [[ $us != default ]] && env=(--server-env "FUSEPORT_$setting=$us")
            python3 -m fuseport.cli bench --device cuda --sections transport --sizes 1K "${env[@]}" \
                --json "$OUT/bench-poll-$round-$us.json" --no-plot 2>&1 | grep -v INFO | tee -a "$OUT/poll.log"
            rc=$(( rc || PIPESTATUS[0] ))
        done
    done
fi
if [[ $PART == shm ]]; then
    # Shared memory against the unary echo, with the regions page-locked (the default) and
    # not (FUSEPORT_SHARED_MEMORY_PAGE_LOCK_BYTES=0), two servers timed in the same rounds;
    # also from a CUDA tensor, results in host memory and on the GPU (results_on="cuda").
    for mib in ${SHM_MIB:-16 256}; do
        rounds=30; (( mib > 64 )) && rounds=8
        python3 "$REPO/scripts/shm_echo_ratio.py" "$mib" "$rounds" --dtype float32 --device cuda \
            --beside FUSEPORT_SHARED_MEMORY_PAGE_LOCK_BYTES=0 2>&1 | grep -v INFO | tee -a "$OUT/shm.log"
        rc=$(( rc || PIPESTATUS[0] ))
    done
fi
if [[ $PART == mps ]]; then
    # Issue 19's 16-client row: 1 process gave 0.54x the echo, 4 processes only 0.61x
    # (H100, 2026-12-07). Without MPS the processes' small kernels and copies take turns
    # on the GPU context by context; under MPS they share one. The same section under an
    # MPS daemon of this run's own (a user-space daemon: the GPU's settings are untouched).
    if ! command -v nvidia-cuda-mps-control >/dev/null; then
        echo "gpu_check.sh mps: no nvidia-cuda-mps-control on this machine: nothing measured" | tee "$OUT/bench-mps.log" >&2
        exit 2
    fi
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/fuseport-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/fuseport-mps/log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d || exit 1
    python3 -m fuseport.cli bench --device cuda --sections concurrency --processes ${PROCS:-1,4} ${BENCH_ARGS:-} \
        --json "$OUT/bench-mps.json" --no-plot 2>&1 | tee "$OUT/bench-mps.log"
    rc=$(( rc || PIPESTATUS[0] ))
    echo quit | nvidia-cuda-mps-control
    cp -r "$CUDA_MPS_LOG_DIRECTORY" "$OUT/mps-log" 2>/dev/null
fi
if [[ $PART == perf ]]; then
    # Triton's perf_analyzer against the KServe endpoint, and the echo at the same
    # caller counts right after (the script prints both side by side).
    export PATH=/tmp/site/bin:$PATH
    python3 "$REPO/scripts/perf_analyzer_run.py" --device cuda 2>&1 | tee "$OUT/perf-analyzer.log"
    rc=$(( rc || PIPESTATUS[0] ))
fi
if [[ $PART == gpus2 ]]; then
    # Independent compute-bound calls on one GPU (one process, cuda:0) against both
    # (--device all: a process per GPU), in one run; the target is >= 1.8x. Compile
    # mode off: the kernel is matmuls, cuBLAS either way, and three compiles would
    # only lengthen the run (about 2 minutes without them).
    gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
    if (( gpus < 2 )); then
        echo "gpu_check.sh gpus2: needs a machine with at least 2 GPUs, this one has $gpus: nothing measured" \
            | tee "$OUT/bench-gpus2.log" >&2
        exit 2
    fi
    python3 -m fuseport.cli bench --device all --sections gpus --server-env FUSEPORT_COMPILE_MODE=off \
        ${BENCH_ARGS:-} --json "$OUT/bench-gpus2.json" --no-plot 2>&1 | tee "$OUT/bench-gpus2.log"
    rc=$(( rc || PIPESTATUS[0] ))
fi
exit "$rc"
