"""OPTTokenizer: ids identical to Hugging Face's OPT tokenizer, decoding, incremental decoding."""

import random
from pathlib import Path

import pytest
import torch

from opt_fast.tokenizer import OPTTokenizer

# Real OPT files live next to the checkout, never inside it.
OPT_DIR = Path(__file__).resolve().parents[2] / "shared" / "opt-tokenizer"
needs_opt_files = pytest.mark.skipif(
    not (OPT_DIR / "vocab.json").is_file(), reason=f"OPT tokenizer files not found at {OPT_DIR}")

HELLO = "Hello, my dog is cute"
HELLO_IDS = [2, 31414, 6, 127, 2335, 16, 11962]

TEXTS = [
    HELLO,
    "",
    # unicode: accents, CJK, emoji (ZWJ sequences, flags, variation selectors), combining marks
    "Café naïve résumé — Ångström, Łódź, Straße",
    "日本語のテキストと中文字符，한국어도。",
    "I ❤️ 🐶🐱! Family: 👩‍👩‍👧 flag: 🇫🇷 thumbs 👍🏽",
    "e\u0301 a\u0308 n\u0303 \u1100\u1161\u11a8 Z\u0351\u036b\u0343",
    # whitespace runs
    "a  b   c    d",
    "\ttab\t\tx\t",
    "line1\nline2\n\n\nline3\r\nline4",
    "trailing spaces   ",
    "   leading spaces",
    " ",
    "\n",
    # code
    "def f(x):\n    if x > 0:\n        return [i ** 2 for i in range(x)]\n    return {}\n",
    # special-token text: only `</s>` and `<pad>` are matched whole, as in Hugging Face's OPT
    "</s>",
    "a</s>b",
    "Question? </s> Answer </s>",
    "<s>struck</s> <pad>x <unk> <mask>",
    # contractions and numbers, which the byte-level regex splits specially
    "don't it's I'll we've 3.14159 1,000,000 $5",
]


@pytest.fixture(scope="module")
def opt():
    if not (OPT_DIR / "vocab.json").is_file():
        pytest.skip(f"OPT tokenizer files not found at {OPT_DIR}")
    return OPTTokenizer.from_dir(OPT_DIR)


@pytest.fixture(scope="module")
def hf():
    """Hugging Face's OPT tokenizer (facebook/opt-* tokenizer_config.json) on the same files."""
    if not (OPT_DIR / "vocab.json").is_file():
        pytest.skip(f"OPT tokenizer files not found at {OPT_DIR}")
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPT2Tokenizer(
        vocab=str(OPT_DIR / "vocab.json"), merges=str(OPT_DIR / "merges.txt"), errors="replace",
        unk_token="</s>", bos_token="</s>", eos_token="</s>", pad_token="<pad>",
        add_prefix_space=False, add_bos_token=True, clean_up_tokenization_spaces=False)
    assert ref(HELLO)["input_ids"] == HELLO_IDS  # the reference itself is configured as OPT's
    return ref


@needs_opt_files
def test_known_ids_and_special_ids(opt):
    assert opt.encode(HELLO) == HELLO_IDS
    assert opt.encode(HELLO, add_special_tokens=False) == HELLO_IDS[1:]
    assert opt.encode("") == [2]
    assert opt.encode("", add_special_tokens=False) == []
    assert (opt.bos_token_id, opt.eos_token_id, opt.pad_token_id) == (2, 2, 1)
    assert opt.vocab_size == 50265


@needs_opt_files
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hugging_face(opt, hf, text):
    assert opt.encode(text) == hf(text)["input_ids"]
    no_bos = hf(text, add_special_tokens=False)["input_ids"]
    assert opt.encode(text, add_special_tokens=False) == no_bos


@needs_opt_files
def test_special_token_text(opt):
    assert opt.encode("a</s>b", add_special_tokens=False) == [102, 2, 428]
    assert 1 in opt.encode("<pad>")
    # "<s>", "<unk>", "<mask>" are not special in OPT's tokenizer config: plain text there
    assert not {0, 3, 50264} & set(opt.encode("<s> <unk> <mask>"))


@needs_opt_files
@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(opt, hf, text):
    ids = opt.encode(text)
    assert opt.decode(ids) == text.replace("</s>", "").replace("<pad>", "")
    assert opt.decode(ids, skip_special_tokens=False) == "</s>" + text
    assert opt.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert opt.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@needs_opt_files
def test_decode_skip_special_tokens(opt):
    ids = [2, 0, 31414, 3, 6, 1, 50264, 2]
    assert opt.decode(ids) == "Hello,"
    assert opt.decode(ids, skip_special_tokens=True) == "Hello,"
    assert opt.decode(ids, skip_special_tokens=False) == "</s><s>Hello<unk>,<pad><mask></s>"
    # ids as a tensor (its elements hash by identity, so they must be read as ints first)
    assert opt.decode(torch.tensor(ids)) == "Hello,"


def _stream(tok, ids, prompt_ids=None, skip_special_tokens=True):
    dec = tok.incremental_decoder(prompt_ids, skip_special_tokens=skip_special_tokens)
    pieces = [dec.step(i) for i in ids]
    return pieces, dec.flush()


@needs_opt_files
def test_incremental_multibyte(opt):
    text = " Emoji 🐶🐱👩‍👧 and 日本語 and café, done."
    ids = opt.encode(text, add_special_tokens=False)
    pieces, tail = _stream(opt, ids, prompt_ids=opt.encode("Prompt:"))
    assert "" in pieces  # some character really is split across byte-level tokens
    assert tail == ""
    assert "".join(pieces) == opt.decode(ids) == text
    assert pieces[0] == opt.decode(ids[:1]) == " Em"
    # a prompt adds no text and doesn't change the pieces of byte-level tokens
    assert _stream(opt, ids)[0] == pieces


@needs_opt_files
def test_incremental_special_tokens(opt):
    ids = opt.encode(" a</s>b<pad>", add_special_tokens=False) + [0, 2]
    pieces, _ = _stream(opt, ids)
    assert "".join(pieces) == " ab"
    pieces, _ = _stream(opt, ids, skip_special_tokens=False)
    assert "".join(pieces) == " a</s>b<pad><s></s>"


@needs_opt_files
def test_incremental_prompt_ending_mid_character(opt):
    dog = opt.encode("🐶", add_special_tokens=False)
    assert len(dog) > 1 and opt.decode(dog[:1]).endswith("\ufffd")
    out = dog[1:] + opt.encode(" dog", add_special_tokens=False)
    pieces, tail = _stream(opt, out, prompt_ids=opt.encode(" a hot") + dog[:1])
    # the prompt's text must not leak into the output, even when the prompt is cut mid-character
    assert "".join(pieces) + tail == opt.decode(out)
    assert "hot" not in "".join(pieces)


@needs_opt_files
def test_incremental_flush_of_cut_character(opt):
    dog = opt.encode(" 🐶", add_special_tokens=False)
    pieces, tail = _stream(opt, dog[:-1])
    assert "".join(pieces) + tail == opt.decode(dog[:-1])
    assert tail.endswith("\ufffd")


@needs_opt_files
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_random_ids(opt, skip_special_tokens):
    rng = random.Random(1234)
    # single-character tokens are the 256 raw bytes: mixing many in makes split and invalid UTF-8
    byte_ids = sorted(i for t, i in opt._tok.get_vocab().items() if len(t) == 1)
    assert len(byte_ids) == 256
    held_back = 0
    for _ in range(400):
        out = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(opt.vocab_size)
               for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(opt.vocab_size) for _ in range(rng.randint(0, 4))]
        prompt += [rng.choice(byte_ids) for _ in range(rng.randint(0, 2))]
        pieces, tail = _stream(opt, out, prompt, skip_special_tokens)
        assert "".join(pieces) + tail == opt.decode(out, skip_special_tokens), (prompt, out)
        held_back += pieces.count("")
    assert held_back > 0


def _tiny_tokenizer_json(directory: Path):
    """Train a small byte-level BPE whose tokenizer.json has a post-processor that adds `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["Hello, my dog is cute.", "The quick brown fox jumps over the lazy dog.",
              "Tokenizers split text into tokens; 日本語 too. café 🐶"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    assert tok.encode("dog").ids[0] == 2  # the library itself would add BOS
    tok.save(str(directory / "tokenizer.json"))
    return tok


def test_from_tokenizer_json(tmp_path):
    raw = _tiny_tokenizer_json(tmp_path)
    tok = OPTTokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)
    assert tok.vocab_size == raw.get_vocab_size() > 256
    text = "Hello, my cat is cute 🐱 and 日本"
    ids = tok.encode(text)
    assert ids == [2] + raw.encode(text, add_special_tokens=False).ids
    assert ids.count(2) == 1  # BOS not doubled by the file's post-processor
    assert tok.encode("") == [2]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "</s>" + text
    pieces, tail = _stream(tok, ids[1:], prompt_ids=ids[:3])
    assert "".join(pieces) + tail == text


@needs_opt_files
def test_tokenizer_json_same_as_vocab_merges(opt, tmp_path):
    opt._tok.save(str(tmp_path / "tokenizer.json"))
    from_json = OPTTokenizer.from_dir(tmp_path)
    assert from_json.vocab_size == opt.vocab_size
    for text in TEXTS:
        assert from_json.encode(text) == opt.encode(text)
        assert from_json.decode(opt.encode(text), skip_special_tokens=False) == "</s>" + text


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as err:
        OPTTokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt still missing
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        OPTTokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("files", [{"tokenizer.json": b'{"model": '},
                                   {"vocab.json": b"not json", "merges.txt": b"#version: 0.2\n"},
                                   {"vocab.json": b'{"a": 0}', "merges.txt": b"\xff\xfe a b\n"}],
                         ids=["bad-tokenizer-json", "bad-vocab", "merges-not-utf8"])
def test_unreadable_files_are_a_value_error_naming_them(tmp_path, files):
    """tokenizers raises a bare Exception on them: a clear ValueError instead, as for a bad
    checkpoint, saying which files."""
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=next(iter(files))):
        OPTTokenizer.from_dir(tmp_path)


@needs_opt_files
def test_incremental_runs_of_bytes_that_never_form_a_character(opt):
    """A sample repeating a byte that is no character's start (a random-weight model can) stays
    cheap: no more than a few ids are held at once, where tokenizers' DecodeStream would decode
    the whole growing run at every id. Mixed with whole characters split over several ids, the
    pieces still join to the text of all the ids."""
    lone = [i for i in range(4, 2100) if opt.decode([i]) == "\ufffd"]    # bytes 0x80-0xff alone
    dog = opt.encode("🐶 日本", add_special_tokens=False)                  # characters over several ids
    assert len(lone) > 5 and len(dog) > 3
    # 日 over three ids, the last of which ends in a stray byte (the run stays open): at the
    # 16th id 日 spans the last three ids, so the run is let go only at a later split
    sun = [opt._tok.token_to_id(t) for t in ("æ", "Ĺ", "¥ŀ")]
    assert opt.decode(sun) == "日\ufffd"
    rng = random.Random(0)
    runs = [[lone[0]] * 300, [lone[1]] * 40 + dog + [lone[2]] * 25 + dog,
            [lone[3]] * 12 + sun + [lone[4]] * 30,
            [rng.choice(lone + dog + [31414, 6]) for _ in range(400)]]
    for ids in runs:
        dec = opt.incremental_decoder(opt.encode("Prompt:"))
        pieces, held = [], []
        for i in ids:
            pieces.append(dec.step(i))
            held.append(len(dec._pending))
        assert "".join(pieces) + dec.flush() == opt.decode(ids)
        assert max(held) <= 16 + 2        # 16, and up to two more while 日 spans the split
