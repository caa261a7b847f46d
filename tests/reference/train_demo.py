"""Trains the small Ouro-architecture demo model shipped in models/demo/ (see its README.md).

    python tests/reference/train_demo.py [--steps N] [--out models/demo]
    python tests/reference/train_demo.py --dry-run      # throughput only, writes nothing

CPU only, torch.set_num_threads(2): about 20 minutes of training on two (shared) cores. Fixed
seeds and data order; other torch versions, CPUs or Python versions (other stdlib text) give
other low bits or another model.

Data: the top-level *.py modules of the CPython standard library of the running interpreter
(sysconfig "stdlib" path; PSF licence), sorted by name; every HOLDOUT_EVERY-th file is held out
for validation. Tokenizer: GPT-2 style byte-level BPE trained with `tokenizers` on the training
files, 4096 entries, <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2.

Model: exactly the Ouro architecture of /work/shared/ouro-spec.md (four norms per layer, the same
layers in every loop step, model.norm after each step feeding the next, early_exit_gate on the
normed state, untied lm_head). Objective (Ouro paper, stage I): per token
    loss = sum_r p_r * CE_r - beta * H(p),
p the exit distribution of the gates (p_r = lambda_r * prod_{j<r} (1 - lambda_j), the last step
takes the rest), beta decayed geometrically from BETA0 = 1 to BETA = 0.05 (a constant 0.05 let
the gate collapse onto step 1 within 80 steps). f32 master weights and optimizer, matmuls under
bf16 autocast (--f32: none); norms, residual stream, gate and losses in f32. Exported in bf16,
then evaluated with ouro_ref.py (the project's reference forward pass): CE per step, exit
depths, a greedy sample. An optional gate-only stage II (Ouro paper) exists (--steps2), off by
default: it made exits later on this model.
"""
import os

# Two torch threads on two cores shared with other jobs: busy-waiting OpenMP threads slow down
# ~8x whenever another process holds a core; passive waiting costs ~15% when the cores are idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import csv
import glob
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ouro_ref import Ouro  # noqa: E402
import gen_fixtures  # noqa: E402
from gen_fixtures import CHAT_TEMPLATE, SPECIALS, tokenizer_config, write_json  # noqa: E402,F401

torch.set_num_threads(2)

# ---- recipe ----------------------------------------------------------------------------------
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, R, VOCAB = 256, 4, 4, 4, 688, 4, 4096
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, EPS = 10000.0, 1e-6
SEQ, BATCH = 256, 8
LR, LR_MIN_FRAC, WARMUP, WD, CLIP = 2e-3, 0.1, 60, 0.1, 1.0
BETA0, BETA = 1.0, 0.05    # entropy weight, decayed geometrically from BETA0 to BETA over stage I
EMBED_STD = 1.0
GATE_BIAS0 = -1.1          # initial lambda 0.25: p = [.25, .19, .14, .42]
STEPS = 480                # stage I
STEPS2 = 0                 # stage II (gate only); off: 150 steps made exits later (see README)
K2, GAMMA, LR2 = 50.0, 0.005, 1e-2
SEED = 1234
HOLDOUT_EVERY, HOLDOUT_OFFSET = 16, 7
VAL_WINDOWS = 64           # validation windows of SEQ tokens, spread over the held-out files
REF_WINDOWS = 64           # of those, evaluated with ouro_ref.py in bf16 (exit depths)
LOG_EVERY = 5              # loss curve CSV rows
SAMPLE_PROMPT, SAMPLE_TOKENS = "def ", 60


# ---- data ------------------------------------------------------------------------------------
def stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    assert files, f"no *.py files under {root}"
    val = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY == HOLDOUT_OFFSET]
    train = [f for f in files if f not in val]
    return root, train, val


def read(f):
    with open(f, encoding="utf-8") as fh:
        return fh.read()


def build_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    return tok


def encode_files(tok, texts):
    """One token stream: each file's tokens followed by <|endoftext|>."""
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(0)
    return torch.tensor(ids, dtype=torch.int64)


# ---- model (differentiable; parameter names = the checkpoint's tensor names) ----------------
class RMSNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV_HEADS != HEADS)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, HEADS * HEAD_DIM))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = MLP()
        self.input_layernorm = RMSNorm(HIDDEN)
        self.input_layernorm_2 = RMSNorm(HIDDEN)
        self.post_attention_layernorm = RMSNorm(HIDDEN)
        self.post_attention_layernorm_2 = RMSNorm(HIDDEN)

    def forward(self, h, cos, sin):
        h = h + self.input_layernorm_2(self.self_attn(self.input_layernorm(h), cos, sin))
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([Layer() for _ in range(LAYERS)])
        self.norm = RMSNorm(HIDDEN)
        self.early_exit_gate = nn.Linear(HIDDEN, 1, bias=True)


class OuroTrain(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Inner()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).float() / HEAD_DIM))
        freqs = torch.arange(SEQ).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), -1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                continue  # ones
            if name == "model.early_exit_gate.bias":
                nn.init.constant_(p, GATE_BIAS0)
            elif name == "model.embed_tokens.weight":
                # RMS ~1 like the normed branch outputs added to the residual (N2, N4): with std
                # 0.02 the token identity drowned in the residual and deeper steps were worse.
                nn.init.normal_(p, std=EMBED_STD)
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids):
        """ids [B,T] -> (states [R,B,T,H] after model.norm, gate logits [R,B,T])."""
        T = ids.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        h = self.model.embed_tokens(ids)
        states, gates = [], []
        for _ in range(R):
            for layer in self.model.layers:
                h = layer(h, cos, sin)
            h = self.model.norm(h)
            states.append(h)
            gates.append(self.gate(h))
        return torch.stack(states), torch.stack(gates)

    def gate(self, h):
        with torch.autocast("cpu", enabled=False):
            return self.model.early_exit_gate(h.float())[..., 0]


def exit_log_pdf(gates):
    """log p_r [R,...] of the exit distribution from gate logits (stable: log-sigmoids)."""
    ls_pos, ls_neg = F.logsigmoid(gates), F.logsigmoid(-gates)
    surv = torch.cumsum(ls_neg, 0)  # log S_r = sum_{j<=r} log(1 - lambda_j)
    logp = [ls_pos[0]]
    for r in range(1, R - 1):
        logp.append(ls_pos[r] + surv[r - 1])
    logp.append(surv[R - 2])
    return torch.stack(logp)


def beta_at(step, total):
    return BETA0 * (BETA / BETA0) ** (step / max(1, total - 1))


def loss_fn(model, x, y, beta=BETA):
    """(loss, per-step mean CE [R], mean entropy, mean exit probs [R])."""
    states, gates = model(x)
    ce = step_ce(model, states, y)  # [R, B*T]
    logp = exit_log_pdf(gates).flatten(1)  # [R, B*T]
    p = logp.exp()
    ent = -(p * logp).sum(0)
    loss = ((p * ce).sum(0) - beta * ent).mean()
    return loss, ce.mean(1).detach(), ent.mean().detach(), p.detach()


def step_ce(model, states, y):
    """Per-token cross-entropy of every step's logits (logits upcast to f32): [R, B*T]."""
    return torch.stack([F.cross_entropy(model.lm_head(s).float().flatten(0, 1), y.flatten(), reduction="none")
                        for s in states])


def exit_steps_05(p):
    """1-based exit step per token at threshold 0.5 (f32 arithmetic) from p [R, N]."""
    c = torch.cumsum(p, 0)
    hit = c >= 0.5
    hit[-1] = True
    return hit.float().argmax(0) + 1


def lr_at(step, total):
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, total - WARMUP)
    return LR * (LR_MIN_FRAC + (1 - LR_MIN_FRAC) * 0.5 * (1 + math.cos(math.pi * t)))


def batches(data, steps, gen):
    """Deterministic random windows of SEQ+1 tokens."""
    n = len(data) - SEQ - 1
    for _ in range(steps):
        starts = torch.randint(0, n, (BATCH,), generator=gen)
        w = torch.stack([data[s:s + SEQ + 1] for s in starts])
        yield w[:, :-1], w[:, 1:]


def val_windows(val):
    """VAL_WINDOWS windows of SEQ+1 tokens spread evenly over the validation stream."""
    n = len(val) - SEQ - 1
    return [val[s:s + SEQ + 1] for s in torch.linspace(0, n, VAL_WINDOWS).long().tolist()]


@torch.no_grad()
def eval_f32(model, wins):
    """Pure f32 (no autocast): mean CE per step [R], exit entropy, 1-based exit steps at threshold 0.5."""
    ce, ent, ex = torch.zeros(R), 0.0, []
    for w in wins:
        _, c, e, p = loss_fn(model, w[None, :-1], w[None, 1:])
        ce += c
        ent += float(e)
        ex.append(exit_steps_05(p))
    return ce / len(wins), ent / len(wins), torch.cat(ex)


def exit_summary(ex):
    return f"mean exit step {ex.float().mean():.3f}, histogram {[int((ex == r + 1).sum()) for r in range(R)]}"


def stage2(model, train, steps, gen, log):
    """Ouro stage II (focused adaptive gate training): the language model is frozen; only
    early_exit_gate is trained. Per token and step r < R-1 the target probability of continuing is
    w_r = sigmoid(K2 * (I_r - GAMMA)), I_r = max(0, CE_r - min_{j>r} CE_j) (how much the later steps
    still improve the detached loss); the gate's lambda_r (exit) is fitted to 1 - w_r by binary
    cross-entropy. (The paper uses the improvement of the next step, k = 50, gamma = 0.005.)"""
    gate = model.model.early_exit_gate
    opt = torch.optim.Adam(gate.parameters(), lr=LR2)
    t0, last = time.time(), time.time()
    for step, (x, y) in enumerate(batches(train, steps, gen)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            states, _ = model(x)
            ce = step_ce(model, states, y)  # [R, N]
        later = torch.flip(torch.cummin(torch.flip(ce, [0]), 0).values, [0])  # min_{j>=r} CE_j
        imp = (ce[:-1] - later[1:]).clamp(min=0)  # [R-1, N]
        target_exit = 1 - torch.sigmoid(K2 * (imp - GAMMA))
        g = model.gate(states[:-1]).flatten(1)  # [R-1, N]
        loss = F.binary_cross_entropy_with_logits(g, target_exit)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            ex = exit_steps_05(exit_log_pdf(model.gate(states)).flatten(1).exp())
        log.append([step, f"{loss.item():.4f}", f"{float(ex.float().mean()):.3f}"])
        if time.time() - last >= 30 or step == steps - 1:
            last = time.time()
            el = last - t0
            print(f"stage II step {step + 1}/{steps} BCE {loss.item():.4f} target exit mean "
                  f"{fmt(target_exit.mean(1))} train {exit_summary(ex)} | {hms(el)} elapsed, "
                  f"ETA {hms(el / (step + 1) * (steps - step - 1))}", flush=True)


# ---- export ----------------------------------------------------------------------------------
def make_config():
    spec = {"layers": LAYERS, "hidden": HIDDEN, "intermediate": INTER, "heads": HEADS, "kv_heads": KV_HEADS,
            "head_dim": None, "tied": False, "dtype": "bfloat16", "R": R}
    return gen_fixtures.make_config(spec, vocab=VOCAB, max_positions=SEQ)


def export(model, tok, out):
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sorted(sd.items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", make_config())
    write_json(out / "generation_config.json",
               {"bos_token_id": 0, "eos_token_id": [0, 2], "transformers_version": "4.54.1"})
    tok.save(str(out / "tokenizer.json"), pretty=True)
    write_json(out / "tokenizer_config.json", tokenizer_config(SEQ))
    return sum(t.numel() for t in tensors.values())


# ---- evaluation of the exported checkpoint with the reference forward pass -------------------
@torch.no_grad()
def eval_ref(out, wins, tok):
    ref = Ouro.load(out, torch.bfloat16)
    ce = torch.zeros(R)
    steps = {"threshold:0.5": [], "threshold:0.5:bf16": [], "threshold:1.0:bf16": []}
    ce_pol = {"threshold:0.5": 0.0, "weighted": 0.0}
    n = 0
    for w in wins[:REF_WINDOWS]:
        ids, y = w[:-1].tolist(), w[1:]
        hidden, lam = ref.forward(ids)
        for r in range(R):
            ce[r] += F.cross_entropy(ref.lm_head(hidden[r]), y, reduction="sum")
        for P in steps:
            steps[P].append(Ouro.exit_threshold(lam.float(), float(P.split(":")[1]), bf16_arith=P.endswith("bf16")))
        for P in ce_pol:
            logits, _ = ref.apply_policy(hidden, lam, P)
            ce_pol[P] += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(ids)
    res = {"ce_per_step": (ce / n).tolist(), "tokens": n,
           "ce_policy": {P: v / n for P, v in ce_pol.items()}}
    for P, s in steps.items():
        s = torch.cat(s)
        res[P] = {"mean_exit_step_1based": float((s + 1).float().mean()),
                  "hist": [int((s == r).sum()) for r in range(R)]}
    margins = []
    prompt = tok.encode(SAMPLE_PROMPT).ids
    gen = ref.greedy(prompt, "threshold:0.5", SAMPLE_TOKENS, margins)
    res["sample_ids"] = prompt + gen
    res["sample_text"] = tok.decode(prompt + gen)
    hidden, lam = ref.forward(prompt + gen)
    res["sample_exit_steps"] = (Ouro.exit_threshold(lam.float(), 0.5) + 1).tolist()
    res["sample_tokens"] = [tok.decode([i]) for i in prompt + gen]
    return res


def fmt(t):
    return "[" + ", ".join(f"{float(v):.3f}" for v in t) + "]"


def hms(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=STEPS, help="stage I steps")
    ap.add_argument("--steps2", type=int, default=STEPS2, help="stage II (gate only) steps")
    ap.add_argument("--out", default=str(HERE.parents[1] / "models" / "demo"))
    ap.add_argument("--stage1-ckpt", default="/tmp/train_demo_stage1.pt",
                    help="the f32 state after stage I is saved here (not shipped)")
    ap.add_argument("--from-stage1", action="store_true",
                    help="skip stage I and load --stage1-ckpt (for tuning stage II)")
    ap.add_argument("--f32", action="store_true", help="train in pure f32 instead of bf16 autocast")
    ap.add_argument("--dry-run", action="store_true", help="measure tokens/s over a few steps, write nothing")
    args = ap.parse_args()
    steps = args.steps
    out = Path(args.out)
    t0 = time.time()
    amp = not args.f32

    root, train_files, val_files = stdlib_files()
    print(f"python {platform.python_version()} stdlib {root}: {len(train_files)} train files, "
          f"{len(val_files)} validation files: {', '.join(Path(f).name for f in val_files)}")
    train_texts = [read(f) for f in train_files]
    val_texts = [read(f) for f in val_files]
    h = hashlib.sha256("".join(train_texts + val_texts).encode()).hexdigest()[:16]
    print(f"text: train {sum(map(len, train_texts))} chars, validation {sum(map(len, val_texts))} chars, sha256 {h}")
    tok = build_tokenizer(train_texts)
    train, val = encode_files(tok, train_texts), encode_files(tok, val_texts)
    print(f"tokens: train {len(train)}, validation {len(val)} "
          f"({sum(map(len, train_texts)) / len(train):.2f} chars/token); tokenizer {time.time() - t0:.1f}s")

    torch.manual_seed(SEED)
    model = OuroTrain()
    nparams = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(SEED)
    wins = val_windows(val)
    print(f"model: {nparams} parameters; stage I {steps} steps x {BATCH} x {SEQ} = {steps * BATCH * SEQ} tokens "
          f"({steps * BATCH * SEQ / len(train):.2f} epochs), beta {BETA0} -> {BETA}, gate bias init {GATE_BIAS0}, lr {LR}, "
          f"{'bf16 autocast (f32 master weights)' if amp else 'pure f32'}; stage II {args.steps2} steps "
          f"(gate only, k {K2}, gamma {GAMMA}, lr {LR2}); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")

    if args.dry_run:
        n = 6
        t1 = None
        for i, (x, y) in enumerate(batches(train, n, gen)):
            if i == 1:
                t1 = time.time()  # skip the first (warm-up) step
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss, ce, ent, p = loss_fn(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            print(f"dry step {i} loss {loss.item():.3f} ce {fmt(ce)} {time.time() - t0:.1f}s", flush=True)
        dt = (time.time() - t1) / (n - 1)
        print(f"{dt:.2f} s/step, {BATCH * SEQ / dt:.0f} tokens/s; 22 min = {int(22 * 60 / dt)} steps")
        return

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.from_stage1:
        ck = torch.load(args.stage1_ckpt)
        model.load_state_dict(ck["model"])
        gen.set_state(ck["gen"])
        rows, train_time = ck["rows"], ck["train_time"]
        print(f"loaded stage I state from {args.stage1_ckpt} ({hms(train_time)} of training)")
    else:
        t_train, last_print = time.time(), time.time()
        ema = None
        for step, (x, y) in enumerate(batches(train, steps, gen)):
            lr, beta = lr_at(step, steps), beta_at(step, steps)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss, ce, ent, p = loss_fn(model, x, y, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            if step % LOG_EVERY == 0 or step == steps - 1:
                ex = exit_steps_05(p)
                rows.append([step, f"{loss.item():.4f}"] + [f"{float(c):.4f}" for c in ce]
                            + [f"{float(ent):.4f}"] + [f"{float(v):.4f}" for v in p.mean(1)]
                            + [f"{float(ex.float().mean()):.3f}", f"{lr:.6f}", f"{beta:.4f}"])
            now = time.time()
            if now - last_print >= 30 or step == steps - 1:
                last_print = now
                el = now - t_train
                eta = el / (step + 1) * (steps - step - 1)
                print(f"step {step + 1}/{steps} loss {loss.item():.3f} (ema {ema:.3f}) ce/step {fmt(ce)} "
                      f"H(p) {float(ent):.3f} mean p {fmt(p.mean(1))} {exit_summary(exit_steps_05(p))} "
                      f"|g| {float(gnorm):.2f} lr {lr:.2e} beta {beta:.3f} | {hms(el)} elapsed, ETA {hms(eta)}, "
                      f"{BATCH * SEQ * (step + 1) / el:.0f} tok/s", flush=True)
        train_time = time.time() - t_train
        torch.save({"model": model.state_dict(), "gen": gen.get_state(), "rows": rows,
                    "train_time": train_time}, args.stage1_ckpt)

    model.eval()
    ce1, ent1, ex1 = eval_f32(model, wins)
    print(f"after stage I, validation f32 ({len(wins) * SEQ} tokens): CE per step {fmt(ce1)}, "
          f"H(p) {ent1:.3f}, threshold:0.5 {exit_summary(ex1)}", flush=True)
    log2 = []
    t2 = time.time()
    if args.steps2:
        stage2(model, train, args.steps2, gen, log2)
    time2 = time.time() - t2
    ce_val, ent_val, ex_val = eval_f32(model, wins)

    with open(out / "loss_curve.csv", "w", newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(["step", "train_loss"] + [f"ce_step{r + 1}" for r in range(R)]
                    + ["exit_entropy"] + [f"mean_p{r + 1}" for r in range(R)] + ["mean_exit_step_t05", "lr", "beta"])
        wr.writerows(rows)

    nweights = export(model, tok, out)
    res = eval_ref(out, wins, tok)
    summary = {
        "python_version": platform.python_version(), "torch_version": torch.__version__,
        "stdlib_sha256_16": h, "train_files": len(train_files),
        "validation_files": [Path(f).name for f in val_files],
        "train_tokens_available": len(train), "validation_tokens": len(val),
        "parameters": nparams, "exported_parameters": nweights,
        "stage1": {"steps": steps, "batch": BATCH, "seq": SEQ, "tokens_seen": steps * BATCH * SEQ,
                   "seconds": round(train_time, 1), "beta_start": BETA0, "beta_end": BETA, "gate_bias_init": GATE_BIAS0, "embed_init_std": EMBED_STD, "lr": LR, "warmup": WARMUP,
                   "weight_decay": WD, "autocast_bf16": amp},
        "stage2": {"steps": args.steps2, "tokens_seen": args.steps2 * BATCH * SEQ, "seconds": round(time2, 1),
                   "k": K2, "gamma": GAMMA, "lr": LR2},
        "val_f32_after_stage1": {"ce_per_step": ce1.tolist(), "exit_entropy": ent1,
                                 "mean_exit_step_t05": float(ex1.float().mean()),
                                 "hist_t05": [int((ex1 == r + 1).sum()) for r in range(R)]},
        "val_f32": {"ce_per_step": ce_val.tolist(), "exit_entropy": ent_val, "tokens": len(wins) * SEQ,
                    "mean_exit_step_t05": float(ex_val.float().mean()),
                    "hist_t05": [int((ex_val == r + 1).sum()) for r in range(R)]},
        "val_bf16_ref": {k: v for k, v in res.items() if not k.startswith("sample")},
        "sample": {"prompt": SAMPLE_PROMPT, "policy": "threshold:0.5", "text": res["sample_text"],
                   "exit_steps_1based": res["sample_exit_steps"]},
    }
    write_json(out / "train_summary.json", summary)

    print("=" * 100)
    print(f"stage I: {steps} steps, {steps * BATCH * SEQ} tokens seen, {hms(train_time)}; "
          f"stage II: {args.steps2} steps, {args.steps2 * BATCH * SEQ} tokens, {hms(time2)}")
    print("loss curve (step: train loss | CE per step r=1..4 | mean exit step at threshold:0.5):")
    stride = max(1, len(rows) // 12)
    for row in rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else []):
        print(f"  {row[0]:>6}: {row[1]} | {', '.join(row[2:2 + R])} | {row[-3]}")
    print(f"validation f32 after stage I ({len(wins) * SEQ} tokens): CE per step {fmt(ce1)}, threshold:0.5 {exit_summary(ex1)}")
    print(f"validation f32 final: CE per step {fmt(ce_val)}, H(p) {ent_val:.3f}, threshold:0.5 {exit_summary(ex_val)}")
    print(f"validation bf16 via ouro_ref.py ({res['tokens']} tokens): CE per step {fmt(res['ce_per_step'])}, "
          f"CE threshold:0.5 {res['ce_policy']['threshold:0.5']:.3f}, weighted {res['ce_policy']['weighted']:.3f}")
    for P in ("threshold:0.5", "threshold:0.5:bf16", "threshold:1.0:bf16"):
        print(f"  {P:19s} mean exit step (1..{R}) {res[P]['mean_exit_step_1based']:.3f}, histogram {res[P]['hist']}")
    print(f"sample (greedy, threshold:0.5, bf16) from {SAMPLE_PROMPT!r}:\n{res['sample_text']}")
    print("exit step per token:", " ".join(f"{t!r}:{s}" for t, s in zip(res["sample_tokens"], res["sample_exit_steps"])))
    print(f"total wall time {hms(time.time() - t0)}")


if __name__ == "__main__":
    main()
