"""A load test of `ouroc serve`: many concurrent clients send greedy requests (chat and text
completions, streaming and not); every answer must be complete and identical, text, finish
reason, token counts and exit depths, to the same request served alone. Standard library only.

    python tests/serve/load.py http://127.0.0.1:8080 [--clients 16] [--requests 320]
        [--distinct 24] [--max-tokens 24]

First each distinct request is served alone, one after the other (the reference); then
--requests requests, drawn in turn from them, are sent by --clients threads at once. Prints
the throughput; exits non-zero on the first difference. tests/serve.rs runs a small size.
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "def ",
    "import os\n",
    "class Parser:\n",
    "for i in range(",
    "return self.",
    "# Licensed under",
    "def __init__(self",
    "with open(",
    "if __name__ ==",
    "try:\n    ",
    "from collections import",
    "raise ValueError(",
]


def requests(distinct, max_tokens):
    """The distinct requests: (path, body) pairs, half chat, half completions, some streamed."""
    out = []
    for i in range(distinct):
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"max_tokens": 1 + (max_tokens * (i + 3)) // (distinct + 2), "temperature": 0}
        if i % 2:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            path = "/v1/completions"
            body["prompt"] = prompt
        if i % 3 == 0:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        out.append((path, body))
    return out


def post(host, port, path, body):
    """The answer as (text, finish_reason, usage, exit_depths), from JSON or a complete stream."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read().decode()
        if resp.status != 200:
            raise AssertionError(f"{path}: HTTP {resp.status}: {raw}")
    finally:
        conn.close()
    chat = "chat" in path
    if not body.get("stream"):
        v = json.loads(raw)
        c = v["choices"][0]
        text = c["message"]["content"] if chat else c["text"]
        return text, c["finish_reason"], v["usage"], v["ouroc"]["exit_depths"]
    data = [line[len("data: ") :] for line in raw.split("\n") if line.startswith("data: ")]
    if not data or data[-1] != "[DONE]":
        raise AssertionError(f"{path}: the stream did not end with [DONE]: {raw[-300:]!r}")
    text, finish, usage, depths = "", None, None, []
    for d in data[:-1]:
        v = json.loads(d)
        if "error" in v:
            raise AssertionError(f"{path}: error in the stream: {v}")
        if v.get("usage"):
            usage = v["usage"]
        for c in v["choices"]:
            text += (c["delta"].get("content") or "") if chat else c["text"]
            finish = c["finish_reason"] or finish
        depths += v.get("ouroc", {}).get("exit_depths", [])
    return text, finish, usage, depths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_url")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--distinct", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    url = urllib.parse.urlparse(args.base_url)
    host, port = url.hostname, url.port or 80

    todo = requests(args.distinct, args.max_tokens)
    t = time.time()
    alone = [post(host, port, p, b) for p, b in todo]
    for (path, body), (text, finish, usage, depths) in zip(todo, alone):
        if finish not in ("stop", "length") or len(depths) != usage["completion_tokens"]:
            raise AssertionError(f"{path} {body}: incomplete answer {finish} {usage} {depths}")
    print(f"reference: {len(todo)} requests alone in {time.time() - t:.1f} s")

    failures, lock, next_index = [], threading.Lock(), [0]
    tokens = [0]

    def client():
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= args.requests or failures:
                return
            path, body = todo[i % len(todo)]
            try:
                got = post(host, port, path, body)
                if got != alone[i % len(todo)]:
                    raise AssertionError(
                        f"request {i} ({path} {json.dumps(body)}) differs from the same request alone:\n"
                        f"  alone: {alone[i % len(todo)]}\n  load:  {got}"
                    )
                with lock:
                    tokens[0] += got[2]["completion_tokens"]
            except Exception as e:  # noqa: BLE001 - every failure is reported
                with lock:
                    failures.append(e)

    t = time.time()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.time() - t
    if failures:
        print(f"FAILED: {failures[0]}", file=sys.stderr)
        sys.exit(1)
    print(
        f"load: {args.requests} requests from {args.clients} clients in {dt:.1f} s "
        f"({args.requests / dt:.1f} requests/s, {tokens[0] / dt:.0f} generated tokens/s), "
        "every answer identical to the request alone"
    )


if __name__ == "__main__":
    main()
