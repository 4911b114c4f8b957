"""Serving throughput and latency: bare vLLM, the guard on vLLM (dataset and sample level) and
the guard on transformers, each through its OpenAI-compatible server, in one run.

Servers are started one at a time on loopback (vLLM's own OpenAI server for bare vLLM;
``guardrail serve --backend vllm`` with an unguarded (``mode = "off"``: the same serving stack
without the guard), a dataset-level and a sample-level app; ``guardrail serve`` on
transformers with a dataset-level app), and each gets the same streamed multimodal chat
requests (a data-URL image, exactly ``--tokens`` greedy tokens: ``min_tokens``, vLLM's
extension, which the guard's server takes too) at every concurrency.
Prints requests/s, time to first token and inter-token latency (p50/p99) per target and
concurrency, each target's throughput as a ratio to bare vLLM's at the same concurrency, and a
final JSON line. Run it in the vLLM environment (``.venv-vllm``), alone on the machine.

    .venv-vllm/bin/python bench/vllm.py [--model PATH] [--dtype float32] [--concurrency 1 16 64]

On a GPU: ``--model`` a LLaVA-1.5-7B checkpoint (or the shape built by bench/gpu_llava7b.py,
saved), ``--dtype bfloat16``; the server commands are the same.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from guardrail.testing import fixture_path, synthetic_image

_SEEDS = itertools.count()  # every request its own picture: no prefix-cache hits between them
KEYS = {"off": "bench-off-key", "dataset": "bench-dataset-key", "sample": "bench-sample-key"}


def _image_url(seed: int) -> str:
    buffer = io.BytesIO()
    synthetic_image(seed, (200, 150)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _messages(seed: int) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _image_url(seed)}},
                {"type": "text", "text": f"Describe picture {seed} in a few words."},
            ],
        }
    ]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _load(port: int, key: str, model: str, count: int, concurrency: int, tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    itl: list[float] = []
    errors = 0

    async def one(seed: int) -> None:
        nonlocal errors
        async with gate:
            started = time.perf_counter()
            last = None
            try:
                stream = await client.chat.completions.create(
                    model=model,
                    messages=_messages(seed),
                    max_tokens=tokens,
                    temperature=0,
                    stream=True,
                    extra_body={"min_tokens": tokens},  # exactly ``tokens`` on every server
                )
                async for chunk in stream:
                    if not chunk.choices or not chunk.choices[0].delta.content:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - started)
                    else:
                        itl.append(now - last)
                    last = now
            except openai.OpenAIError:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(next(_SEEDS)) for _ in range(count)))
    wall = time.perf_counter() - started
    await client.close()
    return {
        "requests": count,
        "errors": errors,
        "rps": count / wall,
        "ttft_p50_ms": 1e3 * _percentile(ttft, 0.5),
        "ttft_p99_ms": 1e3 * _percentile(ttft, 0.99),
        "itl_p50_ms": 1e3 * _percentile(itl, 0.5),
        "itl_p99_ms": 1e3 * _percentile(itl, 0.99),
    }


def _wait_ready(process: subprocess.Popen, port: int, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        for probe in ("/health", "/healthz"):  # vLLM's, the guard's
            try:
                if httpx.get(f"http://127.0.0.1:{port}{probe}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(2)
    raise TimeoutError("server did not come up")


def _config(folder: Path, model: str, modes: list[str], dtype: str) -> Path:
    from adapters.server.settings import hash_key

    lines = [f'model = "{model}"', f'dtype = "{dtype}"', f'store = "file://{folder}/store"']
    for mode in modes:
        lines += [
            f"[apps.{mode}]",
            f'key_sha256 = "{hash_key(KEYS[mode])}"',
            "max_concurrent = 128",
            f'mode = "{mode}"',
        ]
    path = folder / f"serve-{'-'.join(modes)}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="default: the SmolLM2 fixture")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--port", type=int, default=8931)
    args = parser.parse_args()
    model = args.model or str(fixture_path("smollm"))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    engine = [f"--engine-arg=max_model_len={args.max_model_len}"]
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        vllm_config = _config(folder, model, ["off", "dataset", "sample"], args.dtype)
        tf_config = _config(folder, model, ["dataset"], args.dtype)
        bare = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        bare += ["--enforce-eager", "--dtype", args.dtype]
        bare += ["--max-model-len", str(args.max_model_len), "--port", str(args.port)]
        guard = [str(bin_dir / "guardrail"), "serve", "--config", str(vllm_config)]
        guard += ["--backend", "vllm", "--port", str(args.port), *engine]
        plain = [str(bin_dir / "guardrail"), "serve", "--config", str(tf_config)]
        plain += ["--port", str(args.port)]
        servers = [
            ("bare vLLM", bare, [("bare vLLM", "none")]),
            (
                "guard on vLLM",
                guard,
                [("vLLM off", "off"), ("vLLM dataset", "dataset"), ("vLLM sample", "sample")],
            ),
            ("guard on transformers", plain, [("transformers dataset", "dataset")]),
        ]
        for name, command, targets in servers:
            print(f"starting {name}", file=sys.stderr)
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
            try:
                _wait_ready(process, args.port)
                for label, app in targets:
                    key = KEYS.get(app, "none")
                    asyncio.run(_load(args.port, key, model, 2, 1, args.tokens))  # warm-up
                    for c in args.concurrency:
                        count = max(8, 2 * c)
                        stats = asyncio.run(_load(args.port, key, model, count, c, args.tokens))
                        results.setdefault(label, {})[c] = stats
                        print(label, c, json.dumps(stats), file=sys.stderr)
            finally:
                process.terminate()
                process.wait(60)
    print(f"\n{args.tokens} tokens per request, requests = max(8, 2 x concurrency)\n")
    print(
        "| target | conc. | req/s | × bare vLLM | × vLLM off | TTFT p50/p99 ms "
        "| ITL p50/p99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, by_c in results.items():
        for c, s in by_c.items():
            ratio = s["rps"] / results["bare vLLM"][c]["rps"]
            off = s["rps"] / results["vLLM off"][c]["rps"]
            print(
                f"| {label} | {c} | {s['rps']:.2f} | {ratio:.2f} | {off:.2f} | "
                f"{s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} | "
                f"{s['itl_p50_ms']:.0f} / {s['itl_p99_ms']:.0f} | {s['errors']} |"
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
