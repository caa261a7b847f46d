#!/usr/bin/env bash
# The GPU check's runner: copied as run.sh into the package that
# `scripts/gpu-check.sh --package DIR` builds, and run there on the GPU
# machine (`scripts/gpu-check.sh --from DIR`, or `bash DIR/run.sh`).
#
# The GPU machines have an NVIDIA driver, python3 with torch and the CUDA
# tools, but no Rust toolchain and no network: this script runs only the
# package's own executables (bin/), bash, coreutils, python3 and the NVIDIA
# tools (nvidia-smi, compute-sanitizer). It builds nothing and fetches
# nothing; the PTX is JIT-compiled by the driver.
#
# Steps, each under its own time limit, all within 8 minutes:
#   device     nvidia-smi: GPU, compute capability, driver
#   ptx        the PTX target of ouroc's modules (.version / .target)
#   cuda-tests every fixture through CUDA against the golden outputs (f32,
#              bf16, every exit policy, early exit, every KV mode, GEMM)
#   logits     `ouroc logits --backend cuda` on every fixture, prefill and
#              decode, against the golden logits and exit steps
#   ceilings   device copy GB/s and bf16 matmul TFLOP/s (torch)
#   bench      prefill 128 / decode 64 on the Ouro-1.4B shape, random bf16
#              weights written here, end to end and per kernel: dense (3 runs),
#              then --weights q8 and q4 (quantised at load, 1 run each)
#   memcheck   one fixture under compute-sanitizer --tool memcheck
#   emu-tests  the whole-model PTX emulator tests (CPU only; when time is left)
# Without a GPU (no nvidia-smi, or it lists none) every step runs its CPU
# part (the missing-driver errors, the fixtures on the PTX emulator) or
# says "no GPU"; the run then exits 0 when those parts pass.
#
# The report lands in one folder (default DIR/report): report.md, the
# device and ceilings files, bench.md, one log per step (each cut to its
# last 256 KiB). Exit status 1 when a step failed or timed out.
#
# Usage: run.sh [--report DIR] [--no-gpu]

# The step functions run by name, each under `timeout` in its own bash.
# shellcheck disable=SC2329
set -uo pipefail

PKG=$(cd "$(dirname "$0")" && pwd)
REPORT=$PKG/report
FORCE_DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --report) REPORT=${2:?--report needs a folder}; shift 2 ;;
        --no-gpu) FORCE_DRY=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$REPORT/logs" || exit 2
REPORT=$(cd "$REPORT" && pwd)
# A rerun into the same folder starts afresh (only the files a run writes).
rm -f "$REPORT"/logs/*.log "$REPORT"/logs/*.note "$REPORT"/steps.tsv "$REPORT"/report.md "$REPORT"/bench.md \
    "$REPORT"/ceilings.txt "$REPORT"/device.csv
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/ouroc-gpu-check.XXXXXX") || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
# The 1.4B checkpoint (about 2.9 GB) outside the report, kept for a rerun.
SHAPES=${OUROC_SHAPES:-${TMPDIR:-/tmp}/ouroc-shapes}
# The NVIDIA tools where a CUDA install puts them, when not on PATH.
PATH=$PATH:/usr/local/cuda/bin
export PKG REPORT SCRATCH SHAPES PATH
export OUROC_FIXTURES=$PKG/fixtures
# 8 minutes in all: the steps share 460 s, leaving room for a killed step's grace period.
BUDGET=460
START=$SECONDS

GPU=1 WHY=""
if [ "$FORCE_DRY" = 1 ]; then
    GPU=0 WHY="--no-gpu given"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
    GPU=0 WHY="nvidia-smi not found"
elif ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    GPU=0 WHY="nvidia-smi lists no GPU"
fi
export GPU
if [ "$GPU" = 1 ]; then
    echo "run.sh: GPU mode"
else
    echo "run.sh: no GPU ($WHY): every step runs its CPU part or says no GPU"
fi
for f in "$PKG"/bin/*; do [ -x "$f" ] || chmod +x "$f" 2>/dev/null || true; done

# note TEXT: the step's one-line summary in report.md.
note() { echo "$*" >"$NOTE"; echo "note: $*"; }
# The fixtures with a golden file.
fixtures() { for g in "$PKG"/fixtures/golden/*.safetensors; do
    f=$(basename "$g" .safetensors); [ -d "$PKG/fixtures/$f" ] && echo "$f"; done; }
export -f note fixtures

step_device() {
    echo "tools:"
    for t in nvidia-smi compute-sanitizer ncu cuobjdump python3; do
        printf '  %-18s %s\n' "$t" "$(command -v "$t" || echo 'not found')"
    done
    python3 -c 'import torch; print("  torch", torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null \
        || echo "  torch              not importable"
    if [ "$GPU" = 0 ]; then note "no GPU"; return 0; fi
    nvidia-smi || return 1
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv >"$REPORT/device.csv" || return 1
    cat "$REPORT/device.csv"
    local cuda
    cuda=$(nvidia-smi | grep -o 'CUDA Version: [0-9.]*' | head -1)
    note "$(sed -n 2p "$REPORT/device.csv" | cut -d, -f1-3 | sed 's/, */, /g')${cuda:+, $cuda}"
}

step_ptx() {
    "$PKG/bin/ouroc" emit ptx "$PKG/fixtures/mha-r4" >"$SCRATCH/mha-r4.ptx" || return 1
    local v t cc
    v=$(grep -m1 '^\.version' "$SCRATCH/mha-r4.ptx" | awk '{print $2}')
    t=$(grep -m1 '^\.target' "$SCRATCH/mha-r4.ptx" | awk '{print $2}')
    [ -n "$v" ] && [ -n "$t" ] || { echo "no .version / .target line in the module"; return 1; }
    echo "$(grep -c '^\.visible \.entry\|^\.entry' "$SCRATCH/mha-r4.ptx") entries; .version $v; .target $t"
    if [ "$GPU" = 0 ]; then
        note "PTX ISA $v, .target $t (no GPU: not JIT-compiled here)"
        return 0
    fi
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')
    note "PTX ISA $v, .target $t, JIT-compiled by the driver for sm_${cc/./} (compute capability $cc)"
}

step_cuda_tests() {
    if [ "$GPU" = 1 ]; then
        OUROC_REQUIRE_CUDA=1 "$PKG/bin/cuda-tests" --nocapture 2>&1 | tee "$SCRATCH/cuda-tests.out" || return 1
        note "every fixture on CUDA against golden (f32, bf16, every policy, early exit, every KV mode," \
            "GEMM): $(grep -m1 -o 'test result: [^.]*' "$SCRATCH/cuda-tests.out")"
    else
        "$PKG/bin/cuda-tests" --nocapture 2>&1 | tee "$SCRATCH/cuda-tests.out" || return 1
        grep -q 'skipping the GPU checks: no CUDA' "$SCRATCH/cuda-tests.out" || {
            echo "the tests did not report the missing driver"; return 1; }
        note "no GPU: the missing-driver error checked ($(grep -m1 -o 'test result: [^.]*' "$SCRATCH/cuda-tests.out"))"
    fi
}

step_logits() {
    local backend=cuda fails=0 n=0 f ids pol mode out
    [ "$GPU" = 1 ] || backend=ptx-emu
    for f in $(fixtures); do
        read -r ids pol <<<"$(python3 "$PKG/compare.py" prompt "$PKG/fixtures/golden/$f.safetensors")"
        [ -n "$pol" ] || { echo "$f: no prompt in the golden file"; return 1; }
        for mode in prefill decode; do
            out=$SCRATCH/$f-$mode.safetensors
            printf '%s %s %s %s: ' "$backend" "$f" "$pol" "$mode"
            if "$PKG/bin/ouroc" logits "$PKG/fixtures/$f" --ids "$ids" --exit "$pol" --precision f32 \
                --mode "$mode" --backend "$backend" --out "$out" >"$SCRATCH/logits.out" 2>&1 &&
                python3 "$PKG/compare.py" check "$PKG/fixtures/golden/$f.safetensors" "$out" f32 "$pol"; then
                n=$((n + 1))
            else
                echo "FAILED"; cat "$SCRATCH/logits.out"; fails=$((fails + 1))
            fi
        done
    done
    if [ "$GPU" = 0 ]; then
        # The CUDA backend without a driver: a clear error, no panic.
        if "$PKG/bin/ouroc" logits "$PKG/fixtures/mha-r4" --ids 1,2,3 --backend cuda >"$SCRATCH/nocuda.out" 2>&1; then
            echo "ouroc logits --backend cuda succeeded without a GPU"; fails=$((fails + 1))
        elif grep -q 'no CUDA driver found\|no CUDA device' "$SCRATCH/nocuda.out" &&
            ! grep -q panicked "$SCRATCH/nocuda.out"; then
            echo "--backend cuda without a GPU: $(head -1 "$SCRATCH/nocuda.out")"
        else
            echo "--backend cuda without a GPU: unexpected error:"; cat "$SCRATCH/nocuda.out"; fails=$((fails + 1))
        fi
    fi
    [ "$fails" = 0 ] || return 1
    if [ "$GPU" = 1 ]; then
        note "ouroc logits --backend cuda: $n runs (every fixture, prefill and decode) match golden"
    else
        note "no GPU: $n runs on --backend ptx-emu match golden; --backend cuda gives the no-driver error"
    fi
}

step_ceilings() {
    if [ "$GPU" = 0 ]; then note "no GPU"; return 0; fi
    python3 - >"$REPORT/ceilings.txt" <<'EOF' || return 1
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
dev = torch.device("cuda")
def timed(fn, reps):
    fn(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        a.record()
        for _ in range(reps):
            fn()
        b.record(); torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3 / reps)
    return best
n = 1 << 30  # 1 GiB copied: read + write
x = torch.empty(n, dtype=torch.uint8, device=dev); y = torch.empty_like(x)
t = timed(lambda: y.copy_(x), 20)
gbs = 2 * n / t / 1e9
m = 8192
a = torch.randn(m, m, device=dev, dtype=torch.bfloat16); b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
t = timed(lambda: a @ b, 20)
tfs = 2 * m ** 3 / t / 1e12
print(f"{gbs:.1f} {tfs:.1f}")
EOF
    local gbs tfs
    read -r gbs tfs <"$REPORT/ceilings.txt"
    note "device copy $gbs GB/s (read + write), bf16 matmul 8192^3 $tfs TFLOP/s (torch)"
}

step_bench() {
    if [ "$GPU" = 0 ]; then
        # The CPU part: the 1.4B shape compiles to PTX; the benchmark stops
        # on the missing driver before writing any weights.
        "$PKG/bin/ouroc" emit ptx --shape 1.4b --precision bf16 >"$SCRATCH/1.4b.ptx" || return 1
        echo "1.4b bf16 PTX: $(wc -c <"$SCRATCH/1.4b.ptx") bytes"
        if "$PKG/bin/gpu_bench" --shape 1.4b --dir "$SCRATCH/1.4b" >"$SCRATCH/bench.out" 2>&1; then
            echo "gpu_bench succeeded without a GPU"; return 1
        fi
        cat "$SCRATCH/bench.out"
        grep -q 'no CUDA driver found\|no CUDA device' "$SCRATCH/bench.out" || return 1
        # The quantised timings' flags parse, and stop on the driver too.
        if "$PKG/bin/gpu_bench" --shape 1.4b --dir "$SCRATCH/1.4b" --weights q4 >"$SCRATCH/bench-q4.out" 2>&1; then
            echo "gpu_bench --weights q4 succeeded without a GPU"; return 1
        fi
        cat "$SCRATCH/bench-q4.out"
        grep -q 'no CUDA driver found\|no CUDA device' "$SCRATCH/bench-q4.out" || return 1
        [ ! -e "$SCRATCH/1.4b" ] || { echo "gpu_bench wrote weights without a GPU"; return 1; }
        note "no GPU: the 1.4B shape compiles to PTX; gpu_bench (dense, --weights q4) stops on the missing driver"
        return 0
    fi
    local ceil=() free
    if [ -s "$REPORT/ceilings.txt" ]; then
        read -r gbs tfs <"$REPORT/ceilings.txt"
        ceil=(--copy-gbs "$gbs" --mm-tflops "$tfs")
    fi
    mkdir -p "$SHAPES" || return 1
    free=$(df -Pk "$SHAPES" | awk 'NR==2 {print $4}')
    if [ ! -e "$SHAPES/1.4b/config.json" ] && [ "$free" -lt 4000000 ]; then
        echo "only $((free / 1024)) MiB free in $SHAPES: the 1.4B weights need about 2.9 GB"; return 1
    fi
    "$PKG/bin/gpu_bench" --shape 1.4b --dir "$SHAPES/1.4b" --prefill 128 --decode 64 --runs 3 \
        "${ceil[@]}" --markdown "$REPORT/bench.md" || return 1
    # The quantised Linears (--weights q8 / q4: quantised from the same
    # checkpoint at load), one timed run each to stay in the step's time;
    # their tables follow the dense one in bench.md.
    local w notes
    notes="dense: $(grep -m1 '^| prefill' "$REPORT/bench.md" | tr -s ' '); $(grep -m1 '^| decode' "$REPORT/bench.md" | tr -s ' ')"
    for w in q8 q4; do
        "$PKG/bin/gpu_bench" --shape 1.4b --dir "$SHAPES/1.4b" --weights "$w" --prefill 128 --decode 64 \
            --runs 1 "${ceil[@]}" --markdown "$SCRATCH/bench-$w.md" || return 1
        { echo; cat "$SCRATCH/bench-$w.md"; } >>"$REPORT/bench.md"
        notes="$notes; $w: $(grep -m1 '^| prefill' "$SCRATCH/bench-$w.md" | tr -s ' '); $(grep -m1 '^| decode' "$SCRATCH/bench-$w.md" | tr -s ' ')"
    done
    note "$notes"
}

step_memcheck() {
    if [ "$GPU" = 0 ]; then note "no GPU"; return 0; fi
    command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 1; }
    local ids pol gemm
    read -r ids pol <<<"$(python3 "$PKG/compare.py" prompt "$PKG/fixtures/golden/mha-r4.safetensors")"
    [ -n "$pol" ] || { echo "mha-r4: no prompt in the golden file"; return 1; }
    # Decode through the KV cache (f32), then a 40-token bf16 prefill: the tensor-core GEMM path.
    gemm=$(seq -s, 11 7 284)
    compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
        "$PKG/bin/ouroc" logits "$PKG/fixtures/mha-r4" --ids "$ids" --exit "$pol" --mode decode \
        --backend cuda || return 1
    compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
        "$PKG/bin/ouroc" logits "$PKG/fixtures/mha-r4" --ids "$gemm" --precision bf16 \
        --backend cuda || return 1
    note "mha-r4 under compute-sanitizer memcheck (f32 decode, bf16 40-token prefill): no errors"
}

step_emu_tests() {
    "$PKG/bin/gpu_emu-tests" 2>&1 | tee "$SCRATCH/emu.out" || return 1
    note "$(grep -m1 -o 'test result: [^.]*' "$SCRATCH/emu.out") (PTX emulator, CPU)"
}
export -f step_device step_ptx step_cuda_tests step_logits step_ceilings step_bench step_memcheck step_emu_tests

FAILED=0
# run_step NAME LIMIT: step_NAME under `timeout`, within the total budget;
# its output in logs/NAME.log, its line in steps.tsv and report.md.
run_step() {
    local name=$1 limit=$2 left rc=0 t0=$SECONDS status
    left=$((BUDGET - (SECONDS - START)))
    [ "$limit" -le "$left" ] || limit=$left
    export NOTE=$REPORT/logs/$name.note
    echo
    echo "== [$((SECONDS - START))s] $name (limit ${limit}s)"
    if [ "$limit" -lt 20 ]; then
        status=skipped; echo "no time left (of ${BUDGET}s)" >"$NOTE"
    else
        timeout -k 10 "$limit" bash -c "set -o pipefail; step_${name//-/_}" >"$REPORT/logs/$name.log" 2>&1 || rc=$?
        case "$rc" in
            0) status=ok ;;
            124|137) status=TIMEOUT; FAILED=1 ;;
            *) status=FAILED; FAILED=1 ;;
        esac
        if [ "$status" != ok ]; then
            tail -n 40 "$REPORT/logs/$name.log"
            # The summary: how it ended and the log's last line (the error, usually).
            echo "exit status $rc; logs/$name.log ends: $(grep -v '^[[:space:]]*$' "$REPORT/logs/$name.log" |
                tail -n 1 | cut -c1-160 | tr '|' '/')" >"$NOTE"
        fi
        # Logs stay small enough to bring back.
        if [ "$(wc -c <"$REPORT/logs/$name.log")" -gt 262144 ]; then
            tail -c 262144 "$REPORT/logs/$name.log" >"$SCRATCH/cut" && mv "$SCRATCH/cut" "$REPORT/logs/$name.log"
        fi
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$(head -1 "$NOTE" 2>/dev/null)" >>"$REPORT/steps.tsv"
    echo "-> $status in $((SECONDS - t0))s: $(head -1 "$NOTE" 2>/dev/null)"
    write_report
}

write_report() {
    {
        echo "# ouroc GPU check"
        echo
        if [ "$GPU" = 1 ]; then
            echo "Mode: GPU ($(sed -n 2p "$REPORT/device.csv" 2>/dev/null | cut -d, -f1-3))."
        else
            echo "Mode: no GPU ($WHY): the CPU parts only."
        fi
        echo "Host: $(uname -srm), $(nproc) CPUs; date $(date -u '+%Y-%m-%d %H:%M UTC'); $((SECONDS - START)) s."
        echo
        echo "Package:"
        echo
        head -3 "$PKG/MANIFEST" 2>/dev/null | sed 's/^/    /'
        echo
        echo "| step | status | seconds | summary |"
        echo "|---|---|---:|---|"
        awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$REPORT/steps.tsv"
        if [ -s "$REPORT/bench.md" ]; then echo; cat "$REPORT/bench.md"; fi
    } >"$REPORT/report.md"
}

run_step device 20
run_step ptx 30
run_step cuda-tests 150
run_step logits 90
run_step ceilings 60
run_step bench 300
run_step memcheck 90
run_step emu-tests 120

echo
echo "run.sh: done in $((SECONDS - START))s; report in $REPORT/report.md"
column -t -s $'\t' "$REPORT/steps.tsv" 2>/dev/null || cat "$REPORT/steps.tsv"
exit "$FAILED"
