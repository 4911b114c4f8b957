"""The examples in examples/ run offline and print what they promise."""

from __future__ import annotations

from tests.test_cli import _run


def test_examples_run(namespace):
    quick = _run("examples/quickstart.py")
    assert "[off]" in quick and "[dataset]" in quick and "[sample]" in quick
    assert "[text-only] The capital of France is Paris." in quick
    agent = _run("examples/langchain_agent.py")
    assert "calls=[('add', {'a': 3, 'b': 4})]" in agent and "tool add: '7'" in agent
    assert "calls=[('screenshot', {'page': 'example.com'})]" in agent
    assert agent.strip().splitlines()[-1].strip() == "safety: sample trusted: False"
    shared = _run(
        "examples/redis_shared_store.py", f"redis://127.0.0.1:6379/0?namespace={namespace}"
    )
    first, second = shared.strip().splitlines()
    assert "computed_here=True" in first and "computed_here=False" in second
    assert first.split()[1] == second.split()[1]  # the same version
