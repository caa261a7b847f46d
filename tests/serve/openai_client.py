"""`ouroc serve` through the official `openai` Python package: the model list, chat and text
completions, streaming and not (the streamed text equals the whole answer), usage, the `ouroc`
extension (one exit depth per generated token), stop strings, and errors as the package's
exception classes.

    python tests/serve/openai_client.py http://127.0.0.1:8080 [MODEL]

MODEL defaults to the first one /v1/models lists. Exits non-zero on the first failure; needs
`pip install openai`. tests/serve.rs runs it with the Python in $OUROC_PYTHON.
"""

import sys

import openai


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def extension(obj):
    """The `ouroc` object the server adds (an extra field to the package's models)."""
    extra = obj.model_extra or {}
    check("ouroc" in extra, f"no `ouroc` extension in {obj}")
    return extra["ouroc"]


def main():
    base = sys.argv[1].rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)

    models = [m.id for m in client.models.list()]
    check(len(models) == 1, f"one model served, got {models}")
    model = sys.argv[2] if len(sys.argv) > 2 else models[0]
    check(model in models, f"{model} in {models}")
    print(f"ok: models {models}")

    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "A function that adds two numbers."},
    ]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    choice = whole.choices[0]
    check(whole.object == "chat.completion", whole.object)
    check(whole.id.startswith("chatcmpl-"), whole.id)
    check(choice.message.role == "assistant", choice.message.role)
    check(isinstance(choice.message.content, str), choice)
    check(choice.finish_reason in ("stop", "length"), choice.finish_reason)
    usage = whole.usage
    check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage)
    check(1 <= usage.completion_tokens <= 16, usage)
    depths = extension(whole)["exit_depths"]
    check(len(depths) == usage.completion_tokens, f"{depths} for {usage}")
    print(f"ok: chat {choice.message.content!r} ({choice.finish_reason}, depths {depths})")

    text, streamed_depths, finish, usage_seen, roles = "", [], None, None, []
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        check(chunk.object == "chat.completion.chunk", chunk.object)
        if chunk.usage is not None:
            usage_seen = chunk.usage
            check(chunk.choices == [], chunk)
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        text += delta.content or ""
        streamed_depths += extension(chunk)["exit_depths"]
        finish = chunk.choices[0].finish_reason or finish
    check(roles == ["assistant"], roles)
    check(text == choice.message.content, f"streamed {text!r} != {choice.message.content!r}")
    check(streamed_depths == depths, f"{streamed_depths} != {depths}")
    check(finish == choice.finish_reason, finish)
    check(usage_seen is not None and usage_seen.completion_tokens == usage.completion_tokens, usage_seen)
    print("ok: streamed chat equals the whole answer")

    prompt = "def fibonacci(n):"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    check(whole.object == "text_completion", whole.object)
    check(whole.id.startswith("cmpl-"), whole.id)
    full = whole.choices[0].text
    check(len(extension(whole)["exit_depths"]) == whole.usage.completion_tokens, whole)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    )
    check(streamed == full, f"streamed {streamed!r} != {full!r}")
    print(f"ok: completion {full!r}")

    # A stop string from the middle of the greedy text cuts it before its first occurrence.
    if len(full) >= 4:
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        cut = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
        check(cut.choices[0].text == full[: full.index(stop)], f"stop {stop!r}: {cut.choices[0].text!r}")
        check(cut.choices[0].finish_reason == "stop", cut.choices[0].finish_reason)
        print(f"ok: stop {stop!r}")

    # The exit extension through extra_body: step:0 exits every token at depth 1.
    early = client.completions.create(
        model=model, prompt=prompt, max_tokens=6, temperature=0, extra_body={"exit": "step:0"}
    )
    check(set(extension(early)["exit_depths"]) == {1}, extension(early))
    print("ok: exit step:0")

    for what, call, error in [
        (
            "unknown model",
            lambda: client.chat.completions.create(model="no-such-model", messages=messages),
            openai.NotFoundError,
        ),
        (
            "temperature out of range",
            lambda: client.chat.completions.create(model=model, messages=messages, temperature=5),
            openai.BadRequestError,
        ),
        (
            "n > 1",
            lambda: client.completions.create(model=model, prompt="x", n=2),
            openai.BadRequestError,
        ),
    ]:
        try:
            call()
        except error as e:
            body = e.body or {}
            check(isinstance(body, dict) and body.get("message"), f"{what}: {e.body}")
            print(f"ok: {what} -> {e.status_code} {body.get('message')!r}")
        else:
            raise AssertionError(f"{what}: no error")
    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
