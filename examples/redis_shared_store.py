"""Two processes share one calibrated vector through Redis: the first computes and stores it,
the second finds it (same key, same version) and never computes.

    python examples/redis_shared_store.py [redis://127.0.0.1:6379/0?namespace=example]
"""

import subprocess
import sys

from guardrail import GuardedVLM
from guardrail.testing import anchor_prompts, fixture_path

URL = sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0?namespace=example"


def replica(role: str) -> None:
    vlm = GuardedVLM.from_pretrained(str(fixture_path("tiny")))
    computed = []

    def anchors():
        computed.append(role)
        yield from anchor_prompts()[:8]

    lookup = vlm.use_store(URL, anchor_name="example-8", anchors=anchors())
    print(f"{role}: version={lookup.version[:12]} computed_here={bool(computed)}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        replica(sys.argv[2])
    else:
        from shift_store import ShiftKey, open_store

        store = open_store(URL)
        for entry in store.list():  # start clean, so that the first replica computes
            store.delete(ShiftKey.for_meta(entry.meta))
        for role in ("first", "second"):
            subprocess.run([sys.executable, __file__, URL, role], check=True)
