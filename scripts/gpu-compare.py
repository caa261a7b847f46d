#!/usr/bin/env python3
"""`ouroc logits --out` against a fixture's golden file, for the GPU package.

Part of the package `scripts/gpu-check.sh --package` writes (copied there as
compare.py): it runs on the GPU machine with python3 alone (no numpy, no
network), so it reads safetensors with struct and json.

    compare.py prompt GOLDEN.safetensors
        prints "IDS POLICY": the golden prompt's ids (comma-separated) and
        the exit policy to check (threshold:0.5 when the golden file has
        it, else its first policy).
    compare.py check GOLDEN.safetensors OUT.safetensors PREC POLICY
        compares OUT's logits and exit steps with the golden ones of PREC
        and POLICY (the golden tolerance of tests/golden.rs: f32 1e-4,
        bf16 2e-2 of the largest logit); exit status 1 on a mismatch.
"""

import json
import struct
import sys

TOL = {"f32": 1e-4, "bf16": 2e-2}


def read(path):
    """name -> (shape, values) of every F32 / I32 tensor, and the metadata."""
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, t in header.items():
        code = {"F32": "f", "I32": "i"}.get(t["dtype"])
        if code is None:
            continue
        s, e = t["data_offsets"]
        data = b[8 + n + s : 8 + n + e]
        out[name] = (t["shape"], struct.unpack("<%d%s" % (len(data) // 4, code), data))
    return out, meta


def prompt(golden):
    tensors, meta = read(golden)
    policies = [p for p in meta.get("policies", "").split(",") if p]
    pol = "threshold:0.5" if "threshold:0.5" in policies else (policies or ["last"])[0]
    ids = ",".join(str(x) for x in tensors["prompt_ids"][1])
    print(ids, pol)


def check(golden, out, prec, pol):
    want, _ = read(golden)
    got, _ = read(out)
    ok = True
    wl = want["%s/%s/logits" % (prec, pol)][1]
    gl = got["logits"][1]
    if len(wl) != len(gl):
        print("logits: %d values, golden %d" % (len(gl), len(wl)))
        return 1
    scale = max(max(abs(x) for x in wl), 1e-30)
    err = max(abs(a - b) for a, b in zip(gl, wl)) / scale
    finite = all(x == x and abs(x) != float("inf") for x in gl)
    ok &= err <= TOL[prec] and finite
    we = list(want["%s/%s/exit_step" % (prec, pol)][1])
    ge = list(got["exit_step"][1])
    ok &= we == ge
    print(
        "logits relative error %.2e (tolerance %.0e)%s; exit steps %s%s"
        % (err, TOL[prec], "" if finite else ", NOT FINITE", ge, "" if we == ge else " (golden %s)" % we)
    )
    return 0 if ok else 1


def main(argv):
    if len(argv) == 3 and argv[1] == "prompt":
        prompt(argv[2])
        return 0
    if len(argv) == 6 and argv[1] == "check":
        return check(*argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
