"""Run `ouroc bench` and the PyTorch peer on the same checkpoint, alternating in this script,
and print the ratios ouroc / PyTorch for prefill and decode (and ouroc / llama.cpp with --llama).

    python benches/peer/compare.py --shape 1.4b            # random bf16 weights of a named shape
    python benches/peer/compare.py CKPT --threads 2 --runs 3 --rounds 3
    python benches/peer/compare.py --shape 1.4b --baseline OLD/ouroc   # before / after a change
    python benches/peer/compare.py CKPT --llama --llama-weights bf16,q8_0   # + llama.cpp peers
    python benches/peer/compare.py CKPT --llama --no-torch                  # llama.cpp only
    python benches/peer/compare.py --shape 1.4b --weights q8 --llama --llama-weights q8_0 --no-torch

A round is one `ouroc bench` (--runs runs) followed by one PyTorch run (--runs runs). On a
shared machine the memory bandwidth drifts by tens of percent from minute to minute, so the
ratio is taken within each round (the two engines measured minutes apart at most) and the
median over the rounds is reported, with every round's numbers shown.

The ouroc binary is target/release/ouroc (build it first: `cargo build --release`) unless
--ouroc says otherwise. Both engines get the same thread count, prompt length, decode length
and number of runs, and run every loop step of every token (`--exit last`). With --baseline
OLD_OUROC, each round also runs that binary (first), and the ratios new / old are reported the
same way (per round, then the median).

With --llama, each round also runs benches/peer/llama_peer.py (after PyTorch) once per weight
type in --llama-weights (bf16, q8_0, q4_0; default bf16): llama.cpp on the checkpoint unrolled
into a plain llama GGUF of L*R blocks (same matrix shapes, same work per token less Ouro's
extra norms and exit gate: see llama_peer.py), with the same threads, lengths and runs; the
ratios ouroc / llama.cpp are reported per round and as the median, as for PyTorch. llama_peer.py
runs under --llama-python (default /work/venv-llama/bin/python where it exists, else this
interpreter), the PyTorch peer under this interpreter. --no-torch skips the PyTorch peer.
Quantised llama.cpp weights read fewer bytes per token than the bf16 floor line assumes.
--weights q8|q4 runs ouroc (and --baseline) with quantised Linears (`ouroc bench --weights`); the
floor line then uses ouroc's own bytes per token, which match llama.cpp's Q8_0 / Q4_0 (8.5 / 4.5
bits per weight) except that ouroc's q4 keeps the LM head in q8_0.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LLAMA_PYTHON = "/work/venv-llama/bin/python"
KEYS = [("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s")]


def run_json(cmd, out):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", nargs="?", help="checkpoint directory (or --shape)")
    ap.add_argument("--shape", help="a named shape: random bf16 weights written by ouroc bench")
    ap.add_argument("--precision", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--weights", choices=["dense", "q8", "q4"], default="dense",
                    help="ouroc's Linear weights (ouroc bench --weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="runs per engine per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both engines")
    ap.add_argument("--ouroc", default=str(ROOT / "target" / "release" / "ouroc"))
    ap.add_argument("--baseline", help="another ouroc binary (before a change), run in every round too")
    ap.add_argument("--no-torch", action="store_true", help="do not run the PyTorch peer")
    ap.add_argument("--llama", action="store_true", help="also run the llama.cpp peer (llama_peer.py)")
    ap.add_argument("--llama-weights", default="bf16",
                    help="comma-separated llama.cpp weight types, one engine each: bf16,q8_0,q4_0")
    ap.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON if os.path.exists(DEFAULT_LLAMA_PYTHON)
                    else sys.executable, help="the Python with llama_cpp and gguf (default: %(default)s)")
    ap.add_argument("--gguf-dir", help="llama_peer.py's cache of converted GGUFs")
    a = ap.parse_args()
    if (a.ckpt is None) == (a.shape is None):
        sys.exit("give a checkpoint directory or --shape NAME (one of them)")
    if a.rounds < 1 or a.runs < 1:
        sys.exit("--rounds and --runs must be at least 1")
    if not Path(a.ouroc).exists():
        sys.exit(f"{a.ouroc} does not exist: run `cargo build --release` first")
    if a.baseline and not Path(a.baseline).exists():
        sys.exit(f"--baseline {a.baseline} does not exist")
    llama_weights = [w.strip() for w in a.llama_weights.split(",") if w.strip()] if a.llama else []
    for w in llama_weights:
        if w not in ("bf16", "q8_0", "q4_0"):
            sys.exit(f"--llama-weights: unknown type {w} (bf16, q8_0, q4_0)")
    if a.llama and not llama_weights:
        sys.exit("--llama-weights lists no type")
    if a.no_torch and not a.llama:
        sys.exit("--no-torch without --llama leaves nothing to compare with")
    # (label, key) of every peer engine, in the order they run in a round
    peers = ([] if a.no_torch else [("PyTorch", "torch")]) + [(f"llama.cpp {w}", w) for w in llama_weights]
    common = ["--prefill-tokens", str(a.prefill_tokens), "--decode-tokens", str(a.decode_tokens),
              "--runs", str(a.runs), "--threads", str(a.threads)]
    rounds, base = [], []
    weights = ["--weights", a.weights] if a.weights != "dense" else []
    with tempfile.TemporaryDirectory() as tmp:
        ours_json, peer_json = Path(tmp) / "ouroc.json", Path(tmp) / "peer.json"
        src = [a.ckpt] if a.ckpt else ["--shape", a.shape]
        for r in range(a.rounds):
            print(f"== round {r + 1}/{a.rounds}", flush=True)
            if a.baseline:
                old = run_json([a.baseline, "bench", *src, "--precision", a.precision, "--exit", "last",
                                *weights, "--json", str(ours_json), *common], ours_json)
                base.append(old["results"][0])
            ours = run_json([a.ouroc, "bench", *src, "--precision", a.precision, "--exit", "last",
                             *weights, "--json", str(ours_json), *common], ours_json)
            ckpt = ours["checkpoint"]
            peer = {}
            for _, key in peers:
                if key == "torch":
                    cmd = [sys.executable, str(ROOT / "benches" / "peer" / "torch_ouro.py"), ckpt,
                           "--precision", a.precision]
                else:
                    cmd = [a.llama_python, str(ROOT / "benches" / "peer" / "llama_peer.py"), ckpt,
                           "--weights", key, *(["--gguf-dir", a.gguf_dir] if a.gguf_dir else [])]
                peer[key] = run_json([*cmd, "--json", str(peer_json), *common], peer_json)
            rounds.append((ours["results"][0], ours["read_bandwidth_gb_s"], peer))
    print()
    print(f"checkpoint {ckpt}, {a.precision}, {a.threads} threads, {a.prefill_tokens} prefill + "
          f"{a.decode_tokens} decode tokens, {a.rounds} alternating rounds of {a.runs} runs per engine")
    head = ["round"]
    for kind in ("prefill", "decode"):
        head += [f"ouroc {kind}/s"] + [c for label, _ in peers for c in (f"{label} {kind}/s", "ratio")]
    head.append("read GB/s")
    print(f"| {' | '.join(head)} |")
    print("|" + "---|" * len(head))
    for i, (mine, bw, peer) in enumerate(rounds):
        cells = [f"{mine[k]:.2f} | " + " | ".join(f"{peer[p][k]:.2f} | {mine[k] / peer[p][k]:.2f}x"
                                                   for _, p in peers) for k, _ in KEYS]
        print(f"| {i + 1} | {' | '.join(cells)} | {bw:.1f} |")
    print()
    head = ["median over rounds", "ouroc"]
    for label, p in peers:
        head += [f"{label} ({rounds[0][2][p]['engine']})", f"ouroc / {label}"]
    print(f"| {' | '.join(head)} |")
    print("|" + "---|" * len(head))
    for key, name in KEYS:
        ours = statistics.median(m[key] for m, _, _ in rounds)
        cells = []
        for _, p in peers:
            peer = statistics.median(q[p][key] for _, _, q in rounds)
            ratio = statistics.median(m[key] / q[p][key] for m, _, q in rounds)
            cells.append(f"{peer:.2f} | {ratio:.2f}x")
        print(f"| {name} | {ours:.2f} | {' | '.join(cells)} |")
    if base:
        print()
        print(f"| new / baseline ({a.baseline}) | per round | median |")
        print("|---|---|---|")
        for key, name in KEYS:
            per = [m[key] / b[key] for (m, _, _), b in zip(rounds, base)]
            print(f"| {name} | {', '.join(f'{x:.2f}x' for x in per)} | {statistics.median(per):.2f}x |")
    bytes_per_token = rounds[0][0]["decode_weight_bytes_per_token"]
    bw = statistics.median(b for _, b, _ in rounds)
    floor = bw * 1e9 / bytes_per_token
    ours = statistics.median(m["decode_tokens_per_s"] for m, _, _ in rounds)
    shares = [f"{label} {statistics.median(q[p]['decode_tokens_per_s'] for _, _, q in rounds) / floor:.0%}"
              for label, p in peers]
    print(f"decode reads {bytes_per_token / 1e9:.3f} GB of weights per token; at the median "
          f"{bw:.1f} GB/s read bandwidth measured by ouroc bench the floor is {floor:.2f} tokens/s: "
          f"ouroc reaches {ours / floor:.0%} of it, {', '.join(shares)}")


if __name__ == "__main__":
    main()
