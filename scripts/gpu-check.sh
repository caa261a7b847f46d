#!/usr/bin/env bash
# scripts/gpu-check.sh: check and time the generated PTX on an NVIDIA GPU.
#
# The GPU machines have an NVIDIA driver, python3 with torch and the CUDA
# tools, but no Rust toolchain, no crate registry and no network. So the
# check comes in two halves:
#
#   scripts/gpu-check.sh --package DIR
#       On a machine with Rust (no GPU needed): builds in release with
#       `--features cuda` the `ouroc` binary, the CUDA and PTX-emulator test
#       executables (runtime/tests/cuda.rs, gpu_emu.rs) and the GPU benchmark
#       (runtime/examples/gpu_bench.rs), and copies them, stripped, with the
#       fixtures and golden files they read and the runner (run.sh, from
#       scripts/gpu-runner.sh, and compare.py) into DIR: at most 60 MiB.
#
#   scripts/gpu-check.sh --from DIR [--report R]
#       On the GPU machine, with no cargo: runs DIR/run.sh (bash, python3,
#       torch for the ceilings, compute-sanitizer): every fixture through
#       CUDA against the golden outputs, `ouroc logits --backend cuda`, one
#       fixture under compute-sanitizer memcheck, the device ceilings, and
#       prefill / decode on the Ouro-1.4B shape per kernel. At most 8
#       minutes; the report lands in R (default DIR/report). Without a GPU
#       each step runs its CPU part or says "no GPU".
#
#   scripts/gpu-check.sh --dry-run [DIR]
#       --package DIR (default target/gpu-package), then the package's run
#       from an empty directory with `env -i PATH=/usr/bin:/bin` (no cargo),
#       the source tree hidden where `unshare` allows: what CI runs.
#
#   scripts/gpu-check.sh --record R
#       Appends the benchmark of a report folder R (R/bench.md) to
#       BENCHMARKS.md.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; }
[ $# -ge 1 ] || { usage; exit 2; }
# Paths given relative to the caller's directory.
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MAX_BYTES=$((60 * 1024 * 1024))

package() {
    local dir=$1 json exe
    cd "$ROOT"
    command -v cargo >/dev/null || { echo "gpu-check: --package needs cargo (Rust 1.95)" >&2; exit 1; }
    command -v strip >/dev/null || { echo "gpu-check: --package needs strip (binutils)" >&2; exit 1; }
    local t0=$SECONDS
    echo "== build (release, --features cuda): ouroc, gpu_bench, the cuda and gpu_emu tests"
    # One cargo invocation: one feature resolution, so nothing builds twice.
    json=$(mktemp)
    cargo build --release --locked -p ouroc -p ouroc-runtime --features ouroc/cuda,ouroc-runtime/cuda \
        --bin ouroc --example gpu_bench --test cuda --test gpu_emu \
        --message-format=json-render-diagnostics >"$json"
    echo "   built in $((SECONDS - t0)) s"
    rm -rf "$dir"
    mkdir -p "$dir/bin"
    # The executables cargo reports, by target name: bin/NAME (tests: NAME-tests).
    python3 - "$json" <<'EOF' >"$json.list"
import json, sys
want = {("bin", "ouroc"): "ouroc", ("example", "gpu_bench"): "gpu_bench",
        ("test", "cuda"): "cuda-tests", ("test", "gpu_emu"): "gpu_emu-tests"}
found = {}
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    key = (m["target"]["kind"][0], m["target"]["name"])
    if key in want:
        found[want[key]] = m["executable"]
missing = set(want.values()) - set(found)
if missing:
    sys.exit("gpu-check: cargo reported no executable for " + ", ".join(sorted(missing)))
for name, path in sorted(found.items()):
    print(name, path)
EOF
    while read -r name exe; do
        strip -o "$dir/bin/$name" "$exe"
    done <"$json.list"
    rm -f "$json" "$json.list"
    cp -r tests/fixtures "$dir/fixtures"
    cp scripts/gpu-runner.sh "$dir/run.sh"
    cp scripts/gpu-compare.py "$dir/compare.py"
    chmod +x "$dir/run.sh" "$dir/compare.py" "$dir"/bin/*
    {
        echo "ouroc GPU package, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
            git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
        echo "built $(date -u '+%Y-%m-%d %H:%M UTC') with $(rustc --version), release, --features cuda"
        echo "PTX: generated at run time by bin/ouroc (sm_80), JIT-compiled by the driver"
        (cd "$dir" && find . -type f ! -name MANIFEST | sort | xargs du -b | awk '{printf "%10d %s\n", $1, $2}')
    } >"$dir/MANIFEST"
    local bytes
    bytes=$(du -sb "$dir" | cut -f1)
    echo "== package $dir: $((bytes / 1024)) KiB ($(find "$dir" -type f | wc -l) files; limit 60 MiB); built in $((SECONDS - t0)) s"
    ls -l "$dir/bin"
    if [ "$bytes" -gt "$MAX_BYTES" ]; then
        echo "gpu-check: the package is $((bytes / 1024 / 1024)) MiB, over the 60 MiB limit" >&2
        exit 1
    fi
}

dry_run() {
    local dir=$1 tmp rc=0
    tmp=$(mktemp -d)
    cp -a "$dir" "$tmp/pkg"
    mkdir "$tmp/empty"
    echo
    echo "== the package's run without cargo or a GPU: env -i PATH=/usr/bin:/bin, from an empty directory"
    if env -i PATH=/usr/bin:/bin bash -c 'command -v cargo || command -v rustc' >/dev/null; then
        echo "gpu-check: warning: /usr/bin or /bin has cargo or rustc here; the run still calls neither" >&2
    fi
    local run=(env -i PATH=/usr/bin:/bin bash "$tmp/pkg/run.sh" --report "$tmp/report")
    if unshare -rm true 2>/dev/null; then
        # The source tree hidden: nothing of the build machine's tree is read.
        echo "   (the source tree $ROOT hidden by an empty tmpfs: unshare -rm)"
        # shellcheck disable=SC2016 # expanded by the inner bash
        unshare -rm bash -c 'mount -t tmpfs none "$1" && cd "$2" && shift 2 && exec "$@"' _ \
            "$ROOT" "$tmp/empty" "${run[@]}" || rc=$?
    else
        echo "   (unshare not permitted here: the source tree stays visible)"
        (cd "$tmp/empty" && "${run[@]}") || rc=$?
    fi
    local bytes
    bytes=$(du -sb "$tmp/report" 2>/dev/null | cut -f1)
    echo
    cat "$tmp/report/report.md" 2>/dev/null || true
    echo
    echo "report: $(find "$tmp/report" -type f | wc -l) files, $((${bytes:-0} / 1024)) KiB"
    if [ "$rc" != 0 ] || [ ! -s "$tmp/report/report.md" ]; then
        echo "gpu-check: the dry run failed (exit status $rc); report in $tmp/report" >&2
        exit 1
    fi
    if [ "$bytes" -gt $((16 * 1024 * 1024)) ]; then
        echo "gpu-check: the report is over 16 MiB" >&2
        exit 1
    fi
    rm -rf "$tmp"
    echo "gpu-check: dry run passed"
}

case "$1" in
    --package)
        [ $# = 2 ] || { usage; exit 2; }
        package "$(abspath "$2")"
        ;;
    --from)
        [ $# -ge 2 ] || { usage; exit 2; }
        dir=$(abspath "$2")
        shift 2
        [ -f "$dir/run.sh" ] || { echo "gpu-check: $dir/run.sh not found (build it with --package)" >&2; exit 2; }
        exec bash "$dir/run.sh" "$@"
        ;;
    --dry-run)
        [ $# -le 2 ] || { usage; exit 2; }
        dir=$(abspath "${2:-$ROOT/target/gpu-package}")
        package "$dir"
        dry_run "$dir"
        ;;
    --record)
        [ $# = 2 ] || { usage; exit 2; }
        report=$(abspath "$2")
        bench=$report/bench.md
        [ -s "$bench" ] || { echo "gpu-check: $bench not found (the report of a GPU run)" >&2; exit 2; }
        {
            echo
            echo "<!-- scripts/gpu-check.sh --from, $(date -u +%Y-%m-%d) -->"
            cat "$bench"
            echo
            awk -F'\t' '$1 == "device" || $1 == "ptx" || $1 == "ceilings" {print "- " $1 ": " $4}' "$report/steps.tsv"
        } >>"$ROOT/BENCHMARKS.md"
        echo "appended $bench to BENCHMARKS.md"
        ;;
    -h|--help) usage ;;
    *) echo "gpu-check: unknown argument $1" >&2; usage; exit 2 ;;
esac
