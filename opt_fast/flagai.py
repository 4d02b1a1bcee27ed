"""FlagAI compatibility: the `AutoLoader` / `Predictor` quick start of BAAI FlagAI's OPT model card,
running on opt_fast's engine.

```python
from opt_fast.flagai import AutoLoader, Predictor
loader = AutoLoader(task_name="lm", model_name="opt-125m-en", model_dir="./checkpoints")
model = loader.get_model(); tokenizer = loader.get_tokenizer(); model.eval()
predictor = Predictor(model, tokenizer)
out = predictor.predict_generate_randomsample(text, input_max_length=100, out_max_length=300,
                                              top_k=30, top_p=0.9, repetition_penalty=3.0)
```

`predict_generate_randomsample` follows FlagAI's GPT/OPT random-sample loop
(`flagai/model/predictor/utils.py: gpt_random_sample`, the version the OPT examples shipped with):
the prompt is `</s>` + the text's tokens, cut to `input_max_length` tokens in all, with a trailing
`</s>` dropped; each step takes the log-softmax of the last logits, bans `<unk>`, then applies the
repetition penalty (CTRL rule on those log-probabilities, over prompt + output), temperature,
top-k and top-p, and draws; `</s>` ends the output and is not part of it; at most
`out_max_length` tokens; the ids are decoded without dropping special tokens.
"""
from __future__ import annotations

import inspect
import numbers
import os
import warnings
from pathlib import Path

import torch

from .llm import LLM
from .sampling_params import SamplingParams, finite_float
from .tokenizer import OPTTokenizer


class OPTModel:
    """What `AutoLoader.get_model()` returns: one `opt_fast.LLM`, built once and reused by every
    `Predictor` call. `llm` is the engine-backed batch API for anything FlagAI's API lacks."""

    def __init__(self, llm: LLM):
        self.llm = llm

    def eval(self) -> OPTModel:
        """Inference is all the engine does; returns the model, as torch's `Module.eval` does."""
        return self

    # FlagAI scripts move the model after loading (`model.to(device)`, `model.half()`). The
    # engine fixes device and dtype when it loads: where they already agree these return the
    # model; otherwise they warn and change nothing.
    def to(self, *args, **kwargs) -> OPTModel:
        """`Module.to(device)`, `.to(dtype)`, `.to(device, dtype)` or `.to(tensor)`: a check, not a
        move (other arguments, such as non_blocking or memory_format, change nothing here)."""
        runner = self.llm.engine.runner
        for value in [*args, kwargs.get("device"), kwargs.get("dtype"), kwargs.get("tensor")]:
            if isinstance(value, torch.Tensor):
                self._expect("device", value.device, runner.device)
                self._expect("dtype", value.dtype, runner.dtype)
            elif isinstance(value, torch.dtype):
                self._expect("dtype", value, runner.dtype)
            elif isinstance(value, (str, torch.device)) or (isinstance(value, int) and not isinstance(value, bool)):
                try:
                    device = torch.device(value)
                except RuntimeError:      # torch's error for a string that names no device
                    raise ValueError(f"device {value!r} names no device") from None
                self._expect("device", device, runner.device)
        return self

    def cuda(self, device=None) -> OPTModel:
        """`Module.cuda(device)`: device None, an index, a name ("cuda:0") or a torch.device,
        checked as `to` checks it."""
        if device is None or (isinstance(device, int) and not isinstance(device, bool)):
            device = torch.device("cuda", device)
        elif not (isinstance(device, (str, torch.device)) and str(device).startswith("cuda")):
            raise ValueError(f"device must be a CUDA device index, name or torch.device, got {device!r}")
        return self.to(device)       # which says so where a name is no device

    def cpu(self) -> OPTModel:
        return self.to(torch.device("cpu"))

    def half(self) -> OPTModel:
        return self.to(torch.float16)

    def bfloat16(self) -> OPTModel:
        return self.to(torch.bfloat16)

    def float(self) -> OPTModel:
        return self.to(torch.float32)

    @staticmethod
    def _expect(name: str, wanted, actual) -> None:
        # (a device without an index means the current one: "cuda" and "cuda:0" agree)
        same = (wanted.type == actual.type and None in (wanted.index, actual.index) or wanted == actual
                if isinstance(wanted, torch.device) else wanted == actual)
        if not same:
            warnings.warn(f"the model runs with {name} {actual}; opt_fast fixes it when the model loads, "
                          f"so asking for {wanted} changes nothing: pass {name}= to AutoLoader instead",
                          stacklevel=3)


class AutoLoader:
    """Load an OPT checkpoint the way FlagAI's `AutoLoader(task_name="lm", ...)` does.

    `model_dir/model_name` is used when it is a directory (FlagAI's layout: config.json,
    pytorch_model.bin, vocab.json, merges.txt); otherwise `model_name` ("opt-125m-en") resolves to
    its Hugging Face hub id ("facebook/opt-125m"), which needs network access: offline, that
    raises an OSError asking for a local path. `torch_dtype` (FlagAI's name: torch.float16,
    torch.bfloat16 or torch.float32) sets the dtype; other keyword arguments go to `opt_fast.LLM`
    (dtype, device, kernels, max_model_len, seed, ...).
    """

    _DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

    def __init__(self, task_name: str = "lm", model_name: str | None = None,
                 model_dir: str | Path = "./checkpoints/", torch_dtype: torch.dtype | None = None, **llm_kwargs):
        unknown = sorted(set(llm_kwargs) - set(inspect.signature(LLM).parameters) - {"model"})
        if unknown:
            raise TypeError(f"AutoLoader got keyword arguments opt_fast does not take: {unknown} (FlagAI-only "
                            "options are not supported; see opt_fast.LLM for those it takes)")
        if torch_dtype is not None:
            if torch_dtype not in self._DTYPES:
                raise ValueError(f"torch_dtype must be one of {list(self._DTYPES)}, got {torch_dtype!r}")
            if llm_kwargs.setdefault("dtype", self._DTYPES[torch_dtype]) != self._DTYPES[torch_dtype]:
                raise ValueError(f"torch_dtype={torch_dtype} and dtype={llm_kwargs['dtype']!r} disagree")
        if task_name != "lm":
            raise ValueError(f"task_name {task_name!r} is not supported: opt_fast serves OPT "
                             "language models, task_name='lm'")
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must name a model like 'opt-125m-en', got {model_name!r}")
        if not isinstance(model_dir, (str, os.PathLike)):
            raise ValueError(f"model_dir must be a path, got {model_dir!r}")
        local = Path(model_dir).expanduser() / model_name
        self.model = OPTModel(LLM(str(local) if local.is_dir() else model_name, **llm_kwargs))
        self.tokenizer = self.model.llm.get_tokenizer()

    def get_model(self) -> OPTModel:
        """The loaded model (an OPTModel over one opt_fast.LLM), for `Predictor`."""
        return self.model

    def get_tokenizer(self):
        """The checkpoint's `opt_fast.tokenizer.OPTTokenizer` (None when it has no tokenizer files)."""
        return self.tokenizer


class Predictor:
    """FlagAI's `Predictor` for OPT language models: `predict_generate_randomsample`."""

    def __init__(self, model: OPTModel, tokenizer):
        if not isinstance(model, OPTModel):
            raise ValueError(f"model must come from AutoLoader.get_model(), got {type(model).__name__}")
        if tokenizer is None:
            raise ValueError("tokenizer is None: the checkpoint directory has no vocab.json + "
                             "merges.txt (or tokenizer.json)")
        if not isinstance(tokenizer, OPTTokenizer):
            raise ValueError(f"tokenizer must come from AutoLoader.get_tokenizer(), got {type(tokenizer).__name__}")
        self.model, self.tokenizer = model.eval(), tokenizer

    def predict_generate_randomsample(self, text: str | list[str], input_max_length: int = 256,
                                      out_max_length: int = 200, top_k: int = 30, top_p: float = 1.0,
                                      repetition_penalty: float = 1.0, temperature: float = 1.0,
                                      seed: int | None = None) -> str | list[str]:
        """Sample a continuation of `text` with FlagAI's semantics (see the module docstring).

        A list of texts runs as one batch and returns a list of strings, each equal to what that
        text alone gives with the same `seed`. `seed` makes the draws reproducible; None lets
        the LLM derive one per request from its own seed. Defaults are FlagAI's.
        """
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"text must be a string or a list of strings, got {text!r:.80}")
        params = self._sampling_params(input_max_length, out_max_length, top_k, top_p,
                                       repetition_penalty, temperature, seed)
        prompts = [self._prompt_ids(t, input_max_length) for t in texts]
        limit = self.model.llm.engine.max_model_len
        for prompt in prompts:
            if len(prompt) + out_max_length > limit:
                raise ValueError(f"out_max_length={out_max_length} after a {len(prompt)}-token "
                                 f"prompt exceeds the model's {limit} positions")
        outputs = self.model.llm.generate(prompts, params, use_tqdm=False)
        results = [self._output_text(out.outputs[0].token_ids) for out in outputs]
        return results[0] if isinstance(text, str) else results

    def _sampling_params(self, input_max_length, out_max_length, top_k, top_p, repetition_penalty,
                         temperature, seed) -> SamplingParams:
        for name, value in (("input_max_length", input_max_length), ("out_max_length", out_max_length),
                            ("top_k", top_k)):
            # numpy integers too, as SamplingParams takes them
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        input_max_length, out_max_length, top_k = int(input_max_length), int(out_max_length), int(top_k)
        top_p, repetition_penalty, temperature = (finite_float(name, value) for name, value in (
            ("top_p", top_p), ("repetition_penalty", repetition_penalty), ("temperature", temperature)))
        if not 0 <= top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")
        for name, value in (("repetition_penalty", repetition_penalty), ("temperature", temperature)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if top_p == 0:     # FlagAI's top-p then keeps only the most likely token: top-k 1
            top_k, top_p = 1, 1.0
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, max_tokens=out_max_length,
                              seed=seed, penalty_on_logprobs=True,
                              banned_token_ids=[self._unk_token_id()])

    def _unk_token_id(self) -> int:
        unk = self.tokenizer.unk_token_id
        if unk is None:
            raise ValueError("the tokenizer has no '<unk>' token, which FlagAI's sampler bans")
        return unk

    def _prompt_ids(self, text: str, input_max_length: int) -> list[int]:
        # HF's encode_plus(truncation=True, max_length=N), which FlagAI's OPT tokenizer calls:
        # BOS counts towards N and the text's tail is cut.
        ids = self.tokenizer.encode(text)[:input_max_length]
        if len(ids) > 1 and ids[-1] == self.tokenizer.eos_token_id:
            ids.pop()     # FlagAI drops a trailing end token, so generation does not start after one
        return ids

    def _output_text(self, token_ids: list[int]) -> str:
        if token_ids and token_ids[-1] == self.tokenizer.eos_token_id:
            token_ids = token_ids[:-1]   # the stop token is not part of FlagAI's output
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)
