"""Incremental text and stop strings on unicode, with a scripted model: the logits force a chosen
token sequence, so multi-byte characters split over several byte-level tokens arrive one byte
token at a time, exactly as a real model can emit them."""
from __future__ import annotations

import pytest
import torch

from opt_testing import eager_on_cuda, edit_logits, favour, test_device, track_sampled_rows
from opt_fast import Engine, SamplingParams

TEXT = " Grüße, 世界! naïve café 🙂 — fin."


@pytest.fixture()
def scripted(tiny_model_dir):
    """(engine, script): each request's model emits `script` token by token, then EOS."""
    engine = Engine(str(tiny_model_dir), device=test_device(), kernels="torch", **eager_on_cuda())
    script = engine.tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(script) > len(TEXT.encode()) // 3       # the tiny vocabulary splits the text finely
    # (under async scheduling a step may be launched ahead: it computes the token after the one
    # in flight, which num_output_tokens does not count yet)
    rows = track_sampled_rows(engine.runner)

    def forced(logits):
        forced_rows = torch.full_like(logits, -30.0)
        for row, (seq, pending) in enumerate(zip(rows["seqs"], rows["pending"])):
            position = seq.num_output_tokens + pending
            target = script[position] if position < len(script) else engine.eos_token_id
            forced_rows[row, target] = 30.0
        return forced_rows
    edit_logits(engine.runner, forced)
    return engine, script


def stream(engine: Engine, request_id: str, prompt: str, params: SamplingParams) -> list:
    engine.add_request(request_id, prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == request_id]
    return outs


def test_streamed_text_grows_by_whole_characters(scripted):
    engine, script = scripted
    outs = stream(engine, "r", "x", SamplingParams(temperature=0, max_tokens=200))
    texts = [o.outputs[0].text for o in outs]
    assert texts[-1] == TEXT and outs[-1].outputs[0].finish_reason == "stop"
    assert outs[-1].outputs[0].token_ids == script + [engine.eos_token_id]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert not any("\ufffd" in t for t in texts)          # never half a character
    # some steps added nothing: a character's first bytes waited for its last
    assert any(a == b for a, b in zip(texts, texts[1:]))


@pytest.mark.parametrize("by", ["stop_token_ids", "eos"])
def test_a_stop_tokens_text_is_not_output(scripted, by):
    """A sample ended by one of its stop_token_ids, or by EOS, keeps the token in token_ids and
    leaves its text out, as vLLM does: here the script's last token "." (stopping there), or
    EOS after it, with skip_special_tokens=False (else "</s>" would not show anyway)."""
    engine, script = scripted
    assert engine.tokenizer.decode(script[-1:]) == "." and script.count(script[-1]) == 1
    stops = [script[-1]] if by == "stop_token_ids" else None
    outs = stream(engine, "r", "x", SamplingParams(temperature=0, max_tokens=200, stop_token_ids=stops,
                                                   skip_special_tokens=False))
    final = outs[-1].outputs[0]
    assert final.finish_reason == "stop"
    if by == "stop_token_ids":
        assert final.token_ids == script and final.text == TEXT[:-1]
    else:
        assert final.token_ids == script + [engine.eos_token_id] and final.text == TEXT
    texts = [o.outputs[0].text for o in outs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


@pytest.mark.parametrize("stop", ["世界", "🙂", "é 🙂", "ße,"])
def test_stop_strings_on_multibyte_text_are_cut_and_excluded(scripted, stop):
    engine, script = scripted
    outs = stream(engine, "r", "x", SamplingParams(temperature=0, max_tokens=200, stop=[stop]))
    final = outs[-1].outputs[0]
    assert final.finish_reason == "stop"
    assert final.text == TEXT[:TEXT.index(stop)]
    # it stopped at the token that completed the stop string, not later
    completing = next(n for n in range(1, len(script) + 1) if stop in engine.tokenizer.decode(script[:n]))
    assert final.token_ids == script[:completing]
    # and no streamed text ever showed any of it
    assert all(TEXT[:TEXT.index(stop)].startswith(o.outputs[0].text) for o in outs)


def test_stop_string_not_in_the_text_runs_to_max_tokens(scripted):
    engine, _ = scripted
    final = stream(engine, "r", "x", SamplingParams(temperature=0, max_tokens=7, stop=["zzz"]))[-1].outputs[0]
    assert final.finish_reason == "length" and len(final.token_ids) == 7
    assert final.text == engine.tokenizer.decode(final.token_ids)


@pytest.mark.parametrize("stop", [None, ["never"]])
def test_skip_special_tokens_false_keeps_them_in_the_text(tiny_model_dir, stop):
    """Every row draws <pad>: with skip_special_tokens=False the text holds it, in the final
    decode (no stop strings) and in the incremental one (stop strings are looked for as text
    grows)."""
    from opt_fast import LLM
    llm = LLM(str(tiny_model_dir), device="cpu", kernels="torch")
    tokenizer = llm.get_tokenizer()
    favour(llm.engine.runner, tokenizer.pad_token_id)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, skip_special_tokens=False, stop=stop)
    out = llm.generate("import os", params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [tokenizer.pad_token_id] * 2 and out.text == "<pad><pad>"
    skipped = llm.generate("import os", SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, stop=stop),
                           use_tqdm=False)[0].outputs[0]
    assert skipped.token_ids == out.token_ids and skipped.text == ""


def test_held_back_text_is_the_longest_end_that_could_begin_a_stop_string():
    from types import SimpleNamespace
    from opt_fast.engine.engine import _visible_text

    def visible(text, stops, finished=False):
        seq = SimpleNamespace(text=text, params=SimpleNamespace(stop=stops), is_finished=finished)
        return _visible_text(seq)
    stops = ["abc", "bd", "🙂!"]
    assert visible("xxab", stops) == "xx"            # "ab" may grow into "abc"
    assert visible("xxb", stops) == "xx"             # "b" may begin "bd" (or "abc" no: not its start)
    assert visible("xxa", stops) == "xx"
    assert visible("x🙂", stops) == "x"
    assert visible("xxc", stops) == "xxc"            # no stop string starts with "c"
    assert visible("ab", stops) == ""                # the whole text may be a stop string's start
    assert visible("xxab", stops, finished=True) == "xxab"
    assert visible("xxab", []) == "xxab"
