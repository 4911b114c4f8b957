"""The guard service: one scheduler per loaded model, shared by every app (tiny fixture)."""

from __future__ import annotations

import time

import pytest

from guardrail import GuardConfig, GuardRequest
from guardrail.backends import Sampling
from guardrail.errors import CallCancelledError, InvalidInputError, OverloadedError
from guardrail.service import AppSpec, Call, GuardService
from guardrail.service.text_stream import TextStream


@pytest.fixture(scope="module")
def service(tiny_vlm):
    svc = GuardService(tiny_vlm)
    svc.add_app(AppSpec(name="gentle", guard=GuardConfig(alpha=0.5)))
    svc.add_app(AppSpec(name="strong", alpha=3.0, max_concurrent=2))  # flat fields fold in
    return svc


def _call(app, image=None, tokens=8, **kw):
    images = [image] if image is not None else []
    request = GuardRequest("Describe it.", images)
    return Call(app, request, Sampling(max_new_tokens=tokens, min_new_tokens=tokens), **kw)


def test_two_apps_with_different_alpha_share_one_batch_and_match_their_solo_runs(service, image):
    handles = [service.submit(_call("gentle", image)), service.submit(_call("strong", image))]
    together = [h.result() for h in handles]
    alone = [service.submit(_call(app, image)).result() for app in ("gentle", "strong")]
    batches = [o.decision.batch for o in together]
    assert batches[0] is not None and batches[0] == batches[1]
    assert [o.decision.batch_rows for o in together] == [2, 2]
    assert alone[0].decision.batch != alone[1].decision.batch  # alone: a batch each
    assert [o.decision.alpha for o in together] == [0.5, 3.0]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert together[0].token_ids != together[1].token_ids  # α changed the answer


def test_a_short_request_submitted_during_a_long_one_finishes_first(service, image):
    long = service.submit(_call("gentle", image, tokens=256))
    while service.scheduler.steps == 0 or long.done:  # the long one is running
        time.sleep(0.01)
    short = service.submit(_call("strong", image, tokens=4))
    short_output = short.result(timeout=60)
    assert not long.done  # the short one did not wait for the long one
    long_output = long.result(timeout=120)
    assert len(short_output.token_ids) == 4 and len(long_output.token_ids) == 256
    assert short_output.decision.batch == long_output.decision.batch  # it joined that batch
    alone = service.submit(_call("strong", image, tokens=4)).result()
    assert short_output.token_ids == alone.token_ids  # joining changed nothing


def test_stream_releases_text_and_cuts_at_a_stop_string(service):
    full = service.submit(_call("gentle", tokens=12)).result()
    assert len(full.text) > 4
    stop = full.text[3:5]
    handle = service.submit(_call("gentle", tokens=12, stop=(stop,)))
    pieces = list(handle)
    output = handle.result()
    assert "".join(pieces) == output.text == full.text[: full.text.index(stop)]
    assert output.finish_reason == "stop"


def test_cancel_ends_a_call_with_its_decision(service, image):
    handle = service.submit(_call("gentle", image, tokens=256))
    handle.cancel()
    with pytest.raises(CallCancelledError) as info:
        handle.result(timeout=60)
    assert info.value.decision is not None and info.value.decision.app == "gentle"


def test_limits_and_unknown_apps_are_typed_errors_with_a_record(service, image):
    with pytest.raises(InvalidInputError, match="no app named"):
        service.submit(_call("nobody"))
    with pytest.raises(InvalidInputError, match="max_tokens is at most") as info:
        service.submit(_call("gentle", tokens=5000))
    assert info.value.decision.mode_used == "refused"
    running = [service.submit(_call("strong", image, tokens=64)) for _ in range(2)]
    with pytest.raises(OverloadedError):
        service.submit(_call("strong", image))
    for handle in running:
        handle.cancel()


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(service, image):
    sampled = Sampling(max_new_tokens=8, temperature=1.0, top_k=50, seed=7)
    request = GuardRequest("Describe it.", [image])
    alone = service.submit(Call("gentle", request, sampled)).result().token_ids
    crowd = [service.submit(_call("strong", image, tokens=16)) for _ in range(1)]
    shared = service.submit(Call("gentle", request, sampled)).result().token_ids
    [h.result() for h in crowd]
    assert alone == shared
    other = Sampling(max_new_tokens=8, temperature=1.0, top_k=50, seed=8)
    assert service.submit(Call("gentle", request, other)).result().token_ids != alone


def test_text_stream_holds_back_what_may_become_a_stop_string_or_tool_call():
    class Chars:  # one character per token
        def decode(self, tokens, skip_special_tokens=True):
            return "".join(map(chr, tokens))

    stream = TextStream(Chars(), stop=["END"], hold_from=["<tool_call>"])
    released = "".join(stream.feed(ord(c)) for c in "say EN")
    assert released == "say "  # "EN" may start "END"
    released += "".join(stream.feed(ord(c)) for c in "D more")
    assert released == "say " and stream.stopped and stream.text == "say "
    tools = TextStream(Chars(), hold_from=["<tool_call>"])
    out = "".join(tools.feed(ord(c)) for c in 'ok <tool_call>{"name": "f"}') + tools.finish()
    assert out == "ok " and tools.text.endswith('{"name": "f"}')


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": 2**80, "temperature": 0.7}, "seed"),
        ({"seed": -1}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"min_new_tokens": -2}, "min_new_tokens"),
    ],
)
def test_sampling_no_runtime_can_honour_is_a_typed_error(values, problem):
    with pytest.raises(InvalidInputError, match=problem):
        Sampling(**values)


def test_n_choices_share_one_prefill_and_each_matches_its_seeded_solo_run(service, image):
    """n=3 on a sample-level call: one prefill of its three rows (request, corrupted and
    text-only references), not nine; choice i samples as a call with seed + i would, and the
    call has one decision record."""
    rows: list[int] = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids")
        rows.append(-1 if ids is None else ids.shape[0])

    def sampled(n, seed):
        sampling = Sampling(max_new_tokens=5, min_new_tokens=5, temperature=1.0, seed=seed)
        request = GuardRequest("Describe it.", [image])
        return Call("gentle", request, sampling, trust="untrusted", n=n)

    hook = service.model.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        output = service.submit(sampled(3, 11)).result(timeout=120)
    finally:
        hook.remove()
    assert rows[0] == 3 and set(rows[1:]) == {9}  # shared prefill, then a row set per choice
    assert len(output.choices) == 3 and output.decision.mode_used == "sample"
    assert output.usage.completion_tokens == 15
    solo = [service.submit(sampled(1, 11 + i)).result(timeout=60) for i in range(3)]
    assert [c.token_ids for c in output.choices] == [s.token_ids for s in solo]
    assert len({tuple(c.token_ids) for c in output.choices}) > 1  # the seeds differ
    assert {c.decision.call_id for c in output.choices} == {output.decision.call_id}


def test_n_choices_stream_each_choices_text(service):
    handle = service.submit(_call("gentle", tokens=6, n=2))
    texts = ["", ""]
    for delta in handle.deltas():
        texts[delta.choice] += delta.text
    output = handle.result()
    assert texts == [c.text for c in output.choices] and texts[0] == texts[1]  # greedy
