"""The PyTorch peer of `ouroc bench`: the same checkpoint, the same work, timed the same way.

An efficient eager PyTorch Ouro with a KV cache per (loop step, layer), as the Hugging Face
modeling code keeps it: prefill `--prefill-tokens` random ids, then decode `--decode-tokens`
tokens greedily, every loop step for every token (the peer of `ouroc bench --exit last`).
Weights in the checkpoint's dtype (bf16) or f32, `torch.set_num_threads(--threads)`,
`torch.inference_mode()`, scaled_dot_product_attention. Prints one line per run and the
medians; `--json FILE` writes them for compare.py.

`--check` first compares its prefill logits with the reference implementation
(tests/reference/ouro_ref.py) on the same checkpoint, so the timed code is known to compute
the same model.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "reference"))
from ouro_ref import Ouro, load_checkpoint  # noqa: E402


class FastOuro:
    """Ouro forward with a KV cache; weights merged (q|k|v, gate|up) as any fast engine does."""

    def __init__(self, cfg, weights, dtype):
        self.D = dtype
        self.H = cfg["hidden_size"]
        self.L = cfg["num_hidden_layers"]
        self.R = cfg["total_ut_steps"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads", self.heads)
        self.hd = cfg.get("head_dim") or self.H // self.heads
        self.eps = cfg["rms_norm_eps"]
        self.theta = cfg["rope_theta"]
        w = {k: v.to(dtype) for k, v in weights.items()}
        if "lm_head.weight" not in w:
            w["lm_head.weight"] = w["model.embed_tokens.weight"]
        self.embed = w["model.embed_tokens.weight"]
        self.head = w["lm_head.weight"]
        self.norm = w["model.norm.weight"]
        self.gate_w = w["model.early_exit_gate.weight"]
        self.gate_b = w["model.early_exit_gate.bias"]
        self.layers = []
        for i in range(self.L):
            p = f"model.layers.{i}."
            self.layers.append({
                "qkv": torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
                "o": w[p + "self_attn.o_proj.weight"],
                "gate_up": torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]),
                "down": w[p + "mlp.down_proj.weight"],
                "n1": w[p + "input_layernorm.weight"], "n2": w[p + "input_layernorm_2.weight"],
                "n3": w[p + "post_attention_layernorm.weight"], "n4": w[p + "post_attention_layernorm_2.weight"],
            })
        inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.inv_freq = inv
        self.reset()

    def reset(self):
        self.cache = {}  # (step, layer) -> (k, v) [1, kv_heads, T, hd]
        self.past = 0

    def rms_norm(self, x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.D)

    def rope(self, x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def layer(self, h, r, i, cos, sin):
        p = self.layers[i]
        T = h.shape[1]
        x = self.rms_norm(h, p["n1"])
        qkv = F.linear(x, p["qkv"])
        qd, kd = self.heads * self.hd, self.kv_heads * self.hd
        q = qkv[..., :qd].view(1, T, self.heads, self.hd).transpose(1, 2)
        k = qkv[..., qd:qd + kd].view(1, T, self.kv_heads, self.hd).transpose(1, 2)
        v = qkv[..., qd + kd:].view(1, T, self.kv_heads, self.hd).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        if (r, i) in self.cache:
            pk, pv = self.cache[(r, i)]
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        self.cache[(r, i)] = (k, v)
        rep = self.heads // self.kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        a = F.linear(a.transpose(1, 2).reshape(1, T, qd), p["o"])
        h = h + self.rms_norm(a, p["n2"])
        x = self.rms_norm(h, p["n3"])
        g, u = F.linear(x, p["gate_up"]).chunk(2, dim=-1)
        return h + self.rms_norm(F.linear(F.silu(g) * u, p["down"]), p["n4"])

    def forward(self, ids):
        """Logits [T, V] (f32) of the last loop step for `ids` after the cache."""
        T = len(ids)
        pos = torch.arange(self.past, self.past + T).float()
        emb = torch.cat([pos[:, None] * self.inv_freq[None, :]] * 2, -1)
        cos, sin = emb.cos().to(self.D), emb.sin().to(self.D)
        h = self.embed[torch.tensor(ids)][None]
        for r in range(self.R):
            for i in range(self.L):
                h = self.layer(h, r, i, cos, sin)
            h = self.rms_norm(h, self.norm)
            torch.sigmoid(F.linear(h, self.gate_w, self.gate_b))  # the exit gate, computed as the model does
        self.past += T
        return F.linear(h[0], self.head).float()


def random_ids(n, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="checkpoint directory")
    ap.add_argument("--precision", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="compare with tests/reference/ouro_ref.py first")
    ap.add_argument("--json", help="write the medians to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    cfg, weights = load_checkpoint(a.ckpt)
    model = FastOuro(cfg, weights, dtype)
    if a.check:
        ids = random_ids(8, cfg["vocab_size"])
        ref = Ouro(cfg, weights, dtype)
        with torch.inference_mode():
            hidden, _ = ref.forward(ids)
            want = ref.lm_head(hidden[-1])
            got = model.forward(ids)
            model.reset()
            for t in ids:  # the same positions one at a time through the cache
                last = model.forward([t])[-1]
        model.reset()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for what, x, y in [("prefill vs ouro_ref.py", got, want), ("decode vs ouro_ref.py", last, want[-1])]:
            err = ((x - y).abs().max() / y.abs().max()).item()
            print(f"check {what}: max relative difference {err:.2e} (limit {tol})")
            if not err <= tol:
                sys.exit("the peer does not compute the reference model")
    ids = random_ids(a.prefill_tokens, cfg["vocab_size"])
    prefill, decode = [], []
    with torch.inference_mode():
        for run in range(a.runs):
            model.reset()
            t = time.perf_counter()
            logits = model.forward(ids)
            prefill.append(len(ids) / (time.perf_counter() - t))
            t = time.perf_counter()
            for _ in range(a.decode_tokens):
                logits = model.forward([int(logits[-1].argmax())])
            decode.append(a.decode_tokens / (time.perf_counter() - t))
            print(f"[torch {a.precision}] run {run + 1}/{a.runs}: prefill {prefill[-1]:.2f} tokens/s, "
                  f"decode {decode[-1]:.2f} tokens/s", file=sys.stderr)
    res = {
        "engine": f"pytorch {torch.__version__}",
        "threads": a.threads,
        "precision": a.precision,
        "prefill_tokens": a.prefill_tokens,
        "decode_tokens": a.decode_tokens,
        "runs": a.runs,
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
    }
    print(f"pytorch {a.precision}, {a.threads} threads: prefill {res['prefill_tokens_per_s']:.2f} tokens/s, "
          f"decode {res['decode_tokens_per_s']:.2f} tokens/s (median of {a.runs})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
