"""The whole model on the Triton kernels (the interpreter on CPU) against the torch path and HF."""
from __future__ import annotations

import pytest
import torch

from opt_testing import assert_same_outputs, record_preemptions, test_device
from opt_fast import LLM, SamplingParams
from opt_fast.kernels import CUBLAS_FASTER, TORCH_OPS, auto_layernorm_linear, get_ops, implementations, triton_ops
from opt_fast import kernels as kernels_module
from opt_fast.kernels import layernorm_linear as ll
from test_parity_hf import PROMPTS, hf_greedy

NEW_TOKENS = 6   # the interpreter runs every kernel in numpy: keep the decode short

pytestmark = pytest.mark.skipif(bool(triton_ops().missing()),
                                reason=f"Triton kernels not built yet: {triton_ops().missing()}")


def assert_same_tokens_and_logprobs(ours, reference) -> None:
    """Equal tokens, and logprobs within the issue's 2e-3 of the torch path's: on the tiny random
    model greedy tokens barely depend on content (a missing bias or a non-causal mask leaves them
    alone but moves logprobs by ~0.1). The requests ask for logprobs=0."""
    assert all(len(o.outputs[0].logprobs) == len(o.outputs[0].token_ids) for o in ours)
    assert_same_outputs(reference, ours, atol=2e-3)


def test_triton_model_matches_torch_and_hf(hf_checkpoint):
    shape, ckpt, hf_model = hf_checkpoint
    triton_llm = LLM(str(ckpt), dtype="float32", device=test_device(), kernels="triton")
    assert triton_llm.engine.runner.ops == triton_ops()     # every op, the fused GEMMs included
    torch_llm = LLM(str(ckpt), dtype="float32", device=test_device(), kernels="torch")
    vocab = triton_llm.get_tokenizer().vocab_size
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, repetition_penalty=1.2)
    ours = triton_llm.generate(PROMPTS, greedy, use_tqdm=False)
    reference = torch_llm.generate(PROMPTS, greedy, use_tqdm=False)
    for prompt, a, b in zip(PROMPTS, ours, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, (shape, prompt)
        assert a.outputs[0].token_ids == hf_greedy(hf_model, prompt, vocab, NEW_TOKENS, 1.2), (shape, prompt)
    scored = triton_llm.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    for prompt, out in zip(PROMPTS, scored):
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([prompt])).logits[0].float()
        expected = torch.log_softmax(logits[:, :vocab], dim=-1)
        for i in range(1, len(prompt)):
            assert out.prompt_logprobs[i][prompt[i]] == pytest.approx(expected[i - 1, prompt[i]].item(), abs=2e-3)


def test_op_tables_by_kind():
    """"triton": every op a Triton kernel; "auto" on CUDA: Triton except where cuBLAS is faster,
    and the fused LayerNorm + GEMM only where it was measured faster; "auto" off CUDA and
    "torch": the references."""
    assert get_ops("triton", "cuda") == triton_ops() and get_ops("triton", "cuda").name == "triton"
    auto = get_ops("auto", "cuda")
    for op in ("write_kv_cache", "prefill_attention", "paged_decode_attention", "sample"):
        assert getattr(auto, op) is getattr(triton_ops(), op) is not getattr(TORCH_OPS, op)
    assert CUBLAS_FASTER and all(getattr(auto, op) is getattr(TORCH_OPS, op) for op in CUBLAS_FASTER)
    assert auto.layernorm_linear is auto_layernorm_linear
    assert implementations(auto)["layernorm_linear"].startswith("triton up to 64 rows")
    assert implementations(auto)["prefill_attention"] == "triton"
    assert set(implementations(TORCH_OPS).values()) == {"torch"}
    assert get_ops("auto", "cpu") is TORCH_OPS and get_ops("torch", "cuda") is TORCH_OPS


@pytest.mark.parametrize("rows,dtype,with_ln,fused", [
    (1, torch.float16, True, True), (64, torch.float16, True, True), (64, torch.bfloat16, True, True),
    (65, torch.float16, True, False), (64, torch.float32, True, False), (8, torch.float16, False, False)])
def test_auto_layernorm_linear_takes_the_fused_kernel_where_it_was_measured_faster(monkeypatch, rows, dtype,
                                                                                   with_ln, fused):
    """Up to 64 fp16 / bf16 rows behind a LayerNorm (decode steps): the Triton launcher, with
    every argument passed on; else the torch pair. The result is the chosen one's."""
    calls = []

    def recorder(name):
        def run(*args):
            calls.append((name, args))
            return name
        return run
    monkeypatch.setattr(ll, "layernorm_linear", recorder("triton"))
    monkeypatch.setattr(ll, "layernorm_linear_ref", recorder("torch"))
    x, w = torch.randn(rows, 40).to(dtype), torch.randn(24, 40).to(dtype)
    ln = (torch.ones(40, dtype=dtype), torch.zeros(40, dtype=dtype)) if with_ln else (None, None)
    b = torch.zeros(24, dtype=dtype)
    assert auto_layernorm_linear(x, *ln, w, b, 1e-5, relu=True) == ("triton" if fused else "torch")
    [(_, args)] = calls
    assert args[0] is x and args[1] is ln[0] and args[2] is ln[1] and args[3] is w and args[4] is b
    assert args[5:] == (1e-5, True)


@pytest.mark.parametrize("capability,fused", [(90, True), (None, True), (80, False), (100, False), (0, False)])
def test_auto_layernorm_linear_takes_the_fused_kernel_only_on_the_cards_it_was_measured_on(monkeypatch, capability,
                                                                                          fused):
    """Hopper (sm_90) and the interpreter (which the launchers treat as one) take the kernel; an
    A100, later cards and ROCm keep the torch pair, untimed with the fused kernel."""
    monkeypatch.setattr(kernels_module, "nvidia_capability", lambda device: capability)
    monkeypatch.setattr(ll, "layernorm_linear", lambda *args: "triton")
    monkeypatch.setattr(ll, "layernorm_linear_ref", lambda *args: "torch")
    x, w = torch.randn(8, 40).half(), torch.randn(24, 40).half()
    ln_w, ln_b, b = torch.ones(40).half(), torch.zeros(40).half(), torch.zeros(24).half()
    assert auto_layernorm_linear(x, ln_w, ln_b, w, b, 1e-5) == ("triton" if fused else "torch")


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                    reason="auto takes the fused kernel on sm_90 (and in the interpreter) only")
def test_auto_layernorm_linear_runs_the_triton_kernel(monkeypatch):
    """The fused path as auto takes it (fp16, 5 rows, in the interpreter on CPU) against the pair:
    the GEMM kernel launched, and the torch pair never ran."""
    launches, kernel = [], ll._fused_linear_kernel

    class Recording:   # the GEMM kernel, each launch's grid noted
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    monkeypatch.setattr(ll, "_fused_linear_kernel", Recording())
    real_ref = ll.layernorm_linear_ref
    monkeypatch.setattr(ll, "layernorm_linear_ref", lambda *args: pytest.fail("auto ran the torch pair"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 40, generator=g).half()
    ln_w, ln_b = (torch.randn(40, generator=g) * 0.1 + 1).half(), (torch.randn(40, generator=g) * 0.1).half()
    w, b = (torch.randn(24, 40, generator=g) * 40 ** -0.5).half(), (torch.randn(24, generator=g) * 0.2).half()
    if torch.cuda.is_available():
        x, ln_w, ln_b, w, b = (t.cuda() for t in (x, ln_w, ln_b, w, b))
    fused = auto_layernorm_linear(x, ln_w, ln_b, w, b, 1e-5, relu=True)
    assert len(launches) == 1
    pair = real_ref(x.float(), ln_w.float(), ln_b.float(), w.float(), b.float(), 1e-5, relu=True)
    torch.testing.assert_close(fused.float(), pair, atol=4e-3, rtol=4e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only where there is no CUDA")
def test_triton_on_cpu_says_how_to_switch_the_interpreter_on():
    """Another package imported triton before opt_fast could turn its interpreter on (HF's OPT
    model does): kernels="triton" on CPU fails at once, saying what to do, instead of inside the
    first kernel. Imported the other way round, the table builds."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = "import {}; import {}; from opt_fast.kernels import get_ops; get_ops('triton', 'cpu')"
    late = subprocess.run([sys.executable, "-c", script.format("triton", "opt_fast")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert late.returncode != 0 and "TRITON_INTERPRET=1" in late.stderr, late.stderr[-2000:]
    early = subprocess.run([sys.executable, "-c", script.format("opt_fast", "triton")], env=env,
                           capture_output=True, text=True, timeout=120)
    assert early.returncode == 0, early.stderr[-2000:]


def test_the_model_stores_keys_and_values_through_its_attentions(tiny_model_dir, monkeypatch):
    """With the Triton kernels a step launches no write_kv_cache kernel: prefill and decode
    attention store the new keys and values themselves (a prompt chunked over several steps,
    then decodes, all reading back what the earlier steps stored)."""
    from opt_fast.kernels import kv_cache

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the model launched write_kv_cache")
    monkeypatch.setattr(kv_cache, "_write_kv_cache_kernel", NoLaunch())
    llm = LLM(str(tiny_model_dir), dtype="float32", device=test_device(), kernels="triton",
              max_num_batched_tokens=16, max_num_seqs=4)
    torch_llm = LLM(str(tiny_model_dir), dtype="float32", device=test_device(), kernels="torch",
                    max_num_batched_tokens=16, max_num_seqs=4)
    prompt = list(range(4, 44))
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    assert_same_tokens_and_logprobs(llm.generate([prompt], greedy, use_tqdm=False),
                                    torch_llm.generate([prompt], greedy, use_tqdm=False))


def test_short_prompts_through_the_persistent_prefill_kernel(tiny_model_dir, monkeypatch):
    """Where the tile table picks the persistent prefill kernel (here for float32, by a patched
    table), fresh prompts that fit its tile run it with the bounds the engine knows, store their
    keys and values for the decodes that follow, and give the torch path's tokens; a prompt
    longer than the tile runs the main kernel."""
    from opt_fast.kernels import attention, attention_persistent, attention_tiles
    monkeypatch.setattr(attention_tiles, "_TILES_FP32", attention.Tiles(32, 32, 4, 1, persistent=True))
    monkeypatch.setattr(attention_persistent, "sm_count", lambda device: 2)    # each program several items
    launches = []
    for module, name in ((attention_persistent, "_prefill_persistent_kernel"), (attention, "_prefill_attention_kernel")):
        kernel = getattr(module, name)

        class Recording:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launches.append(name)
                return kernel[grid]
        monkeypatch.setattr(module, name, Recording())
    prompts = [list(range(4, 4 + n)) for n in (5, 32, 17)]
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0)
    llm = LLM(str(tiny_model_dir), dtype="float32", device=test_device(), kernels="triton")
    torch_llm = LLM(str(tiny_model_dir), dtype="float32", device=test_device(), kernels="torch")
    longer = list(range(100, 133))   # (no prefix shared with the others: nothing cached)
    for batch, kernel in ((prompts, "_prefill_persistent_kernel"), ([longer], "_prefill_attention_kernel")):
        launches.clear()
        ours, reference = (m.generate(batch, greedy, use_tqdm=False) for m in (llm, torch_llm))
        assert_same_tokens_and_logprobs(ours, reference)
        assert launches and set(launches) == {kernel}


def test_triton_path_under_preemption_matches_torch(tiny_model_dir):
    """A KV pool too small for every sequence at once, with prefix caching: sequences are
    preempted and come back (recomputed as prefills with cached context where their blocks
    survived, in chunks), and the Triton kernels give the torch path's tokens."""
    kwargs = dict(dtype="float32", device=test_device(), num_kv_blocks=14, block_size=4, max_num_batched_tokens=12,
                  max_num_seqs=4)
    prompts = [[2] + list(range(4 + 3 * i, 15 + 3 * i)) for i in range(4)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    llm = LLM(str(tiny_model_dir), kernels="triton", **kwargs)
    preempted = record_preemptions(llm.engine)
    ours = llm.generate(prompts, greedy, use_tqdm=False)
    reference = LLM(str(tiny_model_dir), kernels="torch", **kwargs).generate(prompts, greedy, use_tqdm=False)
    assert preempted, "the pool was meant to force preemption"
    assert_same_tokens_and_logprobs(ours, reference)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter stands in for the GPU: CPU machines only")
def test_auto_as_on_a_hopper_gpu_matches_torch_in_float16(tiny_model_dir, monkeypatch):
    """kernels="auto" as an sm_90 machine runs it (its op table patched in, the interpreter
    standing in for the GPU), in float16: a step of up to 64 rows (a 30-token prefill, then
    3-row decodes) runs the fused LayerNorm GEMMs, whose default launches take their options
    there (the LayerNorm launch before the GEMM from 17 rows; the statistics in the GEMM at 3);
    a step past 64 rows, and out_proj / fc2 always, run the torch ones. Greedy tokens and
    prompt logprobs as the torch path's in float16."""
    from opt_fast import kernels
    from opt_fast.engine import model_runner
    monkeypatch.setattr(model_runner, "get_ops", lambda kind, device_type: kernels.get_ops(kind, "cuda"))
    rows = []   # rows of each fused LayerNorm GEMM launch
    real_linear = ll._launch_linear

    def recording(x, ln_weight, *args, **kwargs):
        rows.append(x.shape[0])
        return real_linear(x, ln_weight, *args, **kwargs)
    monkeypatch.setattr(ll, "_launch_linear", recording)
    norms = []   # rows of each LayerNorm launch before one (normalize_first)
    real_norm = ll._launch_layer_norm
    monkeypatch.setattr(ll, "_launch_layer_norm", lambda x, *args, **kwargs: (norms.append(x.shape[0]),
                                                                              real_norm(x, *args, **kwargs)))
    llm = LLM(str(tiny_model_dir), dtype="float16", device="cpu", kernels="auto", max_num_seqs=8)
    assert llm.engine.runner.ops.layernorm_linear is auto_layernorm_linear
    torch_llm = LLM(str(tiny_model_dir), dtype="float16", device="cpu", kernels="torch", max_num_seqs=8)
    prompts = [list(range(4 + 7 * i, 14 + 7 * i)) for i in range(3)]          # 30 tokens: one step
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=0)
    ours, reference = (m.generate(prompts, params, use_tqdm=False) for m in (llm, torch_llm))
    for a, b in zip(ours, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for position in range(1, len(a.prompt_token_ids)):
            token = a.prompt_token_ids[position]
            assert a.prompt_logprobs[position][token] == pytest.approx(b.prompt_logprobs[position][token], abs=2e-2)
    # two layers, QKV and fc1 each: the prefill's 30 rows after a LayerNorm launch, then 3-row decodes
    assert rows[:4] == [30] * 4 and norms[:4] == [30] * 4 and set(rows[4:]) == {3} and len(norms) == 4
    rows.clear()
    long_prompt = [list(range(100, 170))]                                     # 70 rows: torch
    llm.generate(long_prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    assert rows == []
