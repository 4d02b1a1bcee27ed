"""opt_fast against Hugging Face's OPTForCausalLM on tiny random checkpoints, float32.

Shapes: pre-LN, OPT-350m style (post-LN, project_in/out), head_dim 80 (see conftest).
"""
from __future__ import annotations

import pytest
import torch

from opt_testing import test_device
from opt_fast import LLM, SamplingParams

PROMPTS = [[2, 45, 101, 7, 300, 12, 9, 88, 150, 33, 61],
           [2, 5],
           [2, 399, 17, 256, 42, 42, 8, 170, 3, 99, 210, 11, 64, 128, 5, 77, 240, 31, 19],
           [2, 123, 321, 213, 132, 231, 312],
           [2]]
NEW_TOKENS = 24


def make_llm(ckpt, **kwargs) -> LLM:
    return LLM(str(ckpt), dtype="float32", device=test_device(), kernels="torch", **kwargs)


def hf_greedy(model, prompt: list[int], vocab_size: int, new_tokens: int, penalty: float) -> list[int]:
    """Greedy decoding through HF's forward, one full forward per token (no HF cache involved),
    with HF's own RepetitionPenaltyLogitsProcessor; ids past the tokenizer are never chosen."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    processor = RepetitionPenaltyLogitsProcessor(penalty) if penalty != 1.0 else None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=ids).logits[:, -1].float()
            logits[:, vocab_size:] = float("-inf")
            if processor is not None:
                logits = processor(ids, logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_matches_hf_token_for_token(hf_checkpoint, penalty):
    shape, ckpt, hf_model = hf_checkpoint
    llm = make_llm(ckpt)
    vocab = llm.get_tokenizer().vocab_size
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, repetition_penalty=penalty)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        expected = hf_greedy(hf_model, prompt, vocab, NEW_TOKENS, penalty)
        assert out.outputs[0].token_ids == expected, (shape, prompt)
        assert out.outputs[0].finish_reason == "length"


# max_num_seqs 2: the prompt rows' logits are taken two at a time (as many as the memory profile
# ran), so a prompt's entries come from several pieces. "alternate": prompts 0, 2 and 4 do not ask
# for prompt logprobs, so the rows of the others must be found past prompts that give none.
@pytest.mark.parametrize("max_num_seqs,askers", [(256, "all"), (2, "all"), (256, "alternate")])
def test_prompt_logprobs_match_hf_log_softmax(hf_checkpoint, max_num_seqs, askers):
    shape, ckpt, hf_model = hf_checkpoint
    llm = make_llm(ckpt, max_num_seqs=max_num_seqs)
    vocab = llm.get_tokenizer().vocab_size
    asks = [askers == "all" or i % 2 == 1 for i in range(len(PROMPTS))]
    params = [SamplingParams(max_tokens=1, prompt_logprobs=3 if ask else None) for ask in asks]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out, ask in zip(PROMPTS, outs, asks):
        if not ask:
            assert out.prompt_logprobs is None
            continue
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([prompt])).logits[0].float()
        reference = torch.log_softmax(logits[:, :vocab], dim=-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for i in range(1, len(prompt)):
            entry = out.prompt_logprobs[i]
            assert entry[prompt[i]] == pytest.approx(reference[i - 1, prompt[i]].item(), abs=1e-4)
            top = reference[i - 1].topk(3)
            for token, value in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[token] == pytest.approx(value, abs=1e-4), (shape, i, token)


def test_sampled_logprobs_are_raw_distribution(hf_checkpoint):
    """logprobs report the model's raw log-softmax even when a penalty and temperature reshape
    the sampling distribution; cumulative_logprob sums the sampled tokens' entries."""
    _, ckpt, hf_model = hf_checkpoint
    llm = make_llm(ckpt)
    vocab = llm.get_tokenizer().vocab_size
    params = SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.3, max_tokens=5, seed=3,
                            logprobs=2, ignore_eos=True)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0]
    ids = torch.tensor([PROMPTS[0] + out.token_ids])
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(input_ids=ids).logits[0].float()[:, :vocab], dim=-1)
    total = 0.0
    for i, token in enumerate(out.token_ids):
        row = reference[len(PROMPTS[0]) - 1 + i]
        assert out.logprobs[i][token] == pytest.approx(row[token].item(), abs=1e-4)
        assert set(row.topk(2).indices.tolist()) <= set(out.logprobs[i])
        total += row[token].item()
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-3)
