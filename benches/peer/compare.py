"""Run `ouroc bench` and the PyTorch peer on the same checkpoint, one after the other in this
script, and print the ratios ouroc / PyTorch for prefill and decode.

    python benches/peer/compare.py --shape 1.4b            # random bf16 weights of a named shape
    python benches/peer/compare.py CKPT --threads 2 --runs 3

The ouroc binary is target/release/ouroc (build it first: `cargo build --release`) unless
--ouroc says otherwise. Both engines get the same thread count, prompt length, decode length
and number of runs, and run every loop step of every token (`--exit last`).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", nargs="?", help="checkpoint directory (or --shape)")
    ap.add_argument("--shape", help="a named shape: random bf16 weights written by ouroc bench")
    ap.add_argument("--precision", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ouroc", default=str(ROOT / "target" / "release" / "ouroc"))
    a = ap.parse_args()
    if (a.ckpt is None) == (a.shape is None):
        sys.exit("give a checkpoint directory or --shape NAME (one of them)")
    if not Path(a.ouroc).exists():
        sys.exit(f"{a.ouroc} does not exist: run `cargo build --release` first")
    common = ["--prefill-tokens", str(a.prefill_tokens), "--decode-tokens", str(a.decode_tokens),
              "--runs", str(a.runs), "--threads", str(a.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        ours_json, peer_json = Path(tmp) / "ouroc.json", Path(tmp) / "torch.json"
        src = [a.ckpt] if a.ckpt else ["--shape", a.shape]
        cmd = [a.ouroc, "bench", *src, "--precision", a.precision, "--exit", "last", "--json", str(ours_json), *common]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        ours = json.loads(ours_json.read_text())
        ckpt = ours["checkpoint"]
        cmd = [sys.executable, str(ROOT / "benches" / "peer" / "torch_ouro.py"), ckpt, "--precision", a.precision,
               "--json", str(peer_json), *common]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        peer = json.loads(peer_json.read_text())
    mine = ours["results"][0]
    bw = ours["read_bandwidth_gb_s"]
    floor = bw * 1e9 / mine["decode_weight_bytes_per_token"]
    print()
    print(f"checkpoint {ckpt}, {a.precision}, {a.threads} threads, {a.prefill_tokens} prefill + "
          f"{a.decode_tokens} decode tokens, median of {a.runs} runs")
    print(f"| | ouroc | PyTorch ({peer['engine']}) | ouroc / PyTorch |")
    print("|---|---|---|---|")
    for key, name in [("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s")]:
        print(f"| {name} | {mine[key]:.2f} | {peer[key]:.2f} | {mine[key] / peer[key]:.2f}x |")
    print(f"decode reads {mine['decode_weight_bytes_per_token'] / 1e9:.3f} GB of weights per token; at the "
          f"{bw:.1f} GB/s read bandwidth measured by ouroc bench the floor is {floor:.2f} tokens/s: "
          f"ouroc reaches {mine['decode_tokens_per_s'] / floor:.0%} of it, PyTorch "
          f"{peer['decode_tokens_per_s'] / floor:.0%}")


if __name__ == "__main__":
    main()
