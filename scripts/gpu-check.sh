#!/usr/bin/env bash
# scripts/gpu-check.sh: check and time the generated PTX on an NVIDIA GPU.
#
# For a machine with an NVIDIA GPU, its CUDA driver, a Rust toolchain and
# python3 with torch; no network needed (the crates must already be in
# cargo's cache, or vendored). At most 8 minutes. Steps:
#   1. build with `--features cuda` (release);
#   2. every fixture through the CUDA backend against the golden outputs
#      (`cargo test -p ouroc-runtime --features cuda --test cuda` with
#      OUROC_REQUIRE_CUDA=1: prefill and decode, f32 and bf16, every exit
#      policy, early exit, the tensor-core GEMM path), and, when the CLI
#      has it, `ouroc logits --backend cuda` on every fixture;
#   3. the kernels' own checks against the CPU reference (every kernel
#      family on the PTX emulator, codegen/tests/ptx_kernels.rs, and the
#      whole-model emulator tests, runtime/tests/gpu_emu.rs);
#   4. the device ceilings, measured with torch: a device-to-device copy
#      (GB/s) and a large bf16 matmul (TFLOP/s);
#   5. prefill (128 tokens) and decode (64 tokens) on the Ouro-1.4B shape
#      with random bf16 weights, end to end and per kernel, with GB/s or
#      TFLOP/s and the fraction of the ceiling
#      (runtime/examples/gpu_bench.rs), written to
#      target/gpu-check/report.md (`--record`: also appended to
#      BENCHMARKS.md).
#
# Without a GPU (no nvidia-smi, or `--dry-run`) only the CPU parts run:
# the build, the CUDA tests' missing-driver check, step 3; it says so.
#
# Usage: scripts/gpu-check.sh [--dry-run] [--record]
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
RECORD=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --record) RECORD=1 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

START=$(date +%s)
OUT=target/gpu-check
mkdir -p "$OUT"
step() { echo; echo "== [$(( $(date +%s) - START ))s] $*"; }
# Each step gets a share of the 8 minutes; a step that overruns fails the script.
limit() { local s=$1; shift; timeout --foreground "$s" "$@"; }

if [ "$DRY" = 0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu-check: nvidia-smi not found: no NVIDIA GPU here, so this is a dry run of the CPU parts"
    DRY=1
fi
if [ "$DRY" = 0 ] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: nvidia-smi sees no GPU: dry run of the CPU parts"
    DRY=1
fi
export CARGO_NET_OFFLINE=true
# Release on the GPU machine (fast emulator tests, honest timings); a dry
# run uses the test profile, so it reuses the builds a developer has.
if [ "$DRY" = 0 ]; then P=(--release); BIN=target/release; else P=(); BIN=target/debug; fi

if [ "$DRY" = 0 ]; then
    step "device"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
fi

step "1. build with --features cuda ${P[*]:-(test profile)}"
limit 240 cargo build "${P[@]}" -p ouroc-runtime --features cuda --all-targets
CLI_CUDA=0
if grep -q '^cuda *=' Cargo.toml 2>/dev/null; then
    limit 180 cargo build "${P[@]}" --features cuda --bin ouroc
    if "$BIN/ouroc" logits --help 2>/dev/null | grep -q cuda; then CLI_CUDA=1; fi
fi

if [ "$DRY" = 0 ]; then
    step "2. every fixture through the CUDA backend against golden"
    OUROC_REQUIRE_CUDA=1 limit 120 cargo test "${P[@]}" -p ouroc-runtime --features cuda --test cuda -- --nocapture
    if [ "$CLI_CUDA" = 1 ]; then
        for f in mha-r4 gqa-hd tied r1 sharded f16; do
            ids=$(python3 -c "
import json, struct
b = open('tests/fixtures/golden/$f.safetensors', 'rb').read()
n = struct.unpack('<Q', b[:8])[0]; h = json.loads(b[8:8 + n]); t = h['prompt_ids']
s, e = t['data_offsets']; d = b[8 + n + s:8 + n + e]
print(','.join(str(x) for x in struct.unpack('<%di' % (len(d) // 4), d)))")
            limit 30 "$BIN/ouroc" logits "tests/fixtures/$f" --ids "$ids" --backend cuda \
                --out "$OUT/$f.safetensors" >"$OUT/$f.txt"
            echo "ouroc logits --backend cuda $f: ok ($(tail -1 "$OUT/$f.txt"))"
        done
    else
        echo "(the CLI has no \`logits --backend cuda\` yet: the fixtures ran through the cuda test above)"
    fi
else
    step "2. (dry run) the CUDA tests without a GPU: the missing-driver error, no panic"
    limit 120 cargo test "${P[@]}" -p ouroc-runtime --features cuda --test cuda
fi

step "3. the kernels' checks against the CPU reference (PTX emulator)"
limit 150 cargo test "${P[@]}" -p ouroc-codegen --test ptx_kernels
limit 150 cargo test "${P[@]}" -p ouroc-runtime --features cuda --test gpu_emu

if [ "$DRY" = 1 ]; then
    step "4-5. (dry run) skipped: ceilings and the 1.4B timing need a GPU"
    echo "gpu-check: dry run done in $(( $(date +%s) - START ))s (GPU numbers pending)"
    exit 0
fi

step "4. device ceilings (torch)"
CEIL=$(limit 90 python3 - <<'EOF'
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
)
read -r COPY_GBS MM_TFLOPS <<<"$CEIL"
echo "device copy: $COPY_GBS GB/s (read + write); bf16 matmul 8192^3: $MM_TFLOPS TFLOP/s"

step "5. Ouro-1.4B shape, bf16 random weights: prefill 128, decode 64"
REMAIN=$(( 480 - ($(date +%s) - START) ))
[ "$REMAIN" -gt 30 ] || { echo "gpu-check: no time left for the benchmark" >&2; exit 1; }
limit "$REMAIN" "$BIN/examples/gpu_bench" --shape 1.4b --prefill 128 --decode 64 --runs 3 \
    --copy-gbs "$COPY_GBS" --mm-tflops "$MM_TFLOPS" --markdown "$OUT/report.md"
if [ "$RECORD" = 1 ]; then
    { echo; echo "<!-- scripts/gpu-check.sh, $(date -u +%Y-%m-%d) -->"; cat "$OUT/report.md"; } >>BENCHMARKS.md
    echo "appended $OUT/report.md to BENCHMARKS.md"
fi
echo
echo "gpu-check: done in $(( $(date +%s) - START ))s; report in $OUT/report.md"
