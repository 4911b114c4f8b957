"""A bounded load test of serving: the in-process chat model against the uvicorn server.

For each fixture and concurrency, the same multimodal requests (a data-URL image, 8 new tokens)
go to ``ChatGuardedVLM.invoke`` from a thread pool, and to ``guardrail serve``'s app on a
loopback port through the openai SDK. Prints throughput, p50/p99 latency, errors and unguarded
multimodal answers for each, and the server's throughput as a ratio to in-process in the same
run; a final JSON line. Ray Serve is not measured (not built yet).

    python bench/serve.py [--fixtures tiny smollm] [--requests 200 40] [--concurrency 1 4 16]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch
import uvicorn
from langchain_core.messages import HumanMessage

from adapters.langchain import ChatGuardedVLM
from adapters.server import AppSettings, ServerSettings, create_app, hash_key
from guardrail.testing import fixture_path, synthetic_image

NEW_TOKENS = 8


def _image_content(seed: int) -> list[dict]:
    buffer = io.BytesIO()
    synthetic_image(seed, (128, 96)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return [
        {"type": "text", "text": f"Describe picture {seed}."},
        {"type": "image_url", "image_url": {"url": url}},
    ]


def _run(call, count: int, concurrency: int) -> dict:
    latencies: list[float] = []
    errors = unguarded = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal errors, unguarded
        started = time.perf_counter()
        try:
            safety = call(i)
        except Exception:  # counted, not raised: a load test reports its errors
            with lock:
                errors += 1
            return
        with lock:
            latencies.append(time.perf_counter() - started)
            unguarded += not safety["guarded"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies) or [float("nan")]
    return {
        "throughput_rps": round(len(latencies) / wall, 3),
        "p50_s": round(statistics.median(ordered), 4),
        "p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
        "errors": errors,
        "unguarded_multimodal": unguarded,
    }


def main() -> None:
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", nargs="*", default=["tiny", "smollm"])
    parser.add_argument("--requests", nargs="*", type=int, default=[200, 40])
    parser.add_argument("--concurrency", nargs="*", type=int, default=[1, 4, 16])
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for fixture, count in zip(args.fixtures, args.requests, strict=True):
        model = str(fixture_path(fixture))
        chat = ChatGuardedVLM(model=model, app="bench", max_tokens=NEW_TOKENS)
        settings = ServerSettings(
            model=model,
            port=args.port,
            apps=(AppSettings(name="bench", key_sha256=hash_key("k"), max_concurrent=64),),
        )
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings), port=args.port, log_level="error")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="k")

        def in_process(i: int, chat: ChatGuardedVLM = chat) -> dict:
            message = chat.invoke([HumanMessage(content=_image_content(i))])
            return message.response_metadata["safety"]

        def over_http(i: int, client: openai.OpenAI = client, model: str = model) -> dict:
            answer = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": _image_content(i)}],
                max_tokens=NEW_TOKENS,
            )
            return answer.model_extra["safety"]

        in_process(0), over_http(0)  # warm-up
        for concurrency in args.concurrency:
            results = {
                "in-process": _run(in_process, count, concurrency),
                "uvicorn": _run(over_http, count, concurrency),
            }
            ratio = results["uvicorn"]["throughput_rps"] / results["in-process"]["throughput_rps"]
            for target, result in results.items():
                row = {"fixture": fixture, "target": target, "concurrency": concurrency, **result}
                if target == "uvicorn":
                    row["throughput_ratio_to_in_process"] = round(ratio, 3)
                rows.append(row)
                print(
                    f"{fixture:7} c={concurrency:<3} {target:10} {result['throughput_rps']:7.2f} "
                    f"req/s  p50 {result['p50_s']:.3f}s  p99 {result['p99_s']:.3f}s  "
                    f"errors {result['errors']}  unguarded {result['unguarded_multimodal']}"
                    + (f"  x{ratio:.3f} of in-process" if target == "uvicorn" else ""),
                    flush=True,
                )
        server.should_exit = True
        thread.join(30)
    print(json.dumps({"benchmark": "serve", "new_tokens": NEW_TOKENS, "rows": rows}))


if __name__ == "__main__":
    main()
