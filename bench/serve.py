"""A bounded load test of serving: in-process, uvicorn, and Ray Serve with 1 and 2 replicas.

For each fixture and concurrency, the same multimodal requests (a data-URL image, 8 new tokens)
go to ``ChatGuardedVLM.invoke`` from a thread pool (in-process), to ``guardrail serve``'s app
on a loopback port (uvicorn), and to the Ray Serve application with 1 and 2 model replicas,
the last three through the openai SDK. Prints throughput, p50/p99 latency, errors and
unguarded multimodal answers for each, and each target's throughput as a ratio to in-process
in the same run; a final JSON line. The shift is calibrated into a shared folder store first.

    python bench/serve.py [--fixtures tiny smollm] [--requests 200 40] [--concurrency 1 4 16]
                          [--targets in-process uvicorn ray-1 ray-2]

``--two-apps BASELINE`` instead runs ``bench/two_apps.py`` (two apps × ``--callers`` callers on
one model, short and long requests) on this tree and on the commit ``BASELINE`` (checked out in
a temporary git worktree), one after the other in the same run, and prints the ratios.

    python bench/serve.py --two-apps abf622f [--fixtures tiny smollm] [--callers 8]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
import uvicorn
from langchain_core.messages import HumanMessage

from adapters.langchain import ChatGuardedVLM
from adapters.server import AppSettings, ServerSettings, create_app, hash_key
from guardrail.testing import fixture_path, synthetic_image

NEW_TOKENS = 8
TARGETS = ("in-process", "uvicorn", "ray-1", "ray-2")


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


class _Uvicorn:
    def __init__(self, settings: ServerSettings) -> None:
        config = uvicorn.Config(create_app(settings), port=settings.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class _Ray:
    def __init__(self, settings: ServerSettings, replicas: int) -> None:
        import ray
        from ray import serve

        from adapters.server.ray_serve import application

        ray.init(num_cpus=2 + replicas, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": settings.port})
        serve.run(application(settings, replicas=replicas), route_prefix="/", name="bench")

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def two_apps(baseline: str, fixtures: list[str], callers: int, rounds: list[int]) -> list[dict]:
    """``bench/two_apps.py`` on ``baseline`` and on this tree, per fixture."""
    here = Path(__file__).resolve().parents[1]
    old = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "tree"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), baseline], cwd=here)
    rows = []
    try:
        for fixture, count in zip(fixtures, rounds, strict=True):
            results = {}
            for name, tree in ((f"baseline {baseline}", old), ("this tree", here)):
                command = [
                    sys.executable,
                    str(here / "bench" / "two_apps.py"),
                    "--fixture",
                    fixture,
                    "--callers",
                    str(callers),
                    "--rounds",
                    str(count),
                ]
                env = {**os.environ, "PYTHONPATH": str(tree)}
                out = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
                results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            base = results[f"baseline {baseline}"]
            for name, result in results.items():
                row = {"setup": name, **result}
                row["throughput_ratio"] = round(
                    result["throughput_rps"] / base["throughput_rps"], 3
                )
                row["short_p99_ratio"] = round(result["short_p99_s"] / base["short_p99_s"], 3)
                rows.append(row)
                print(
                    f"{fixture:7} {name:18} {result['throughput_rps']:7.2f} req/s  short p50 "
                    f"{result['short_p50_s']:.3f}s p99 {result['short_p99_s']:.3f}s  unguarded "
                    f"{result['unguarded_multimodal']}  throughput x{row['throughput_ratio']:.2f}"
                    f"  short p99 x{row['short_p99_ratio']:.2f}",
                    flush=True,
                )
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=here)
    return rows


def main() -> None:
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", nargs="*", default=["tiny", "smollm"])
    parser.add_argument("--requests", nargs="*", type=int, default=[200, 40])
    parser.add_argument("--concurrency", nargs="*", type=int, default=[1, 4, 16])
    parser.add_argument("--targets", nargs="*", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--two-apps", metavar="BASELINE", help="two apps vs a baseline commit")
    parser.add_argument("--callers", type=int, default=8, help="--two-apps: callers per app")
    parser.add_argument("--rounds", nargs="*", type=int, default=[4, 2], help="--two-apps")
    args = parser.parse_args()
    if args.two_apps:
        rows = two_apps(args.two_apps, args.fixtures, args.callers, args.rounds)
        print(json.dumps({"benchmark": "serve-two-apps", "rows": rows}))
        return
    torch.set_num_threads(2)
    store = f"file://{tempfile.mkdtemp(prefix='bench-serve-')}"
    rows = []
    for fixture, count in zip(args.fixtures, args.requests, strict=True):
        model = str(fixture_path(fixture))
        chat = ChatGuardedVLM.from_model_id(
            model=model, app="bench", store=store, max_tokens=NEW_TOKENS
        )
        settings = ServerSettings(
            model=model,
            store=store,
            port=args.port,
            apps=(AppSettings(name="bench", key_sha256=hash_key("k"), max_concurrent=64),),
        )
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

        results: dict[tuple[str, int], dict] = {}
        for target in args.targets:
            server: _Uvicorn | _Ray | None = None
            if target == "uvicorn":
                server = _Uvicorn(settings)
            elif target.startswith("ray-"):
                server = _Ray(settings, int(target.split("-")[1]))
            call = in_process if target == "in-process" else over_http
            call(0)  # warm-up
            for concurrency in args.concurrency:
                results[target, concurrency] = _run(call, count, concurrency)
            if server is not None:
                server.stop()
        for (target, concurrency), result in results.items():
            base = results.get(("in-process", concurrency))
            ratio = result["throughput_rps"] / base["throughput_rps"] if base else float("nan")
            row = {"fixture": fixture, "target": target, "concurrency": concurrency, **result}
            row["throughput_ratio_to_in_process"] = round(ratio, 3)
            rows.append(row)
            print(
                f"{fixture:7} c={concurrency:<3} {target:10} {result['throughput_rps']:7.2f} "
                f"req/s  p50 {result['p50_s']:.3f}s  p99 {result['p99_s']:.3f}s  "
                f"errors {result['errors']}  unguarded {result['unguarded_multimodal']}  "
                f"x{ratio:.3f} of in-process",
                flush=True,
            )
    print(json.dumps({"benchmark": "serve", "new_tokens": NEW_TOKENS, "rows": rows}))


if __name__ == "__main__":
    main()
