"""LLM.beam_search against Hugging Face's beam search (`generate(num_beams=...)`, canonical
early stopping) on the tiny random checkpoints of the three shapes: the same beams, in the same
order, with the same scores, with EOS ending beams part-way and without it."""
from __future__ import annotations

import pytest
import torch

from opt_testing import TINY_SHAPES, build_hf_model, favour
from opt_fast import LLM, BeamSearchParams, SamplingParams

VOCAB = 300     # no tokenizer: the engine scores all the model's rows, as HF does


def prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (3, 8, 13)[:count]]


@pytest.fixture(scope="module", params=sorted(TINY_SHAPES))
def checkpoint(request, tmp_path_factory):
    """(HF model, its directory): EOS is a token its greedy output reaches early, so beams end
    on it part-way."""
    model = build_hf_model(request.param, VOCAB)
    greedy = model.generate(torch.tensor([prompts(1, seed=0)[0]]), do_sample=False, max_new_tokens=4,
                            eos_token_id=None, pad_token_id=1)[0, -2].item()
    model.config.eos_token_id = model.generation_config.eos_token_id = greedy
    out = tmp_path_factory.mktemp(f"beam-{request.param}")
    model.save_pretrained(out)
    return model, out


def hf_beams(model, prompt, width, max_tokens, length_penalty, eos) -> tuple[list[list[int]], list[float]]:
    out = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                         max_new_tokens=max_tokens, length_penalty=length_penalty, early_stopping="never",
                         eos_token_id=eos, pad_token_id=1, return_dict_in_generate=True, output_scores=True)
    rows = out.sequences[:, len(prompt):].tolist()
    # a beam that ended early is padded after its EOS
    rows = [row[:row.index(eos) + 1] if eos is not None and eos in row else row for row in rows]
    return rows, out.sequences_scores.tolist()


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beams_equal_hugging_faces(checkpoint, length_penalty):
    model, path = checkpoint
    llm = LLM(str(path), device="cpu", kernels="torch")
    eos = model.config.eos_token_id
    batch = prompts(3, seed=0)
    got = llm.beam_search(batch, BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=length_penalty))
    stopped = 0
    for prompt, out in zip(batch, got):
        want, scores = hf_beams(model, prompt, 3, 8, length_penalty, eos)
        assert [s.token_ids for s in out.sequences] == want
        assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)
        assert out.prompt_token_ids == prompt
        for s in out.sequences:
            assert (s.finish_reason == "stop") == (s.token_ids[-1] == eos) and eos not in s.token_ids[:-1]
            stopped += s.finish_reason == "stop"
    if length_penalty <= 1.0:       # (a penalty of 2 favours the longer beams that run on)
        assert stopped, "no beam ended on EOS: the test would not cover it"


def test_a_prompt_whose_finished_beams_cannot_be_beaten_stops_early(checkpoint):
    """No length penalty: once beam_width beams have ended on EOS above every live beam's
    total, further tokens (which only lower a total) cannot change the result, so that
    prompt's rounds stop; the beams are still Hugging Face's."""
    model, path = checkpoint
    llm = LLM(str(path), device="cpu", kernels="torch")
    rows, generate = [], llm.generate
    llm.generate = lambda batch, *a, **k: rows.append(len(batch)) or generate(batch, *a, **k)
    batch = prompts(3, seed=0)
    got = llm.beam_search(batch, BeamSearchParams(beam_width=3, max_tokens=20, length_penalty=0.0))
    assert rows[1] == 9 and rows[-1] < 9           # a prompt's beams left the rounds
    for prompt, out in zip(batch, got):
        want, scores = hf_beams(model, prompt, 3, 20, 0.0, model.config.eos_token_id)
        assert [s.token_ids for s in out.sequences] == want
        assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)


def test_ignore_eos_runs_every_beam_to_max_tokens(checkpoint):
    model, path = checkpoint
    llm = LLM(str(path), device="cpu", kernels="torch")
    prompt = prompts(1, seed=0)[0]
    out = llm.beam_search(prompt, BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True))[0]
    want, scores = hf_beams(model, prompt, 4, 6, 1.0, None)
    assert [s.token_ids for s in out.sequences] == want
    assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)
    assert {s.finish_reason for s in out.sequences} == {"length"}


def test_one_beam_is_greedy_decoding(checkpoint):
    _, path = checkpoint
    llm = LLM(str(path), device="cpu", kernels="torch")
    batch = prompts(3, seed=1)
    beams = llm.beam_search(batch, BeamSearchParams(beam_width=1, max_tokens=7, ignore_eos=True))
    greedy = llm.generate(batch, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=0),
                          use_tqdm=False)
    for beam, out in zip(beams, greedy):
        assert beam.sequences[0].token_ids == out.outputs[0].token_ids
        assert beam.sequences[0].cumulative_logprob == pytest.approx(out.outputs[0].cumulative_logprob, abs=1e-4)


def test_rounds_reuse_the_beams_blocks_and_leak_none(checkpoint):
    _, path = checkpoint
    llm = LLM(str(path), device="cpu", kernels="torch", block_size=4)
    reused, generate = [], llm.generate

    def remember_reuse(*args, **kwargs):
        outs = generate(*args, **kwargs)
        reused.append([o.num_cached_tokens for o in outs])
        return outs
    llm.generate = remember_reuse
    llm.beam_search(prompts(1, seed=2)[0], BeamSearchParams(beam_width=2, max_tokens=9, ignore_eos=True))
    assert max(reused[-1]) >= 8                     # later rounds start from cached blocks
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


def test_bad_beam_search_params_name_the_field():
    for kwargs, field in ((dict(beam_width=0, max_tokens=4), "beam_width"),
                          (dict(beam_width=1025, max_tokens=4), "beam_width"),
                          (dict(beam_width=2, max_tokens=-1), "max_tokens"),
                          (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "length_penalty"),
                          (dict(beam_width=2, max_tokens=4, ignore_eos=1), "ignore_eos")):
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**kwargs)


def test_beam_search_rejects_what_cannot_fit_and_names_a_failing_step(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cpu", kernels="torch", num_kv_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.beam_search([2, 5, 6], BeamSearchParams(beam_width=2, max_tokens=20))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.beam_search([2, 5, 6], BeamSearchParams(beam_width=2, max_tokens=300))
    engine = llm.engine
    append = engine._append

    def failing(seq, result):
        if len(seq.token_ids) > 6:          # the fourth round's step fails
            raise RuntimeError("boom")
        append(seq, result)
    engine._append = failing
    with pytest.raises(RuntimeError, match="boom"):
        llm.beam_search([2, 5, 6], BeamSearchParams(beam_width=2, max_tokens=8))
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_text_prompts_and_a_beam_wider_than_half_the_vocabulary(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cpu", kernels="torch")
    tokenizer = llm.get_tokenizer()
    out = llm.beam_search("def wrap(text", BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True))[0]
    assert out.prompt == "def wrap(text" and out.prompt_token_ids == tokenizer.encode("def wrap(text")
    assert [s.text for s in out.sequences] == [tokenizer.decode(s.token_ids) for s in out.sequences]
    wide = llm.beam_search([2, 5, 6], BeamSearchParams(beam_width=tokenizer.vocab_size // 2 + 3, max_tokens=2,
                                                       ignore_eos=True))[0]
    assert len(wide.sequences) == tokenizer.vocab_size // 2 + 3


def test_a_beam_that_ends_in_eos_has_no_end_token_in_its_text(tiny_model_dir):
    """EOS is made the likeliest token, so beams stop on it: their token_ids end in it, their
    text (like every text here) is decoded without special tokens."""
    llm = LLM(str(tiny_model_dir), device="cpu", kernels="torch")
    tokenizer = llm.get_tokenizer()
    favour(llm.engine.runner, tokenizer.eos_token_id)
    out = llm.beam_search("import os", BeamSearchParams(beam_width=3, max_tokens=4))[0]
    assert any(s.finish_reason == "stop" and s.token_ids[-1] == tokenizer.eos_token_id for s in out.sequences)
    for sequence in out.sequences:
        assert "</s>" not in sequence.text and sequence.text == tokenizer.decode(sequence.token_ids)
