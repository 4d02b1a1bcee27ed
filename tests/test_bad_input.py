"""Bad input through the public API ends in a ValueError naming the field and the value, leaves no
request or KV block behind, and harms no other request; values at the edges of what is valid
still run."""
from __future__ import annotations

import numpy as np
import pytest

from opt_testing import test_device
from opt_fast import LLM, BeamSearchParams, Engine, SamplingParams
from opt_fast.sampling_params import GREEDY_BELOW

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32", device=test_device(), kernels="torch", num_kv_blocks=64,
               block_size=4)


def assert_engine_empty(llm) -> None:
    engine = llm.engine
    assert not engine.requests and not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("field,value", [
    ("top_k", 2 ** 63), ("n", 2 ** 64), ("max_tokens", 10 ** 30), ("logprobs", 2 ** 63), ("stop_token_ids", [2 ** 63]),
    ("temperature", 10 ** 400), ("top_p", -10 ** 400), ("repetition_penalty", 10 ** 400),
    ("temperature", np.float32("nan"))])
def test_numbers_past_what_the_sampler_holds_are_value_errors(field, value):
    """Integers past int64 (the sampler's row tensors) and ints past float's range, caught
    when the params are built, not inside a step where they would stop every request."""
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_numpy_floats_are_kept_as_python_floats():
    params = SamplingParams(temperature=np.float32(0.5), top_p=np.float16(0.25), repetition_penalty=np.float64(1.5))
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.5, 0.25, 1.5)
    assert all(type(v) is float for v in (params.temperature, params.top_p, params.repetition_penalty))


def test_temperatures_too_small_to_divide_by_are_greedy(llm):
    """Logits divided by a temperature near 1e-45 overflow float32; below GREEDY_BELOW the params
    hold 0 (greedy), and the tokens are the greedy ones."""
    assert SamplingParams(temperature=GREEDY_BELOW / 2).temperature == 0.0
    assert SamplingParams(temperature=GREEDY_BELOW).temperature == GREEDY_BELOW
    prompt = [2, 5, 6, 7]
    tiny = SamplingParams(temperature=1e-45, max_tokens=3, ignore_eos=True, seed=1)
    [greedy], [ours] = llm.generate([prompt], GREEDY, use_tqdm=False), llm.generate([prompt], tiny, use_tqdm=False)
    assert ours.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_a_text_that_is_no_unicode_adds_no_request(llm):
    """Lone surrogates (what undecodable command-line bytes become) are a ValueError, and the
    prompts of the same call added before it are withdrawn."""
    with pytest.raises(ValueError, match="not valid Unicode"):
        llm.generate(["ab", "\ud800"], GREEDY, use_tqdm=False)
    assert_engine_empty(llm)
    with pytest.raises(ValueError, match="not valid Unicode"):
        llm.get_tokenizer().encode("x\udcff")


@pytest.mark.parametrize("prompts", [None, 5, 1.5, {"a": 1}, b"ab"])
def test_prompts_of_another_type_are_value_errors(llm, prompts):
    with pytest.raises(ValueError, match="prompts must be"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_engine_empty(llm)


def test_any_collection_of_prompts_is_taken(llm):
    """A generator or a tuple of prompts is a batch, as a list is."""
    batch = [[2, 5, 6], "ab"]
    expected = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]
    for given in ((p for p in batch), tuple(batch)):
        assert [o.outputs[0].token_ids for o in llm.generate(given, GREEDY, use_tqdm=False)] == expected


@pytest.mark.parametrize("ids", [[-1], [2 ** 70], [1.5], ["3"]])
def test_decoding_ids_that_are_no_token_ids_is_a_value_error(llm, ids):
    with pytest.raises(ValueError, match="ids must be"):
        llm.get_tokenizer().decode(ids)


def test_banning_every_id_is_a_value_error(llm):
    """A request that would leave the sampler nothing to draw is refused when added, and the
    requests beside it run on."""
    vocab = llm.get_tokenizer().vocab_size
    eos = llm.engine.eos_token_id
    others = [t for t in range(vocab) if t != eos]
    for params in (SamplingParams(banned_token_ids=list(range(vocab))),
                   SamplingParams(banned_token_ids=others, min_tokens=2),
                   SamplingParams(stop_token_ids=list(range(vocab)), min_tokens=1)):
        with pytest.raises(ValueError, match="nothing is left to draw"):
            llm.generate([[2, 5, 6]], params, use_tqdm=False)
        assert_engine_empty(llm)
    # one id left, or the EOS ban lifted by ignore_eos or by min_tokens=0: drawable
    [out] = llm.generate([[2, 5, 6]], SamplingParams(banned_token_ids=others, min_tokens=2, ignore_eos=True,
                                                     max_tokens=2), use_tqdm=False)
    assert out.outputs[0].token_ids == [eos, eos]
    [out] = llm.generate([[2, 5, 6]], SamplingParams(banned_token_ids=others, max_tokens=2), use_tqdm=False)
    assert out.outputs[0].token_ids == [eos]


@pytest.mark.parametrize("model", [None, 5, "", "  "])
def test_a_model_argument_that_is_no_name_is_a_value_error(model):
    with pytest.raises(ValueError, match="model must name"):
        LLM(model, device="cpu", kernels="torch")


@pytest.mark.parametrize("name", ["stream_outputs", "progress"])
def test_engine_flags_that_are_no_bools_are_value_errors(tiny_model_dir, name):
    with pytest.raises(ValueError, match=f"{name} must be a bool, got 'no'"):
        Engine(str(tiny_model_dir), device="cpu", kernels="torch", **{name: "no"})


def test_a_block_too_large_for_the_pool_names_block_size(tiny_model_dir):
    with pytest.raises(ValueError, match="KV cache of 0 blocks .*block_size=2147483648.*lower max_model_len or "
                                         "block_size"):
        Engine(str(tiny_model_dir), device="cpu", kernels="torch", block_size=2 ** 31)


def test_a_missing_model_directory_is_a_value_error_and_a_file_not_found_error(tmp_path):
    for model in (str(tmp_path / "absent"), tmp_path / "absent"):
        with pytest.raises(ValueError, match="no such directory") as caught:
            LLM(model, device="cpu", kernels="torch")
        assert isinstance(caught.value, FileNotFoundError)


def test_a_kv_cache_the_device_cannot_hold_is_a_value_error(tiny_model_dir):
    with pytest.raises(ValueError, match=r"num_kv_blocks=\d+ .* cannot allocate"):
        LLM(str(tiny_model_dir), device="cpu", kernels="torch", num_kv_blocks=2 ** 31 - 1)


def test_length_penalties_past_floats_range(llm):
    """A penalty past float's range is refused; one whose powers leave it (1e308) still scores
    every beam and finishes."""
    with pytest.raises(ValueError, match="length_penalty"):
        BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=10 ** 400)
    for penalty in (1e308, -1e308):
        [out] = llm.beam_search([[2, 5, 6]], BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=penalty))
        assert len(out.sequences) == 2
    assert_engine_empty(llm)


def test_numpy_integers_configure_an_engine_as_python_ints(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cpu", kernels="torch", block_size=np.int64(4), num_kv_blocks=np.int32(40),
              max_num_seqs=np.int16(3))
    cfg = llm.engine.cfg
    assert (cfg.block_size, cfg.num_kv_blocks, cfg.max_num_seqs) == (4, 40, 3)
    assert all(type(v) is int for v in (cfg.block_size, cfg.num_kv_blocks, cfg.max_num_seqs))
    params = BeamSearchParams(beam_width=np.int64(2), max_tokens=np.int8(3))
    assert (type(params.beam_width), type(params.max_tokens)) == (int, int)


@pytest.mark.parametrize("field", ["stop", "stop_token_ids", "banned_token_ids"])
def test_a_dict_is_no_list_of_stops_or_ids(field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: {"a": 1} if field == "stop" else {3: 1}})
