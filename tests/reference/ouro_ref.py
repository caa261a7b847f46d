"""Reference Ouro forward pass in PyTorch: the executable spec the Rust side is tested against.

Written from /work/shared/ouro-spec.md. Every op runs on torch tensors of the model dtype D
(torch.float32 or torch.bfloat16) unless a comment says otherwise; the rounding points are the
contract (see README.md). Batch size is always 1; positions are 0..T-1 in every loop step.
No KV cache: every call recomputes the whole sequence.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

POLICY_HELP = "last | step:K | threshold:Q | threshold:Q:bf16 | weighted"


def default_policies(R):
    """The policy list of the golden files, in order."""
    return (["last"] + [f"step:{k}" for k in range(R)]
            + ["threshold:0.5", "threshold:0.5:bf16", "threshold:1.0:bf16", "weighted"])


def bf16(t):
    """Round an f32 tensor to bfloat16 (nearest, ties to even) and back to f32."""
    return t.to(torch.bfloat16).float()


def load_checkpoint(path):
    """(config dict, {name: tensor in stored dtype}) from a Hugging Face checkpoint directory."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if (path / "model.safetensors").exists():
        weights = load_file(path / "model.safetensors")
    else:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        weights = {}
        for shard in sorted(set(index["weight_map"].values())):
            weights.update(load_file(path / shard))
        assert set(weights) == set(index["weight_map"]), "index and shards disagree"
    return cfg, weights


class Ouro:
    def __init__(self, cfg, weights, dtype):
        assert dtype in (torch.float32, torch.bfloat16)
        for key in ("rope_scaling",):
            if cfg.get(key) is not None:
                raise ValueError(f"unsupported config key: {key}")
        if cfg.get("use_sliding_window"):
            raise ValueError("unsupported config key: use_sliding_window")
        self.D = dtype
        self.H = cfg["hidden_size"]
        self.L = cfg["num_hidden_layers"]
        self.R = cfg["total_ut_steps"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads", self.heads)
        self.hd = cfg.get("head_dim") or self.H // self.heads
        self.eps = cfg["rms_norm_eps"]
        self.theta = cfg["rope_theta"]
        self.w = {k: v.to(dtype) for k, v in weights.items()}
        if "lm_head.weight" not in self.w:
            assert cfg.get("tie_word_embeddings"), "lm_head.weight missing and embeddings untied"
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]

    @classmethod
    def load(cls, path, dtype):
        return cls(*load_checkpoint(path), dtype)

    # ---- building blocks -------------------------------------------------------------------
    def rms_norm(self, x, w):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * y.to(self.D)

    def rope(self, T):
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=torch.int64).float() / self.hd))
        freqs = torch.arange(T).float()[:, None] * inv_freq[None, :]  # f32 angles
        emb = torch.cat((freqs, freqs), -1)
        return emb.cos().to(self.D), emb.sin().to(self.D)

    @staticmethod
    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def attention(self, x, p, cos, sin):
        B, T, _ = x.shape
        q = F.linear(x, self.w[p + "q_proj.weight"]).view(B, T, self.heads, self.hd).transpose(1, 2)
        k = F.linear(x, self.w[p + "k_proj.weight"]).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        v = F.linear(x, self.w[p + "v_proj.weight"]).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        rep = self.heads // self.kv_heads  # q head j reads kv head j // rep
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * (self.hd ** -0.5)  # D
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        scores = scores.float().masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.D)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, self.heads * self.hd)
        return F.linear(out, self.w[p + "o_proj.weight"])

    def layer(self, h, i, cos, sin):
        p = f"model.layers.{i}."
        a = self.attention(self.rms_norm(h, self.w[p + "input_layernorm.weight"]), p + "self_attn.", cos, sin)
        h = h + self.rms_norm(a, self.w[p + "input_layernorm_2.weight"])
        x = self.rms_norm(h, self.w[p + "post_attention_layernorm.weight"])
        m = F.linear(F.silu(F.linear(x, self.w[p + "mlp.gate_proj.weight"]))
                     * F.linear(x, self.w[p + "mlp.up_proj.weight"]), self.w[p + "mlp.down_proj.weight"])
        return h + self.rms_norm(m, self.w[p + "post_attention_layernorm_2.weight"])

    # ---- whole model -----------------------------------------------------------------------
    def forward(self, ids):
        """ids: list of T token ids. Returns (hidden [R,T,H], lambdas [R,T]), both in dtype D."""
        T = len(ids)
        cos, sin = self.rope(T)
        h = self.w["model.embed_tokens.weight"][torch.tensor(ids)][None]  # [1,T,H]
        hidden, lambdas = [], []
        for _ in range(self.R):
            for i in range(self.L):
                h = self.layer(h, i, cos, sin)
            h = self.rms_norm(h, self.w["model.norm.weight"])
            gate = F.linear(h, self.w["model.early_exit_gate.weight"], self.w["model.early_exit_gate.bias"])
            hidden.append(h[0])
            lambdas.append(torch.sigmoid(gate)[0, :, 0])
        return torch.stack(hidden), torch.stack(lambdas)

    def lm_head(self, h):
        return F.linear(h, self.w["lm_head.weight"]).float()  # computed in D, returned as f32

    # ---- exit policies ---------------------------------------------------------------------
    @staticmethod
    def exit_pdf(lambdas):
        """f32 arithmetic: p [R,T] from the lambdas (as f32)."""
        lam = lambdas.float()
        R = lam.shape[0]
        S = torch.ones_like(lam[0])
        p = []
        for r in range(R - 1):
            p.append(lam[r] * S)
            S = S * (1 - lam[r])
        p.append(S)
        return torch.stack(p)

    @classmethod
    def exit_threshold(cls, lambdas, q, bf16_arith=False):
        """Per-token exit step (int64 [T]): first r whose cumulative exit probability >= q."""
        R, T = lambdas.shape
        q = torch.tensor(q, dtype=torch.float32)
        step = torch.full((T,), R - 1, dtype=torch.int64)
        done = torch.zeros(T, dtype=torch.bool)
        if not bf16_arith:
            c = torch.zeros(T)
            for r, p in enumerate(cls.exit_pdf(lambdas)):
                c = c + p
                hit = (c >= q) & ~done
                step[hit], done = r, done | hit
            return step
        lam = bf16(lambdas.float())
        q = bf16(q)  # torch compares a bf16 tensor with bf16(q): 0.9 acts as 0.8984375
        S = torch.ones(T)
        acc = torch.zeros(T)  # f32 accumulator, compared after rounding to bf16 (torch bf16 cumsum)
        for r in range(R):
            if r < R - 1:
                p = bf16(lam[r] * S)
                S = bf16(S * bf16(1 - lam[r]))
            else:
                p = S
            acc = acc + p
            hit = (bf16(acc) >= q) & ~done
            step[hit], done = r, done | hit
        return step

    def apply_policy(self, hidden, lambdas, policy):
        """Returns (logits f32 [T,V], exit_step int64 [T]) for one policy string."""
        R, T, _ = hidden.shape
        parts = policy.split(":")
        if parts[0] == "last":
            return self.lm_head(hidden[R - 1]), torch.full((T,), R - 1)
        if parts[0] == "step":
            k = int(parts[1])
            assert 0 <= k < R, f"step {k} out of range for R={R}"
            return self.lm_head(hidden[k]), torch.full((T,), k)
        if parts[0] == "threshold":
            assert len(parts) == 2 or parts[2] == "bf16", policy
            step = self.exit_threshold(lambdas, float(parts[1]), bf16_arith=len(parts) == 3)
            all_logits = torch.stack([self.lm_head(h) for h in hidden])  # [R,T,V]
            return all_logits[step, torch.arange(T)], step
        if parts[0] == "weighted":
            p = self.exit_pdf(lambdas)
            acc = torch.zeros(T, self.w["lm_head.weight"].shape[0])
            for r in range(R):
                acc = acc + p[r][:, None] * self.lm_head(hidden[r])
            return acc, torch.full((T,), R - 1)
        raise ValueError(f"unknown policy {policy!r}; expected {POLICY_HELP}")

    def run(self, ids, policies):
        """hidden [R,T,H] f32, lambdas [R,T] f32, {policy: (logits f32 [T,V], exit_step [T])}."""
        hidden, lambdas = self.forward(ids)
        out = {P: self.apply_policy(hidden, lambdas, P) for P in policies}
        return hidden.float(), lambdas.float(), out

    def greedy(self, ids, policy, n=16, margins=None):
        """n greedy tokens, each from a full recompute (no cache); argmax takes the first max.
        If `margins` is a list, the top1 - top2 logit gap of every step is appended to it."""
        ids = list(ids)
        new = []
        for _ in range(n):
            hidden, lambdas = self.forward(ids)
            logits, _ = self.apply_policy(hidden, lambdas, policy)
            tok = int(torch.argmax(logits[-1]))
            if margins is not None:
                top = logits[-1].topk(2).values
                margins.append(float(top[0] - top[1]))
            ids.append(tok)
            new.append(tok)
        return new


if __name__ == "__main__":
    import sys
    torch.set_num_threads(2)
    model = Ouro.load(sys.argv[1], torch.float32)
    ids = [int(t) for t in sys.argv[2:]] or [1, 2, 3]
    h, lam, out = model.run(ids, default_policies(model.R))
    print("lambdas", lam)
    for P, (lg, st) in out.items():
        print(P, "exit", st.tolist(), "argmax", lg.argmax(-1).tolist())
