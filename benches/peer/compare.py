"""Run `ouroc bench` and the PyTorch peer on the same checkpoint, alternating in this script,
and print the ratios ouroc / PyTorch for prefill and decode.

    python benches/peer/compare.py --shape 1.4b            # random bf16 weights of a named shape
    python benches/peer/compare.py CKPT --threads 2 --runs 3 --rounds 3
    python benches/peer/compare.py --shape 1.4b --baseline OLD/ouroc   # before / after a change

A round is one `ouroc bench` (--runs runs) followed by one PyTorch run (--runs runs). On a
shared machine the memory bandwidth drifts by tens of percent from minute to minute, so the
ratio is taken within each round (the two engines measured minutes apart at most) and the
median over the rounds is reported, with every round's numbers shown.

The ouroc binary is target/release/ouroc (build it first: `cargo build --release`) unless
--ouroc says otherwise. Both engines get the same thread count, prompt length, decode length
and number of runs, and run every loop step of every token (`--exit last`). With --baseline
OLD_OUROC, each round also runs that binary (first), and the ratios new / old are reported the
same way (per round, then the median).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="runs per engine per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both engines")
    ap.add_argument("--ouroc", default=str(ROOT / "target" / "release" / "ouroc"))
    ap.add_argument("--baseline", help="another ouroc binary (before a change), run in every round too")
    a = ap.parse_args()
    if (a.ckpt is None) == (a.shape is None):
        sys.exit("give a checkpoint directory or --shape NAME (one of them)")
    if a.rounds < 1 or a.runs < 1:
        sys.exit("--rounds and --runs must be at least 1")
    if not Path(a.ouroc).exists():
        sys.exit(f"{a.ouroc} does not exist: run `cargo build --release` first")
    if a.baseline and not Path(a.baseline).exists():
        sys.exit(f"--baseline {a.baseline} does not exist")
    common = ["--prefill-tokens", str(a.prefill_tokens), "--decode-tokens", str(a.decode_tokens),
              "--runs", str(a.runs), "--threads", str(a.threads)]
    rounds, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ours_json, peer_json = Path(tmp) / "ouroc.json", Path(tmp) / "torch.json"
        src = [a.ckpt] if a.ckpt else ["--shape", a.shape]
        for r in range(a.rounds):
            print(f"== round {r + 1}/{a.rounds}", flush=True)
            if a.baseline:
                old = run_json([a.baseline, "bench", *src, "--precision", a.precision, "--exit", "last",
                                "--json", str(ours_json), *common], ours_json)
                base.append(old["results"][0])
            ours = run_json([a.ouroc, "bench", *src, "--precision", a.precision, "--exit", "last",
                             "--json", str(ours_json), *common], ours_json)
            ckpt = ours["checkpoint"]
            peer = run_json([sys.executable, str(ROOT / "benches" / "peer" / "torch_ouro.py"), ckpt,
                             "--precision", a.precision, "--json", str(peer_json), *common], peer_json)
            rounds.append((ours["results"][0], ours["read_bandwidth_gb_s"], peer))
    print()
    print(f"checkpoint {ckpt}, {a.precision}, {a.threads} threads, {a.prefill_tokens} prefill + "
          f"{a.decode_tokens} decode tokens, {a.rounds} alternating rounds of {a.runs} runs per engine")
    print("| round | ouroc prefill/s | PyTorch prefill/s | ratio | ouroc decode/s | PyTorch decode/s | ratio "
          "| read GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (mine, bw, peer) in enumerate(rounds):
        cells = [f"{mine[k]:.2f} | {peer[k]:.2f} | {mine[k] / peer[k]:.2f}x" for k, _ in KEYS]
        print(f"| {i + 1} | {' | '.join(cells)} | {bw:.1f} |")
    print()
    print(f"| median over rounds | ouroc | PyTorch ({rounds[0][2]['engine']}) | ouroc / PyTorch |")
    print("|---|---|---|---|")
    for key, name in KEYS:
        ours = statistics.median(m[key] for m, _, _ in rounds)
        peer = statistics.median(p[key] for _, _, p in rounds)
        ratio = statistics.median(m[key] / p[key] for m, _, p in rounds)
        print(f"| {name} | {ours:.2f} | {peer:.2f} | {ratio:.2f}x |")
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
    peer = statistics.median(p["decode_tokens_per_s"] for _, _, p in rounds)
    print(f"decode reads {bytes_per_token / 1e9:.3f} GB of weights per token; at the median "
          f"{bw:.1f} GB/s read bandwidth measured by ouroc bench the floor is {floor:.2f} tokens/s: "
          f"ouroc reaches {ours / floor:.0%} of it, PyTorch {peer / floor:.0%}")


if __name__ == "__main__":
    main()
