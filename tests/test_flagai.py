"""FlagAI's AutoLoader / Predictor quick start on a tiny random OPT in FlagAI's directory layout,
checked against a plain-torch re-implementation of FlagAI's sampling loop on the HF model."""
from __future__ import annotations

import shutil

import warnings

import pytest
import torch

from opt_testing import PADDING_ROWS, TINY_SHAPES, randomise_, test_device
from opt_fast import SamplingParams
from opt_fast.flagai import AutoLoader, Predictor
from opt_fast.tokenizer import OPTTokenizer

UNK = 3
TEXTS = ["def wrap(text, width=70):", "import os\nimport sys\n", "class Template:\n    ",
         "for i in range(len(", "return self."]


def save_flagai_checkpoint(model, folder, tokenizer_dir):
    """FlagAI's layout: config.json, pytorch_model.bin (a bare state dict), vocab.json, merges.txt."""
    folder.mkdir(parents=True)
    model.config.to_json_file(folder / "config.json")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, folder / name)


@pytest.fixture(scope="module")
def flagai_root(tmp_path_factory, tiny_tokenizer_dir):
    """(root with checkpoints/opt-125m-en/, the HF model). 512 positions, so that the quick
    start's 100 + 300 tokens fit."""
    transformers = pytest.importorskip("transformers")
    vocab = OPTTokenizer.from_dir(tiny_tokenizer_dir).vocab_size + PADDING_ROWS
    config = transformers.OPTConfig(vocab_size=vocab, max_position_embeddings=512, dropout=0.0,
                                    attention_dropout=0.0, activation_dropout=0.0, **TINY_SHAPES["pre_ln"])
    model = transformers.OPTForCausalLM(config).eval()
    randomise_(model, seed=0)
    model.tie_weights()
    root = tmp_path_factory.mktemp("flagai")
    save_flagai_checkpoint(model, root / "checkpoints" / "opt-125m-en", tiny_tokenizer_dir)
    return root, model


@pytest.fixture(scope="module")
def predictor(flagai_root) -> Predictor:
    root, _ = flagai_root
    loader = AutoLoader(task_name="lm", model_name="opt-125m-en", model_dir=root / "checkpoints",
                        kernels="torch", device=test_device(), dtype="float32")   # as the HF reference
    return Predictor(loader.get_model(), loader.get_tokenizer())


def flagai_loop(hf_model, tokenizer, text, input_max_length, out_max_length, repetition_penalty,
                temperature, top_p, penalty_on_logprobs=True) -> str:
    """FlagAI's gpt_random_sample with top_k=1 in plain torch, one full forward per token.

    log_softmax (or raw logits, HF's order, when not penalty_on_logprobs) -> <unk> banned ->
    CTRL penalty over prompt + output -> temperature -> top-k -> top-p -> the one token left;
    </s> stops and is not output. Only the tokenizer's ids are scored (see the README).
    """
    eos, vocab = tokenizer.eos_token_id, tokenizer.vocab_size
    tokens = tokenizer.encode(text)[:input_max_length]
    if len(tokens) > 1 and tokens[-1] == eos:
        tokens.pop()
    output = []
    for _ in range(out_max_length):
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([tokens])).logits[0, -1, :vocab].float()
        scores = torch.log_softmax(logits, dim=-1) if penalty_on_logprobs else logits.clone()
        scores[UNK] = float("-inf")
        seen = torch.tensor(tokens)
        values = scores[seen]
        scores[seen] = torch.where(values < 0, values * repetition_penalty, values / repetition_penalty)
        scores = scores / temperature
        scores[scores < scores.max()] = float("-inf")                  # top-k, k = 1
        ranked, order = scores.sort(descending=True)
        cumulative = ranked.softmax(-1).cumsum(-1)
        remove = torch.cat([torch.tensor([False]), cumulative[:-1] > top_p])
        scores[order[remove]] = float("-inf")                           # top-p, FlagAI's rule
        kept = torch.isfinite(scores).nonzero()[:, 0].tolist()
        assert len(kept) == 1, "the reference is only defined where one token is left"
        if kept[0] == eos:
            break
        output.append(kept[0])
        tokens.append(kept[0])
    return tokenizer.decode(output, skip_special_tokens=False)


def test_quick_start_runs_as_written(flagai_root, monkeypatch):
    root, _ = flagai_root
    monkeypatch.chdir(root)
    text = "def wrap(text, width=70):"
    loader = AutoLoader(task_name="lm", model_name="opt-125m-en", model_dir="./checkpoints",
                        kernels="torch", device=test_device())
    model = loader.get_model()
    tokenizer = loader.get_tokenizer()
    assert model.eval() is model
    predictor = Predictor(model, tokenizer)
    out = predictor.predict_generate_randomsample(text, input_max_length=100, out_max_length=300,
                                                  top_k=30, top_p=0.9, repetition_penalty=3.0)
    assert isinstance(out, str) and out
    assert "</s>" not in out and "<unk>" not in out
    # the script run again (a fresh loader, the LLM's default seed) prints the same text
    again = AutoLoader(task_name="lm", model_name="opt-125m-en", model_dir="./checkpoints",
                       kernels="torch", device=test_device())
    assert Predictor(again.get_model(), again.get_tokenizer()).predict_generate_randomsample(
        text, input_max_length=100, out_max_length=300, top_k=30, top_p=0.9, repetition_penalty=3.0) == out
    seeded = [predictor.predict_generate_randomsample(text, input_max_length=100, out_max_length=300, top_k=30,
                                                      top_p=0.9, repetition_penalty=3.0, seed=5) for _ in range(2)]
    assert seeded[0] == seeded[1] and "</s>" not in seeded[0] and "<unk>" not in seeded[0]


def test_deterministic_output_equals_flagai_loop_and_differs_from_hf_order(predictor, flagai_root):
    _, hf_model = flagai_root
    tokenizer = predictor.tokenizer
    cases = [(text, 100) for text in TEXTS[:3]] + [(TEXTS[1] * 5, 4)]    # the last is truncated
    differs = 0
    for text, input_max_length in cases:
        out = predictor.predict_generate_randomsample(text, input_max_length=input_max_length,
                                                      out_max_length=16, top_k=1, top_p=0.9,
                                                      repetition_penalty=3.0, temperature=0.7)
        expected = flagai_loop(hf_model, tokenizer, text, input_max_length, 16, 3.0, 0.7, 0.9)
        assert out == expected, text
        hf_order = flagai_loop(hf_model, tokenizer, text, input_max_length, 16, 3.0, 0.7, 0.9,
                               penalty_on_logprobs=False)
        differs += out != hf_order
    # The penalty's place matters on this model, so the equality above really checks FlagAI's order.
    assert differs >= 1


def test_unk_is_never_drawn(flagai_root, tiny_tokenizer_dir, tmp_path):
    """A model that puts <unk> far ahead of everything else: plain greedy picks it, FlagAI's
    sampler must not."""
    _, hf_model = flagai_root
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    hidden = hf_model.config.hidden_size
    direction = torch.nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(0)), dim=0)
    state["model.decoder.final_layer_norm.bias"] = 20 * direction
    state["model.decoder.embed_tokens.weight"][UNK] = 5 * direction
    state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"]
    hf_model = type(hf_model)(hf_model.config).eval()
    hf_model.load_state_dict(state)
    save_flagai_checkpoint(hf_model, tmp_path / "opt-125m-en", tiny_tokenizer_dir)
    loader = AutoLoader(model_name="opt-125m-en", model_dir=tmp_path, kernels="torch", device=test_device(),
                        dtype="float32")
    greedy = loader.get_model().llm.generate(TEXTS[0], SamplingParams(temperature=0, max_tokens=8),
                                             use_tqdm=False)[0]
    assert UNK in greedy.outputs[0].token_ids
    out = Predictor(loader.get_model(), loader.get_tokenizer()).predict_generate_randomsample(
        TEXTS[0], out_max_length=8, top_k=1)
    assert out and "<unk>" not in out
    assert out == flagai_loop(hf_model, loader.get_tokenizer(), TEXTS[0], 256, 8, 1.0, 1.0, 1.0)


def test_the_end_token_ends_the_output_and_is_not_part_of_it(flagai_root, tiny_tokenizer_dir, tmp_path,
                                                            monkeypatch):
    """A model whose position rows, from the 6th output token's on, point far along </s>'s
    embedding: 5 tokens, then </s> is drawn. It ends the output and is not in the text, which
    equals FlagAI's loop's."""
    _, hf_model = flagai_root
    tokenizer = OPTTokenizer.from_dir(tiny_tokenizer_dir)
    eos, text = tokenizer.eos_token_id, TEXTS[0]
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    direction = torch.nn.functional.normalize(torch.randn(hf_model.config.hidden_size,
                                                          generator=torch.Generator().manual_seed(0)), dim=0)
    state["model.decoder.embed_tokens.weight"][eos] = 5 * direction
    state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"]
    # HF's OPT reads position p from row p + 2; output token i is drawn at position len(prompt) - 1 + i
    state["model.decoder.embed_positions.weight"][2 + len(tokenizer.encode(text)) - 1 + 5:] += 100 * direction
    hf_model = type(hf_model)(hf_model.config).eval()
    hf_model.load_state_dict(state)
    save_flagai_checkpoint(hf_model, tmp_path / "opt-125m-en", tiny_tokenizer_dir)
    loader = AutoLoader(model_name="opt-125m-en", model_dir=tmp_path, kernels="torch", device=test_device(),
                        dtype="float32")
    llm, drawn = loader.get_model().llm, []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda p, *a, **k: (lambda outs: drawn.extend(
        o.outputs[0].token_ids for o in outs) or outs)(generate(p, *a, **k)))
    out = Predictor(loader.get_model(), loader.get_tokenizer()).predict_generate_randomsample(
        text, out_max_length=12, top_k=1)
    assert len(drawn) == 1 and len(drawn[0]) == 6 and drawn[0][-1] == eos and eos not in drawn[0][:-1]
    assert out and "</s>" not in out
    assert out == tokenizer.decode(drawn[0][:-1], skip_special_tokens=False)
    assert out == flagai_loop(hf_model, tokenizer, text, 256, 12, 1.0, 1.0, 1.0)


def test_top_p_zero_keeps_the_most_likely_token(predictor, flagai_root):
    """FlagAI's top-p with p = 0 keeps only the most likely token: the same as top-k 1."""
    _, hf_model = flagai_root
    out = predictor.predict_generate_randomsample(TEXTS[0], out_max_length=16, top_p=0, seed=1)
    assert out == predictor.predict_generate_randomsample(TEXTS[0], out_max_length=16, top_k=1, seed=1)
    assert out == flagai_loop(hf_model, predictor.tokenizer, TEXTS[0], 256, 16, 1.0, 1.0, 1.0)
    # (while the default top-k 30 draws something else: top_p=0 is not simply ignored)
    assert out != predictor.predict_generate_randomsample(TEXTS[0], out_max_length=16, seed=1)


def test_top_p_and_temperature_reach_the_sampler(predictor):
    """Under top-k 30, a nucleus of 1e-6 and a temperature of 1e-4 each leave the argmax alone,
    so both equal top-k 1 (which the deterministic tests use, and which hides both settings)."""
    def run(**settings):
        return predictor.predict_generate_randomsample(TEXTS[0], out_max_length=12, seed=3, **settings)
    greedy = run(top_k=1)
    assert run(top_k=30, top_p=1e-6) == greedy
    assert run(top_k=30, temperature=1e-4) == greedy
    assert run(top_k=30) != greedy


def test_prompt_plus_output_may_fill_every_position(predictor):
    limit = predictor.model.llm.engine.max_model_len
    prompt_len = len(predictor.tokenizer.encode(TEXTS[0]))
    assert isinstance(predictor.predict_generate_randomsample(TEXTS[0], out_max_length=limit - prompt_len,
                                                              top_k=1), str)
    with pytest.raises(ValueError, match="out_max_length"):
        predictor.predict_generate_randomsample(TEXTS[0], out_max_length=limit - prompt_len + 1, top_k=1)


def test_prompt_is_truncated_and_loses_a_trailing_end_token(predictor, monkeypatch):
    llm = predictor.model.llm
    prompts = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda p, *a, **k: prompts.extend(p) or generate(p, *a, **k))
    tokenizer = predictor.tokenizer
    long_text = " ".join(TEXTS)
    predictor.predict_generate_randomsample(long_text, input_max_length=5, out_max_length=2)
    assert prompts[-1] == tokenizer.encode(long_text)[:5] and len(prompts[-1]) == 5
    with_end = tokenizer.encode("return self.</s>")
    assert with_end[-1] == tokenizer.eos_token_id
    predictor.predict_generate_randomsample("return self.</s>", out_max_length=2)
    assert prompts[-1] == with_end[:-1]


def test_list_of_texts_is_one_batch_equal_to_texts_one_by_one(predictor, monkeypatch):
    llm = predictor.model.llm
    calls = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda p, *a, **k: calls.append(len(p)) or generate(p, *a, **k))
    for settings in (dict(top_k=1), dict(top_k=30, top_p=0.9, temperature=0.8, seed=7)):
        calls.clear()
        batch = predictor.predict_generate_randomsample(TEXTS[:3], out_max_length=12, repetition_penalty=3.0,
                                                        **settings)
        assert calls == [3]
        alone = [predictor.predict_generate_randomsample(t, out_max_length=12, repetition_penalty=3.0, **settings)
                 for t in TEXTS[:3]]
        assert batch == alone
    assert predictor.predict_generate_randomsample([], out_max_length=4) == []


def test_numpy_integers_are_taken_as_sampling_params_takes_them(predictor):
    np = pytest.importorskip("numpy")
    as_numpy = predictor.predict_generate_randomsample(TEXTS[2], input_max_length=np.int64(100),
                                                       out_max_length=np.int32(6), top_k=np.int64(30), seed=3)
    assert as_numpy == predictor.predict_generate_randomsample(TEXTS[2], input_max_length=100, out_max_length=6,
                                                               top_k=30, seed=3)


def test_seed_makes_sampling_reproducible(predictor):
    def run(seed):
        return predictor.predict_generate_randomsample(TEXTS[2], out_max_length=12, top_k=30, seed=seed)
    assert run(3) == run(3) != run(4)


@pytest.mark.parametrize("name, value", [
    ("input_max_length", 0), ("out_max_length", 0), ("out_max_length", 1000), ("top_k", 0),
    ("top_k", 2.5), ("top_p", 1.5), ("top_p", float("nan")), ("repetition_penalty", 0.0),
    ("temperature", 0), ("temperature", "hot"), ("seed", "x"), ("text", 5), ("text", ["a", 3])])
def test_bad_arguments_raise_value_error_naming_them(predictor, name, value):
    kwargs = {"text": "def", name: value}
    with pytest.raises(ValueError, match=name):
        predictor.predict_generate_randomsample(**kwargs)


def test_loader_rejects_other_tasks_and_foreign_models(tmp_path):
    with pytest.raises(ValueError, match="task_name"):
        AutoLoader(task_name="seq2seq", model_name="opt-125m-en", model_dir=tmp_path)
    with pytest.raises(ValueError, match="model_name"):
        AutoLoader(task_name="lm", model_dir=tmp_path)
    with pytest.raises(ValueError, match="model"):
        Predictor(object(), None)
    with pytest.raises(ValueError, match="model_dir"):
        AutoLoader(task_name="lm", model_name="opt-125m-en", model_dir=None)


def test_predictor_takes_only_the_loaders_tokenizer(predictor):
    with pytest.raises(ValueError, match="tokenizer must come from AutoLoader"):
        Predictor(predictor.model, "x")


def test_flagai_model_moves_are_checks_and_torch_dtype_is_taken(flagai_root, predictor):
    """FlagAI scripts call model.to(device) / .half() after loading, and may pass torch_dtype:
    moves that agree with the engine return the model silently, others warn and change nothing."""
    model = predictor.model
    runner = model.llm.engine.runner
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.to(runner.device) is model and model.to(str(runner.device.type)) is model
        assert model.float() is model and model.to(torch.float32) is model       # the fixture's dtype
        assert model.to(runner.device, torch.float32) is model
        assert model.to(device=runner.device.type, dtype=torch.float32) is model
        assert model.to(torch.zeros(1, device=runner.device), non_blocking=True) is model
        assert model.to(memory_format=torch.contiguous_format) is model
    with pytest.warns(UserWarning, match="dtype torch.float32.*pass dtype= to AutoLoader"):
        assert model.half() is model
    assert runner.dtype == torch.float32
    with pytest.warns(UserWarning, match="device"):
        model.to("meta")
    with pytest.raises(ValueError, match="'junk' names no device"):
        model.to("junk")
    for device in ("x", 1.5, True, "cpu", torch.device("cpu")):
        with pytest.raises(ValueError, match="device must be a CUDA device index"):
            model.cuda(device)
    # a CUDA device's name is taken as torch's Module.cuda takes it: where the model is, a check
    if runner.device.type == "cuda":
        assert model.cuda(str(runner.device)) is model
    else:
        with pytest.warns(UserWarning, match="device"):
            model.cuda("cuda:0")
    root, _ = flagai_root
    loader = AutoLoader(task_name="lm", model_name="opt-125m-en", model_dir=root / "checkpoints",
                        kernels="torch", device=test_device(), torch_dtype=torch.bfloat16)
    assert loader.get_model().llm.engine.runner.dtype == torch.bfloat16
    for kwargs, error, message in ((dict(torch_dtype=torch.float64), ValueError, "torch_dtype"),
                                   (dict(torch_dtype=torch.float16, dtype="float32"), ValueError, "disagree"),
                                   (dict(only_download_config=True), TypeError, "AutoLoader.*only_download_config")):
        with pytest.raises(error, match=message):
            AutoLoader(task_name="lm", model_name="opt-125m-en", model_dir=root / "checkpoints", kernels="torch",
                       **kwargs)


def test_missing_directory_falls_back_to_the_hub_id(flagai_root, tiny_tokenizer_dir, monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    root, _ = flagai_root
    asked = []

    def snapshot_download(repo_id, **kwargs):     # stands in for the hub: no network is touched
        asked.append(repo_id)
        return str(root / "checkpoints" / "opt-125m-en")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loader = AutoLoader(task_name="lm", model_name="opt-125m-en", model_dir=tmp_path, kernels="torch",
                        device=test_device())
    assert asked[0] == "facebook/opt-125m"
    # the downloaded snapshot's tokenizer, not some other one
    text = "def load(path):\n    return open(path).read()"
    assert loader.get_tokenizer().encode(text) == OPTTokenizer.from_dir(tiny_tokenizer_dir).encode(text)

    def offline(repo_id, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="local directory"):
        AutoLoader(task_name="lm", model_name="opt-1.3b-en", model_dir=tmp_path)
