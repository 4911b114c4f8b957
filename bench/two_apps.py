"""Two apps × N concurrent callers on one model, through the LangChain chat model.

Each caller alternates short (8-token) and long (48-token) multimodal requests with its app's
α. Prints one JSON line: throughput, p50/p99 latency of the short requests, unguarded answers.
Written against the chat model's public API only, so that ``bench/serve.py --two-apps`` can run
it on this tree and on an older commit in the same run (the baseline).

    python bench/two_apps.py --fixture tiny --callers 8 --rounds 4
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from langchain_core.messages import HumanMessage

from adapters.langchain import ChatGuardedVLM
from guardrail.testing import fixture_path, synthetic_image

SHORT, LONG = 8, 48


def _chat(model: str, app: str, alpha: float, store: str) -> ChatGuardedVLM:
    options = dict(model=model, app=app, alpha=alpha, store=store, max_tokens=LONG)
    if hasattr(ChatGuardedVLM, "from_model_id"):  # calibration is explicit since the service
        return ChatGuardedVLM.from_model_id(**options)
    return ChatGuardedVLM(**options)  # older trees calibrated on construction


def _image_message(seed: int) -> HumanMessage:
    buffer = io.BytesIO()
    synthetic_image(seed, (96, 96)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [
        {"type": "text", "text": f"Describe picture {seed}."},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    return HumanMessage(content=content)


def main() -> None:
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixture", default="tiny")
    parser.add_argument("--callers", type=int, default=8, help="per app")
    parser.add_argument("--rounds", type=int, default=4, help="short+long pairs per caller")
    args = parser.parse_args()
    torch.set_num_threads(2)
    store = f"file://{tempfile.mkdtemp(prefix='bench-two-apps-')}"
    model = str(fixture_path(args.fixture))
    chats = [_chat(model, "app-a", 0.8, store), _chat(model, "app-b", 1.5, store)]
    short: list[float] = []
    done = unguarded = 0
    lock = threading.Lock()

    def caller(index: int) -> None:
        nonlocal done, unguarded
        chat = chats[index % 2]
        message = _image_message(index)
        for step in range(2 * args.rounds):
            tokens = SHORT if (index + step) % 2 == 0 else LONG
            started = time.perf_counter()
            answer = chat.invoke([message], max_tokens=tokens)
            with lock:
                done += 1
                unguarded += not answer.response_metadata["safety"]["guarded"]
                if tokens == SHORT:
                    short.append(time.perf_counter() - started)

    for chat in chats:  # warm-up
        chat.invoke([_image_message(99)], max_tokens=2)
    started = time.perf_counter()
    with ThreadPoolExecutor(2 * args.callers) as pool:
        list(pool.map(caller, range(2 * args.callers)))
    wall = time.perf_counter() - started
    short.sort()
    print(
        json.dumps(
            {
                "fixture": args.fixture,
                "callers": 2 * args.callers,
                "requests": done,
                "throughput_rps": round(done / wall, 3),
                "short_p50_s": round(statistics.median(short), 3),
                "short_p99_s": round(short[min(len(short) - 1, int(0.99 * len(short)))], 3),
                "unguarded_multimodal": unguarded,
            }
        )
    )


if __name__ == "__main__":
    main()
