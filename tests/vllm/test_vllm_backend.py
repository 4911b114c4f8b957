"""The guard inside vLLM (SmolLM2 fixture, greedy): what it leaves alone is bare vLLM's answer,
what it corrects is the transformers backend's answer, and a request it cannot follow in
lockstep is recomputed or refused, never answered with a stale shift.

Runs in the vLLM environment (``make test`` builds ``.venv-vllm``); one guarded engine, one
bare engine and one transformers backend serve the whole module.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from vllm import LLM, SamplingParams

from guardrail import GuardConfig, GuardedVLM
from guardrail.backends import (
    BackendRequest,
    Correction,
    CorrectionShape,
    Sampling,
    TransformersBackend,
    run_to_completion,
)
from guardrail.backends.vllm import VLLMBackend
from guardrail.calibration import compute_dataset_shift
from guardrail.config import CorruptionSpec
from guardrail.constraints import OutputConstraint
from guardrail.errors import InvalidInputError
from guardrail.requests import GuardRequest, Rendering, corrupted, text_only
from guardrail.service import AppSpec, Call, GuardService
from guardrail.testing import anchor_prompts, fixture_path, synthetic_image

TOKENS = 8
LAYER = CorrectionShape((25,), "last", "incremental")
ENGINE = {"max_model_len": 1024, "dtype": "float32", "num_gpu_blocks_override": 24}


@pytest.fixture(scope="module")
def path() -> str:
    return str(fixture_path("smollm"))


@pytest.fixture(scope="module")
def backend(path: str) -> VLLMBackend:
    return VLLMBackend.from_pretrained(path, **ENGINE)


@pytest.fixture(scope="module")
def bare(path: str) -> LLM:
    return LLM(model=path, enforce_eager=True, **ENGINE)


@pytest.fixture(scope="module")
def reference(path: str) -> TransformersBackend:
    return TransformersBackend.from_pretrained(path, dtype="float32")


@pytest.fixture(scope="module")
def shift(reference: TransformersBackend):
    """A dataset-level shift calibrated on transformers."""
    return compute_dataset_shift(
        reference, CorruptionSpec(), anchor_prompts()[:8], decode_tokens=4, progress=False
    )


def _rendering(i: int, image: bool = True) -> Rendering:
    prompt = anchor_prompts()[i % 8]
    parts = [{"type": "image"}] if image else []
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
    return Rendering(messages, [synthetic_image(i, (200, 150))] if image else [])


def _bare_tokens(bare: LLM, backend: VLLMBackend, renderings: list[Rendering]) -> list[list[int]]:
    params = SamplingParams(
        max_tokens=TOKENS, temperature=0, stop_token_ids=sorted(backend.stop_token_ids())
    )
    outputs = bare.generate([backend.prompt(r) for r in renderings], params, use_tqdm=False)
    stops = backend.stop_token_ids()
    return [[t for t in o.outputs[0].token_ids if t not in stops] for o in outputs]


def _answers(session_backend, requests: list[BackendRequest]) -> dict[str, list[int]]:
    answers = run_to_completion(session_backend.open_batch(), requests)
    assert all(a.error is None for a in answers.values()), answers
    return {rid: a.tokens for rid, a in answers.items()}


def test_an_engine_that_would_skip_the_hooks_is_refused(path):
    with pytest.raises(InvalidInputError, match="eager"):
        VLLMBackend.from_pretrained(path, enforce_eager=False)


def test_a_checkpoint_has_one_fingerprint_whichever_runtime_loads_it(backend, reference):
    assert backend.fingerprint == reference.fingerprint


def test_calibration_on_vllm_gives_the_transformers_shift(backend, shift):
    on_vllm = compute_dataset_shift(
        backend, CorruptionSpec(), anchor_prompts()[:8], decode_tokens=4, progress=False
    )
    pairs = ((on_vllm.vectors, shift.vectors), (on_vllm.decode_vectors, shift.decode_vectors))
    for ours, theirs in pairs:
        cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
        assert float(cosine.min()) >= 0.999, cosine


@pytest.mark.parametrize("calibrated_on", ["transformers", "vllm"])
def test_a_vector_calibrated_on_one_runtime_is_found_and_accepted_on_the_other(
    backend, reference, tmp_path, calibrated_on
):
    """Same store, same key: the other runtime finds the vector, its plausibility check (a live
    measurement on the other runtime) accepts it, and calls run at dataset level with it."""
    runtimes = {"transformers": reference, "vllm": backend}
    writer = GuardedVLM(runtimes[calibrated_on])
    reader = GuardedVLM(runtimes["vllm" if calibrated_on == "transformers" else "transformers"])
    store = f"file://{tmp_path}"
    writer.use_store(store, anchor_name="eight", anchors=anchor_prompts()[:8])
    found = reader.use_store(store, anchor_name="eight", compute_on_miss=False)
    assert found.vector is not None, found.note
    output = reader.generate("Describe it.", [synthetic_image(4, (200, 150))], max_new_tokens=4)
    decision = output.decision
    assert decision.mode_used == "dataset" and decision.guarded, decision
    assert decision.shift_key == writer.shifts.key_name


def test_unguarded_and_alpha_zero_requests_are_bare_vllm(backend, bare, shift):
    renderings = [_rendering(i, image=i % 2 == 0) for i in range(4)]
    expected = _bare_tokens(bare, backend, renderings)
    sampling = Sampling(max_new_tokens=TOKENS)
    requests = [BackendRequest(f"u{i}", r, sampling) for i, r in enumerate(renderings)]
    requests += [
        BackendRequest(f"z{i}", r, sampling, Correction(LAYER, 0.0, shift=shift))
        for i, r in enumerate(renderings)
    ]
    got = _answers(backend, requests)
    for i in range(4):
        assert got[f"u{i}"] == expected[i]
        assert got[f"z{i}"] == expected[i]


def test_sample_level_on_the_corruption_image_answers_as_text_only(backend, bare):
    """At the last layer, with the corruption image as input, the live shift removes exactly
    what the image added at every generated token: the text-only answer, token for token."""
    rendering = _rendering(3)
    spec = CorruptionSpec()
    blank = corrupted(rendering, spec, backend.default_image_size())
    text = text_only(rendering)
    last = CorrectionShape((backend.num_layers - 1,), "last", "incremental")
    correction = Correction(last, 1.0, references=(blank, text))
    got = _answers(
        backend, [BackendRequest("s", blank, Sampling(max_new_tokens=TOKENS), correction)]
    )
    assert got["s"] == _bare_tokens(bare, backend, [text])[0]
    assert len(got["s"]) == TOKENS


def test_dataset_level_on_vllm_answers_as_on_transformers(backend, reference, shift):
    sampling = Sampling(max_new_tokens=TOKENS)
    requests = [
        BackendRequest(f"d{i}", _rendering(i), sampling, Correction(LAYER, 1.0, shift=shift))
        for i in range(10)
    ]
    on_vllm = _answers(backend, requests)
    on_transformers = _answers(reference, requests)
    same = sum(on_vllm[r.id] == on_transformers[r.id] for r in requests)
    assert same >= 9, (on_vllm, on_transformers)
    unguarded = _answers(backend, [BackendRequest(r.id, r.rendering, sampling) for r in requests])
    assert sum(on_vllm[r.id] != unguarded[r.id] for r in requests) >= 5  # the shift acts


def test_a_mixed_step_gives_every_row_its_solo_answer(backend, shift):
    sampling = Sampling(max_new_tokens=TOKENS)
    image = _rendering(5)
    blank = corrupted(image, CorruptionSpec(), backend.default_image_size())
    references = (blank, text_only(image))
    requests = [
        BackendRequest("dataset", image, sampling, Correction(LAYER, 1.0, shift=shift)),
        BackendRequest("strong", image, sampling, Correction(LAYER, 2.0, shift=shift)),
        BackendRequest("sample", image, sampling, Correction(LAYER, 1.0, references=references)),
        BackendRequest("unguarded", image, sampling),
        BackendRequest("text", _rendering(6, image=False), sampling),
    ]
    together = _answers(backend, requests)
    for request in requests:
        assert together[request.id] == _answers(backend, [request])[request.id], request.id
    assert len({tuple(tokens) for tokens in together.values()}) >= 3


def test_corrected_states_never_reach_another_request_through_the_prefix_cache(
    backend, bare, shift
):
    """A request corrected at every position leaves corrected keys and values in vLLM's prefix
    cache; an unguarded request with the same prompt must not reuse them."""
    rendering = _rendering(7)
    every = CorrectionShape((25,), "all", "incremental")
    sampling = Sampling(max_new_tokens=TOKENS)
    guarded = _answers(
        backend, [BackendRequest("g", rendering, sampling, Correction(every, 4.0, shift=shift))]
    )
    after = _answers(backend, [BackendRequest("u", rendering, sampling)])
    assert after["u"] == _bare_tokens(bare, backend, [rendering])[0] != guarded["g"]


def test_structured_output_through_vllm_is_valid_json_at_both_levels(backend, shift):
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["colour", "count"],
    }
    image = _rendering(2)
    references = (
        corrupted(image, CorruptionSpec(), backend.default_image_size()),
        text_only(image),
    )
    sampling = Sampling(max_new_tokens=60)
    constraint = OutputConstraint.json_schema(schema)
    requests = [
        BackendRequest("d", image, sampling, Correction(LAYER, 1.0, shift=shift), constraint),
        BackendRequest(
            "s", image, sampling, Correction(LAYER, 1.0, references=references), constraint
        ),
    ]
    answers = run_to_completion(backend.open_batch(), requests)
    for answer in answers.values():
        assert answer.error is None and answer.finished == "stop"
        value = json.loads(backend.tokenizer.decode(answer.tokens))
        assert isinstance(value["colour"], str) and isinstance(value["count"], int)


def test_a_preempted_sample_level_request_is_recomputed_and_its_decision_says_so(backend):
    """Eight sample-level requests (24 vLLM sequences) on a KV cache for about 3000 tokens:
    vLLM preempts some; each is recomputed from scratch, gives its solo answer, and its
    decision record names the recomputation."""
    service = GuardService(GuardedVLM(backend, GuardConfig(mode="sample")))
    service.add_app(AppSpec(name="a", guard=GuardConfig(mode="sample")))
    sampling = Sampling(max_new_tokens=48)
    requests = [
        GuardRequest(anchor_prompts()[i], [synthetic_image(i, (200, 150))]) for i in range(8)
    ]
    handles = [service.submit(Call("a", r, sampling)) for r in requests]
    outputs = [h.result(600) for h in handles]
    recomputed = [o for o in outputs if o.decision.runtime_events]
    assert recomputed, "no request was preempted: make the KV cache smaller"
    assert all("recomputed" in o.decision.runtime_events[0] for o in recomputed)
    assert all(o.decision.guarded and o.decision.mode_used == "sample" for o in outputs)
    solo = service.submit(Call("a", requests[outputs.index(recomputed[0])], sampling)).result(600)
    assert solo.text == recomputed[0].text and not solo.decision.runtime_events


def test_penalties_and_bias_reach_vllm_and_keep_the_lockstep(backend, bare):
    """Bias and penalties are vLLM's own: unguarded, the answer is bare vLLM's with the same
    settings; at sample level the reference rows stay in step (the answer on the corruption
    image is still the text-only one) although a repetition penalty reads each row's prompt."""
    sampling = Sampling(
        max_new_tokens=TOKENS,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        logit_bias=((42, 5.0),),
    )
    params = SamplingParams(
        max_tokens=TOKENS,
        temperature=0,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        logit_bias={42: 5.0},
        stop_token_ids=sorted(backend.stop_token_ids()),
    )
    stops = backend.stop_token_ids()

    def bare_answer(rendering: Rendering) -> list[int]:
        output = bare.generate([backend.prompt(rendering)], params, use_tqdm=False)[0]
        return [t for t in output.outputs[0].token_ids if t not in stops]

    rendering = _rendering(5)
    plain = _answers(backend, [BackendRequest("p", rendering, Sampling(max_new_tokens=TOKENS))])
    got = _answers(backend, [BackendRequest("u", rendering, sampling)])
    assert got["u"] == bare_answer(rendering) and got["u"] != plain["p"]
    blank = corrupted(rendering, CorruptionSpec(), backend.default_image_size())
    last = CorrectionShape((backend.num_layers - 1,), "last", "incremental")
    correction = Correction(last, 1.0, references=(blank, text_only(rendering)))
    answers = run_to_completion(
        backend.open_batch(), [BackendRequest("s", blank, sampling, correction)]
    )
    assert answers["s"].error is None and not answers["s"].notes
    assert answers["s"].tokens == bare_answer(text_only(rendering))


def test_logprobs_and_choices_on_vllm_answer_as_on_transformers(backend, reference, shift):
    """Log-probabilities are read after the correction on both runtimes; the choices of one
    prefill group answer as the same requests alone (vLLM shares their prefill through its
    prefix cache, the transformers backend by copying rows)."""
    sampling = Sampling(max_new_tokens=TOKENS, logprobs=2)
    request = BackendRequest("d", _rendering(3), sampling, Correction(LAYER, 1.0, shift=shift))
    on_vllm = run_to_completion(backend.open_batch(), [request])["d"]
    on_transformers = run_to_completion(reference.open_batch(), [request])["d"]
    assert on_vllm.tokens == on_transformers.tokens
    assert len(on_vllm.logprobs) == len(on_vllm.tokens)
    for v, t in zip(on_vllm.logprobs, on_transformers.logprobs, strict=True):
        assert v.token == t.token and v.logprob == pytest.approx(t.logprob, abs=0.05)
        assert [token for token, _ in v.top] == [token for token, _ in t.top]
    image = _rendering(4)
    blank = corrupted(image, CorruptionSpec(), backend.default_image_size())
    correction = Correction(LAYER, 1.0, references=(blank, text_only(image)))
    choices = [
        BackendRequest(
            f"c{i}",
            image,
            Sampling(max_new_tokens=TOKENS, temperature=1.0, seed=5 + i),
            correction,
            prefill_group="call",
        )
        for i in range(2)
    ]
    for runtime in (backend, reference):
        together = _answers(runtime, choices)
        for choice in choices:
            alone = replace(choice, prefill_group=None)
            assert together[choice.id] == _answers(runtime, [alone])[choice.id], choice.id
