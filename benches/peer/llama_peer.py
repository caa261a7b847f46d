"""The llama.cpp peer of `ouroc bench`: the checkpoint unrolled into a plain llama GGUF.

    python benches/peer/llama_peer.py CKPT [--weights bf16|q8_0|q4_0] [--threads 2] [--runs 3]
        [--prefill-tokens 128] [--decode-tokens 32] [--json FILE] [--gguf-dir DIR] [--check]

llama.cpp has no Ouro support, so the checkpoint (config.json + model.safetensors or a sharded
index) is converted into a GGUF of the "llama" architecture with the loop UNROLLED: L*R blocks,
block r*L + i holding layer i's weights (the loop runs layers 0..L-1, R times). Every block has
its own KV cache, as every (loop step, layer) slot of Ouro has, so llama.cpp does the matrix work
of `ouroc bench --exit last` per token: the same shapes, the same number of matrix products and
attention over the same number of cached positions. Written with the `gguf` package:
token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
ffn_down}, output_norm, output. Matrices are GGML BF16 (--weights bf16, the checkpoint's bf16
bits unchanged) or Q8_0 / Q4_0 (`gguf.quants.quantize`; a matrix whose row length is not a
multiple of 32 stays BF16, as llama.cpp's own converter does); norm weights are F32.

What the GGUF leaves out compared with Ouro (so llama.cpp does slightly LESS work per token, all
of it vector work, no matrix products):
  * the two extra RMSNorms per layer, input_layernorm_2 (on the attention output) and
    post_attention_layernorm_2 (on the MLP output): llama has only attn_norm (= input_layernorm)
    and ffn_norm (= post_attention_layernorm);
  * model.norm after each of the first R-1 loop steps (llama applies output_norm = model.norm
    once, after the last block), so the next step starts from the un-normalised h;
  * the exit gate (a [H] dot product and a sigmoid per token per step).
So the GGUF computes a different function than Ouro (its logits are not Ouro's), but the timed
work is the same matrices. Two more differences: the L layers' weights are stored R times
(a GGUF cannot alias tensor data), so llama.cpp streams R distinct copies where ouroc rereads
one (the same bytes from DRAM when the layers do not fit in cache, as at the 1.4B shape; at
shapes whose layers fit in the last-level cache ouroc gains from the reuse and llama.cpp cannot),
and the file is R times the checkpoint's layer bytes on disk. Q/K rows are permuted from Hugging
Face's rotate-half RoPE layout into llama.cpp's interleaved one, as convert_hf_to_gguf.py does.
The tokenizer is a dummy SentencePiece vocabulary of vocab_size tokens (<unk>, <s>, </s>, the
256 byte tokens, then placeholders): the benchmark feeds token ids, never text.

The GGUF is cached in --gguf-dir (default: $TMPDIR/ouroc-llama-peer) under a name keyed by the
checkpoint's path, its files' sizes and mtimes and the weight type, and reused on later runs.

Timing, as torch_ouro.py: per run, reset the context, time `Llama.eval(prompt)` on
--prefill-tokens random ids (one batch: n_batch = n_ubatch = prompt length) -> prefill
tokens/s, then --decode-tokens greedy steps of `Llama.eval([argmax of the last logits])` ->
decode tokens/s; medians over --runs. One untimed token is evaluated first so the mmapped
weights are paged in. `--json FILE` writes prefill_tokens_per_s and decode_tokens_per_s (the
keys of torch_ouro.py) plus engine, weights and threads, for compare.py.

`--check` first compares llama.cpp's logits on an 8-token prompt (prefill, then the last token
again through the KV cache) with a NumPy f32 forward of the same unrolled llama model (the
weights as the GGUF stores them, dequantised), so the conversion is known to be what llama.cpp
runs; it also prints how far that model is from full Ouro (with the norms above) on the same ids.
"""
import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONVERTER_VERSION = 1  # bump when the GGUF layout changes, so cached files are rebuilt
QK = 32  # block length of Q8_0 and Q4_0


# ---- checkpoint reading (NumPy only: no torch, no safetensors package needed) --------------
class Checkpoint:
    def __init__(self, path):
        self.path = Path(path).resolve()
        self.cfg = json.loads((self.path / "config.json").read_text())
        single = self.path / "model.safetensors"
        if single.exists():
            files = [single]
        else:
            index = json.loads((self.path / "model.safetensors.index.json").read_text())
            files = [self.path / f for f in sorted(set(index["weight_map"].values()))]
        self.files = files
        self.where = {}  # name -> (file, dtype, shape, start, end)
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                s, e = info["data_offsets"]
                self.where[name] = (f, info["dtype"], info["shape"], 8 + n + s, 8 + n + e)
        self._maps = {}

    def has(self, name):
        return name in self.where

    def _raw(self, name):
        f, dtype, shape, s, e = self.where[name]
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        np_dtype = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}.get(dtype)
        if np_dtype is None:
            sys.exit(f"{name}: unsupported safetensors dtype {dtype}")
        return dtype, self._maps[f][s:e].view(np_dtype).reshape(shape)

    def bf16_bits(self, name):
        """The tensor as bfloat16 bits (uint16); f16/f32 are rounded to nearest even."""
        dtype, a = self._raw(name)
        return a if dtype == "BF16" else f32_to_bf16_bits(a.astype(np.float32))

    def f32(self, name):
        dtype, a = self._raw(name)
        if dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)

    def fingerprint(self):
        h = hashlib.sha256(str(self.path).encode())
        for f in [self.path / "config.json", *self.files]:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]


def f32_to_bf16_bits(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def dims(cfg):
    for key in ("rope_scaling",):
        if cfg.get(key) is not None:
            sys.exit(f"unsupported config key: {key}")
    if cfg.get("use_sliding_window"):
        sys.exit("unsupported config key: use_sliding_window")
    H, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, H // heads):
        sys.exit("unsupported config key: head_dim (other than hidden_size / num_attention_heads)")
    return dict(H=H, I=cfg["intermediate_size"], L=cfg["num_hidden_layers"], R=cfg["total_ut_steps"],
                V=cfg["vocab_size"], heads=heads, kv_heads=cfg.get("num_key_value_heads", heads),
                hd=H // heads, eps=cfg["rms_norm_eps"], theta=float(cfg["rope_theta"]))


def permute_rope(w, n_head):
    """Rows of q/k_proj from rotate-half to llama.cpp's interleaved pairs (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- conversion ---------------------------------------------------------------------------
LAYER_MATRICES = [  # (GGUF name, Ouro name, permuted for RoPE with n heads of this key)
    ("attn_q", "self_attn.q_proj", "heads"), ("attn_k", "self_attn.k_proj", "kv_heads"),
    ("attn_v", "self_attn.v_proj", None), ("attn_output", "self_attn.o_proj", None),
    ("ffn_gate", "mlp.gate_proj", None), ("ffn_up", "mlp.up_proj", None), ("ffn_down", "mlp.down_proj", None),
]


def gguf_path(ck, weights, gguf_dir):
    d = Path(gguf_dir) if gguf_dir else Path(tempfile.gettempdir()) / "ouroc-llama-peer"
    return d / f"{ck.path.name}-{ck.fingerprint()}-v{CONVERTER_VERSION}-{weights}.gguf"


def stored_matrix(gguf, bits, weights):
    """(data, ggml type) of a [out, in] matrix given as bf16 bits, as the GGUF stores it."""
    T = gguf.GGMLQuantizationType
    if weights == "bf16" or bits.shape[-1] % QK:
        return np.ascontiguousarray(bits), T.BF16
    qtype = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[weights]
    return gguf.quants.quantize(bf16_bits_to_f32(bits), qtype), qtype


def convert(ck, weights, out):
    import gguf
    d = dims(ck.cfg)
    L, R = d["L"], d["R"]
    ftype = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[weights]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    t0 = time.perf_counter()
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"{ck.path.name} (Ouro unrolled {L}x{R}, ouroc llama peer)")
    w.add_context_length(max(int(ck.cfg.get("max_position_embeddings", 4096)), 4096))
    w.add_embedding_length(d["H"])
    w.add_block_count(L * R)
    w.add_feed_forward_length(d["I"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    w.add_rope_dimension_count(d["hd"])
    w.add_rope_freq_base(d["theta"])
    w.add_layer_norm_rms_eps(d["eps"])
    w.add_vocab_size(d["V"])
    w.add_file_type(ftype)
    # A dummy SentencePiece vocabulary: ids only are ever fed.
    V = d["V"]
    if V < 3 + 256:
        sys.exit(f"vocab_size {V} is below the 259 tokens of the dummy vocabulary")
    TT = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TT.UNKNOWN, TT.CONTROL, TT.CONTROL] + [TT.BYTE] * 256
    tokens += [f"<ouro_{i}>" for i in range(len(tokens), V)]
    types += [TT.NORMAL] * (V - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * V)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    fallback = set()

    def matrix(bits):
        data, qtype = stored_matrix(gguf, bits, weights)
        if weights != "bf16" and qtype == gguf.GGMLQuantizationType.BF16:
            fallback.add(bits.shape)
        return data, qtype

    def add(name, data, qtype):
        w.add_tensor(name, data, raw_dtype=qtype)

    head = "lm_head.weight" if ck.has("lm_head.weight") else "model.embed_tokens.weight"
    add("token_embd.weight", *matrix(ck.bf16_bits("model.embed_tokens.weight")))
    layers = []
    for i in range(L):
        p = f"model.layers.{i}."
        lay = {"attn_norm": ck.f32(p + "input_layernorm.weight"),
               "ffn_norm": ck.f32(p + "post_attention_layernorm.weight")}
        for gname, oname, perm in LAYER_MATRICES:
            bits = ck.bf16_bits(p + oname + ".weight")
            if perm:
                bits = permute_rope(bits, d[perm])
            lay[gname] = matrix(bits)
        layers.append(lay)
    for r in range(R):
        for i, lay in enumerate(layers):
            b = r * L + i
            for key in ("attn_norm", "ffn_norm"):
                add(f"blk.{b}.{key}.weight", lay[key], gguf.GGMLQuantizationType.F32)
            for gname, _, _ in LAYER_MATRICES:
                add(f"blk.{b}.{gname}.weight", *lay[gname])
    add("output_norm.weight", ck.f32("model.norm.weight"), gguf.GGMLQuantizationType.F32)
    add("output.weight", *matrix(ck.bf16_bits(head)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    note = f" ({', '.join(f'{s[0]}x{s[1]}' for s in sorted(fallback))} kept bf16: rows not a multiple of {QK})" \
        if fallback else ""
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {L * R} blocks = {L} layers x {R} steps, "
          f"{weights}{note}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


# ---- NumPy reference for --check ------------------------------------------------------------
def reference_logits(ck, weights, ids, ouro):
    """Logits [T, V] in f32 of the unrolled llama model as the GGUF stores it (ouro=False), or of
    full Ouro with its extra norms (ouro=True; bf16 weights), for the prompt `ids`."""
    import gguf
    d = dims(ck.cfg)
    H, hd, heads, kvh, eps = d["H"], d["hd"], d["heads"], d["kv_heads"], d["eps"]

    def mat(name):
        bits = ck.bf16_bits(name)
        if ouro:
            return bf16_bits_to_f32(bits)
        data, qtype = stored_matrix(gguf, bits, weights)
        if qtype == gguf.GGMLQuantizationType.BF16:
            return bf16_bits_to_f32(data)
        return gguf.quants.dequantize(data, qtype).reshape(bits.shape).astype(np.float32)

    def norm(x, wname):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * ck.f32(wname)

    T = len(ids)
    inv = 1.0 / (d["theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    ang = np.arange(T, dtype=np.float32)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [T, n, hd], rotate-half layout (unpermuted weights)
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + np.concatenate([-x2, x1], -1) * sin[:, None]

    mats = {}
    for i in range(d["L"]):
        p = f"model.layers.{i}."
        for _, oname, _ in LAYER_MATRICES:
            mats[p + oname] = mat(p + oname + ".weight")
    head = "lm_head.weight" if ck.has("lm_head.weight") else "model.embed_tokens.weight"
    h = mat("model.embed_tokens.weight")[np.array(ids)]
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    for r in range(d["R"]):
        for i in range(d["L"]):
            p = f"model.layers.{i}."
            x = norm(h, p + "input_layernorm.weight")
            q = rope((x @ mats[p + "self_attn.q_proj"].T).reshape(T, heads, hd))
            k = rope((x @ mats[p + "self_attn.k_proj"].T).reshape(T, kvh, hd))
            v = (x @ mats[p + "self_attn.v_proj"].T).reshape(T, kvh, hd)
            k, v = np.repeat(k, heads // kvh, 1), np.repeat(v, heads // kvh, 1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = np.einsum("hts,shd->thd", s, v).reshape(T, heads * hd) @ mats[p + "self_attn.o_proj"].T
            h = h + (norm(a, p + "input_layernorm_2.weight") if ouro else a)
            x = norm(h, p + "post_attention_layernorm.weight")
            g, u = x @ mats[p + "mlp.gate_proj"].T, x @ mats[p + "mlp.up_proj"].T
            m = (g / (1 + np.exp(-g)) * u) @ mats[p + "mlp.down_proj"].T
            h = h + (norm(m, p + "post_attention_layernorm_2.weight") if ouro else m)
        if ouro or r == d["R"] - 1:
            h = norm(h, "model.norm.weight")
    return h @ mat(head).T


# ---- llama.cpp --------------------------------------------------------------------------------
def random_ids(n, vocab, seed=1):
    """torch_ouro.py's ids when torch is importable here, else NumPy's (timing does not care)."""
    try:
        import torch
    except ImportError:
        return np.random.default_rng(seed).integers(0, vocab, n).tolist(), f"numpy seed {seed}"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist(), f"torch seed {seed} (as torch_ouro.py)"


def last_logits(llama_cpp, llm, n_vocab):
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # waits for the computation
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="checkpoint directory")
    ap.add_argument("--weights", choices=["bf16", "q8_0", "q4_0"], default="bf16")
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf-dir", help="where converted GGUFs are cached (default: $TMPDIR/ouroc-llama-peer)")
    ap.add_argument("--check", action="store_true", help="compare llama.cpp with a NumPy forward first")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (default: off, "
                    "llama-cpp-python's default)")
    ap.add_argument("--json", help="write the medians to this file")
    a = ap.parse_args()
    if a.runs < 1 or a.prefill_tokens < 1 or a.decode_tokens < 0:
        sys.exit("--runs and --prefill-tokens must be at least 1")
    ck = Checkpoint(a.ckpt)
    d = dims(ck.cfg)
    path = gguf_path(ck, a.weights, a.gguf_dir)
    if path.exists():
        print(f"using cached {path}", file=sys.stderr)
    else:
        convert(ck, a.weights, path)

    import llama_cpp
    n_ctx = a.prefill_tokens + a.decode_tokens + 8
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=a.threads, n_threads_batch=a.threads,
                          n_batch=max(a.prefill_tokens, 8), n_ubatch=max(a.prefill_tokens, 8),
                          logits_all=False, flash_attn=a.flash_attn, verbose=False)
    n_vocab = llm.n_vocab()
    assert n_vocab == d["V"], (n_vocab, d["V"])
    if a.check:
        ids, _ = random_ids(8, d["V"])
        llm.reset()
        llm.eval(ids)
        pre = last_logits(llama_cpp, llm, n_vocab).copy()
        llm.reset()
        llm.eval(ids[:-1])
        llm.eval(ids[-1:])
        dec = last_logits(llama_cpp, llm, n_vocab).copy()
        want = reference_logits(ck, a.weights, ids, ouro=False)[-1]
        ouro = reference_logits(ck, a.weights, ids, ouro=True)[-1]
        tol = 5e-2
        scale = np.abs(want).max()
        ok = True
        for what, x in [("prefill", pre), ("decode through the KV cache", dec)]:
            err = np.abs(x - want).max() / scale
            print(f"check {what} vs NumPy unrolled llama ({a.weights} weights): max relative difference "
                  f"{err:.2e} (limit {tol}), argmax {int(x.argmax())} vs {int(want.argmax())}, "
                  f"finite {bool(np.isfinite(x).all())}, std {x.std():.3g}")
            ok &= bool(err <= tol and np.isfinite(x).all() and x.std() > 0)
        err = np.abs(ouro - want).max() / np.abs(ouro).max()
        print(f"for information: unrolled llama vs full Ouro (extra norms, bf16): max relative difference "
              f"{err:.2e}, argmax {int(want.argmax())} vs {int(ouro.argmax())}")
        if not ok:
            sys.exit("llama.cpp does not compute the converted model")
    ids, ids_from = random_ids(a.prefill_tokens, d["V"])
    llm.reset()
    llm.eval(ids[:1])  # untimed: pages the mmapped weights in
    last_logits(llama_cpp, llm, n_vocab)
    prefill, decode = [], []
    for run in range(a.runs):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        logits = last_logits(llama_cpp, llm, n_vocab)
        prefill.append(len(ids) / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(a.decode_tokens):
            llm.eval([int(logits.argmax())])
            logits = last_logits(llama_cpp, llm, n_vocab)
        if a.decode_tokens:
            decode.append(a.decode_tokens / (time.perf_counter() - t))
        if not np.isfinite(logits).all():
            sys.exit("llama.cpp produced non-finite logits")
        print(f"[llama.cpp {a.weights}] run {run + 1}/{a.runs}: prefill {prefill[-1]:.2f} tokens/s, "
              f"decode {decode[-1] if decode else float('nan'):.2f} tokens/s", file=sys.stderr)
    res = {
        "engine": f"llama-cpp-python {llama_cpp.__version__}",
        "weights": a.weights,
        "threads": a.threads,
        "flash_attn": a.flash_attn,
        "prefill_tokens": a.prefill_tokens,
        "decode_tokens": a.decode_tokens,
        "runs": a.runs,
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode) if decode else None,
        "blocks": d["L"] * d["R"],
        "gguf": str(path),
        "gguf_bytes": path.stat().st_size,
        "prompt_ids": ids_from,
    }
    dec = res["decode_tokens_per_s"]
    print(f"llama.cpp {a.weights}, {a.threads} threads: prefill {res['prefill_tokens_per_s']:.2f} tokens/s, "
          f"decode {dec if dec is not None else float('nan'):.2f} tokens/s (median of {a.runs}; "
          f"{d['L']}x{d['R']} = {d['L'] * d['R']} unrolled blocks)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
