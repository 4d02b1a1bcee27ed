"""OPT's tokenizer: GPT-2 byte-level BPE re-indexed RoBERTa-style, built on `tokenizers`.

Ids match Hugging Face's OPT tokenizer (`GPT2Tokenizer` with `</s>` as bos/eos/unk and `<pad>`):
`</s>` (2) is prepended as BOS and also ends generation.
"""

from __future__ import annotations

import contextlib
import operator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.decoders import DecodeStream

# Hugging Face's OPT config only makes `</s>` and `<pad>` special, so only these two are matched
# as whole tokens inside text: "<s>" or "<mask>" in a prompt is BPE-split there, and must be here.
_MATCHED_IN_TEXT = ("</s>", "<pad>")
# Ids that carry no text; generated output drops them when skip_special_tokens is set.
_SKIPPED_ON_DECODE = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


@contextlib.contextmanager
def _unreadable_as_value_error(what):
    """tokenizers reports a file it cannot parse (bad JSON, bytes that are not UTF-8) as a bare
    Exception: say which files, as a ValueError like every other bad checkpoint."""
    try:
        yield
    except Exception as err:
        raise ValueError(f"{what}: not a readable tokenizer ({str(err).strip()[:200]})") from err


class OPTTokenizer:
    """Byte-level BPE tokenizer with OPT's special tokens (`<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3)."""

    def __init__(self, tokenizer: Tokenizer):
        """Wrap a `tokenizers.Tokenizer` whose vocabulary holds OPT's special tokens."""
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if "</s>" not in vocab:
            raise ValueError("tokenizer vocabulary has no '</s>': not an OPT tokenizer")
        # Registering a token already in the vocab keeps its id, so nothing is renumbered.
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True) for t in _MATCHED_IN_TEXT if t in vocab])
        self.eos_token_id: int = vocab["</s>"]
        self.bos_token_id: int = self.eos_token_id
        self.pad_token_id: int | None = vocab.get("<pad>")
        self.unk_token_id: int | None = vocab.get("<unk>")
        self._special_ids = frozenset(vocab[t] for t in _SKIPPED_ON_DECODE if t in vocab)
        # Max id + 1 rather than len(vocab): the model must mask every id the tokenizer can't map.
        self._vocab_size = max(vocab.values()) + 1

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path) -> OPTTokenizer:
        """Build from GPT-2 style `vocab.json` and `merges.txt`."""
        with _unreadable_as_value_error(f"{vocab_path} and {merges_path}"):
            tok = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    @classmethod
    def from_dir(cls, path: str | Path) -> OPTTokenizer:
        """Build from a checkpoint directory: `tokenizer.json`, else `vocab.json` + `merges.txt`."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            with _unreadable_as_value_error(path / "tokenizer.json"):
                tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            return cls(tok)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return cls.from_files(vocab, merges)
        raise FileNotFoundError(
            f"no tokenizer in {path}: looked for tokenizer.json, or vocab.json and merges.txt")

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (50265 for OPT; the embedding has 50272 rows)."""
        return self._vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with `</s>` prepended as BOS when `add_special_tokens`. Text that is
        no valid Unicode (lone surrogates, as undecodable bytes in a command line become) is a
        ValueError."""
        try:
            # BOS is added here, never by the library: a tokenizer.json post-processor would double it.
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:    # tokenizers' error for a non-str and for lone surrogates: say which
            if not isinstance(text, str):
                raise ValueError(f"text must be a str, got {type(text).__name__}") from None
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"text is not valid Unicode: {err.reason} at index {err.start} "
                                 f"({text[err.start:err.end]!r})") from None
            raise
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (ints, numpy or 0-d tensor integers); special tokens are dropped when
        `skip_special_tokens`. An id that is no integer in [0, 2**32) is a ValueError (ids past
        the vocabulary decode to nothing)."""
        try:   # first: tensor elements hash by identity, not value
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise ValueError(f"ids must be integers, got {ids!r:.80}") from None
        if ids and not 0 <= min(ids) <= max(ids) < 2 ** 32:
            raise ValueError(f"ids must be in [0, 2**32), got {min(ids) if min(ids) < 0 else max(ids)}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, prompt_ids: list[int] | None = None,
                            skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A decoder that turns generated ids into text one id at a time."""
        return IncrementalDecoder(self, prompt_ids, skip_special_tokens)


_CONTEXT_IDS = 8
# A run of ids that still ends mid-character after this many holds bytes that never form one.
_STUCK_RUN = 16
_OPEN_IDS = 3       # the last ids of a run, whose bytes (one each at least) may still begin a character


class IncrementalDecoder:
    """Streams text of generated ids: `"".join(step(i) for i in ids) + flush() == decode(ids)`."""

    def __init__(self, tokenizer: OPTTokenizer, prompt_ids: list[int] | None,
                 skip_special_tokens: bool):
        self._tok = tokenizer._tok
        self._skip_special_tokens = skip_special_tokens
        self._skip = tokenizer._special_ids if skip_special_tokens else frozenset()
        self._pending: list[int] = []  # ids fed since the last piece, i.e. an unfinished character
        context = []                   # the prompt's last ids that show as text, walked from its end
        for i in reversed(prompt_ids or ()):
            if len(context) == _CONTEXT_IDS:
                break
            if i not in self._skip:
                context.append(i)
        self._stream = self._new_stream(context[::-1])

    def _new_stream(self, before: list[int]) -> DecodeStream:
        """A DecodeStream whose text starts after the ids `before` (already shown).

        The last ids give decoders that strip a leading space (Metaspace) their context;
        byte-level tokens carry their own spaces. Only the last few: the whole of a 2000-token
        prompt took 0.2 ms to decode for the check below, per request. Context ending
        mid-character would make DecodeStream put that character, context bytes included, into
        the first piece: such context is left out."""
        context = before[-_CONTEXT_IDS:]
        if context and self._tok.decode(context, self._skip_special_tokens).endswith("\ufffd"):
            context = []
        return DecodeStream(ids=context or None, skip_special_tokens=self._skip_special_tokens)

    def step(self, token_id: int) -> str:
        """New text from `token_id`; "" while a multi-byte character is still incomplete."""
        if token_id in self._skip:
            return ""
        self._pending.append(token_id)
        piece = self._stream.step(self._tok, token_id)
        if piece is not None:
            self._pending.clear()
            return piece
        return self._release_stuck_run() if len(self._pending) >= _STUCK_RUN else ""

    def _release_stuck_run(self) -> str:
        """The text of a run of ids that has ended mid-character for _STUCK_RUN ids: bytes that
        never form a character (a model repeating a lone UTF-8 continuation byte, say).
        DecodeStream decodes the whole run again at each id, so its cost grew with the run.
        Shows all but the last _OPEN_IDS ids, whose bytes may still begin a character, and goes
        on with a fresh stream; unless a character spans that split (the two parts would not
        decode to the whole), then it waits for the next id. (A run where every split does, such
        as ids that each close one character with a stray byte and open the next, is never let
        go: still correct, at DecodeStream's cost and three decodes of the run per id.)"""
        decode = lambda ids: self._tok.decode(ids, skip_special_tokens=self._skip_special_tokens)  # noqa: E731
        shown, open_ids = self._pending[:-_OPEN_IDS], self._pending[-_OPEN_IDS:]
        text = decode(shown)
        if text + decode(open_ids) != decode(self._pending):
            return ""
        self._stream, self._pending = self._new_stream(shown), []
        return text + "".join(self.step(i) for i in open_ids)

    def flush(self) -> str:
        """Text held back when the sequence ends mid-character (it decodes to U+FFFD); call last."""
        # Pieces end on character boundaries, so the held ids decode correctly on their own.
        text = self._tok.decode(self._pending, skip_special_tokens=self._skip_special_tokens)
        self._pending.clear()
        return text
