"""Talk to kvcluster's Serve app with the official ``openai`` package, unchanged.

    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 --api-key sk-example-alpha

Sends a prompt, then the same documents in another order (the cluster finds the first prompt by
meaning, reuses its KV and repairs it with DHD: see ``usage.prompt_tokens_details.cached_tokens``),
then streams a third request.
"""
from __future__ import annotations

import argparse
import time

import openai

DOCS = [
    "The Danube flows through ten countries, from the Black Forest in Germany to the Black Sea.",
    "The Rhine rises in the Swiss Alps and flows through Germany and the Netherlands into the North Sea.",
    "The Volga is the longest river in Europe; it flows through central Russia into the Caspian Sea.",
]


def ask(client: openai.OpenAI, model: str, order: list[int], question: str) -> None:
    content = " ".join(DOCS[i] for i in order) + "\nQuestion: " + question
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       max_tokens=32, temperature=0)
    u = r.usage
    print(f"[{time.perf_counter() - t0:5.2f} s] prompt {u.prompt_tokens} tokens, cached "
          f"{u.prompt_tokens_details.cached_tokens}: {r.choices[0].message.content!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="sk-example-alpha")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    print("models:", [m.id for m in client.models.list().data])
    ask(client, args.model, [0, 1, 2], "Which river is the longest?")
    ask(client, args.model, [2, 0, 1], "Which river is the longest?")  # reordered: reused
    print("streaming: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=args.model, max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": " ".join(DOCS) + "\nQuestion: Where does the Rhine rise?"}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n(cached {chunk.usage.prompt_tokens_details.cached_tokens} of "
                  f"{chunk.usage.prompt_tokens} prompt tokens)")


if __name__ == "__main__":
    main()
