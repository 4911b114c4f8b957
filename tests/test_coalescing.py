"""The in-process dynamic batcher of the LangChain adapter."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from adapters.coalescing import RequestCoalescer
from guardrail import GuardRequest


def test_one_pass_at_a_time_and_load_makes_batches_larger():
    running, most_running, sizes = 0, 0, []
    lock = threading.Lock()

    def run_batch(requests, settings):
        nonlocal running, most_running
        with lock:
            running += 1
            most_running = max(most_running, running)
            sizes.append(len(requests))
        time.sleep(0.05)  # one engine pass
        with lock:
            running -= 1
        return [f"answer to {r.prompt}" for r in requests]

    coalescer = RequestCoalescer(run_batch, window_s=0.005, max_batch=8)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: coalescer.submit(GuardRequest(str(i)), {}), range(48)))
    assert answers == [f"answer to {i}" for i in range(48)]
    assert most_running == 1  # passes never overlap (they would only compete for the device)
    assert max(sizes) == 8 and len(sizes) <= 10  # waiting requests joined the next batch
