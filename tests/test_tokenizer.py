"""tokenizer.py: sentencepiece and tiktoken round trips, special tokens and stop ids, telling the kinds apart
by content, Llama 3's default specials, refusing bad files, and agreement with transformers' tokenizers."""
import shutil

import pytest

from conftest import SP_VOCAB_SIZE, make_corpus
from tokenizer import SentencePieceTokenizer, TiktokenTokenizer, TokenizerError, load_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, World! 123 4567 + 89",
    "café naïve façade Ærøskøbing",
    "日本語のテキスト 中文",
    "emoji 🦙🔥 and a ZWJ family 👨‍👩‍👧",
    "def encode(self, text):\n    if not text:\n\t\treturn []\n    return [1, 2]  # done\n",
    "  leading and trailing spaces  ",
    "line one\r\nline two\n\n\nthree",
    "",
]


@pytest.fixture(scope="module")
def sp_tok(sentencepiece_model_path):
    return load_tokenizer(sentencepiece_model_path)


@pytest.fixture(scope="module")
def tt_tok(tiktoken_file_path, tiktoken_special_tokens):
    return load_tokenizer(tiktoken_file_path, tiktoken_special_tokens)


def n_ranks(path) -> int:
    return sum(1 for line in path.read_bytes().splitlines() if line.strip())


# --- sentencepiece

@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trips_text(sp_tok, text):
    ids = sp_tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < sp_tok.vocab_size for i in ids)
    assert sp_tok.decode(ids) == text


def test_sentencepiece_byte_fallback_leaves_no_unk(sp_tok):
    ids = sp_tok.encode("日本語 🦙 Ærø")
    assert ids and 0 not in ids  # unk_id is 0: unseen characters became byte pieces


def test_sentencepiece_bos_eos_and_default_stop_ids(sp_tok):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert sp_tok.vocab_size == SP_VOCAB_SIZE
    assert (sp_tok.bos_id, sp_tok.eos_id) == (1, 2)
    assert sp_tok.stop_ids == [2]
    assert sp_tok.token_id("</s>") == 2 and sp_tok.token_id("<unk>") == 0
    assert sp_tok.token_id("<|eot_id|>") is None


def test_sentencepiece_without_bos_or_eos_says_none(tmp_path):
    from conftest import train_sentencepiece

    tok = load_tokenizer(train_sentencepiece(tmp_path / "tokenizer.model", bos_id=-1, eos_id=-1))
    assert (tok.bos_id, tok.eos_id) == (None, None)  # not sentencepiece's -1, which a prompt would start with
    assert tok.stop_ids == []
    assert tok.decode(tok.encode(TEXTS[0])) == TEXTS[0]


def test_sentencepiece_eos_ids_and_bos_id_given_take_precedence(sentencepiece_model_path):
    tok = load_tokenizer(sentencepiece_model_path, bos_id=5, eos_ids=[7, 2])
    assert tok.bos_id == 5
    assert tok.stop_ids == [7, 2]


# --- tiktoken

@pytest.mark.parametrize("text", TEXTS)
def test_tiktoken_round_trips_text(tt_tok, text):
    ids = tt_tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tt_tok.vocab_size for i in ids)
    assert tt_tok.decode(ids) == text


def test_tiktoken_learned_merges_are_used(tt_tok):
    text = "the model and the token"
    assert len(tt_tok.encode(text)) < len(text.encode())


def test_tiktoken_special_token_text_encodes_to_its_single_id(tt_tok, tiktoken_special_tokens):
    s = tiktoken_special_tokens
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>"
    ids = tt_tok.encode(text)
    assert ids[0] == s["<|start_header_id|>"]
    assert ids[-1] == s["<|eot_id|>"]
    assert s["<|end_header_id|>"] in ids
    assert sum(i >= min(s.values()) for i in ids) == 3  # nothing else became a special
    assert tt_tok.decode(ids) == text
    assert tt_tok.encode("<|begin_of_text|>") == [s["<|begin_of_text|>"]]


def test_tiktoken_bos_eos_and_stop_ids_from_special_tokens(tt_tok, tiktoken_file_path, tiktoken_special_tokens):
    s = tiktoken_special_tokens
    assert isinstance(tt_tok, TiktokenTokenizer)
    assert tt_tok.vocab_size == n_ranks(tiktoken_file_path) + len(s)
    assert tt_tok.bos_id == s["<|begin_of_text|>"]
    assert tt_tok.eos_id == s["<|end_of_text|>"]
    assert tt_tok.stop_ids == [s["<|end_of_text|>"], s["<|eot_id|>"]]
    assert tt_tok.token_id("<|eot_id|>") == s["<|eot_id|>"]
    assert tt_tok.token_id("<|eom_id|>") is None


def test_tiktoken_stop_ids_without_eot_are_just_eos(tiktoken_file_path, tiktoken_special_tokens):
    specials = {k: v for k, v in tiktoken_special_tokens.items() if k != "<|eot_id|>"}
    tok = load_tokenizer(tiktoken_file_path, specials)
    assert tok.stop_ids == [specials["<|end_of_text|>"]]


def test_tiktoken_eos_ids_given_take_precedence(tiktoken_file_path, tiktoken_special_tokens):
    s = tiktoken_special_tokens
    eot, end = s["<|eot_id|>"], s["<|end_of_text|>"]
    tok = load_tokenizer(tiktoken_file_path, s, eos_ids=[eot])
    assert tok.stop_ids == [eot]  # not end_of_text, and eot not listed twice
    tok = load_tokenizer(tiktoken_file_path, s, bos_id=3, eos_ids=[42])
    assert tok.stop_ids == [42, eot]  # a chat turn's end still stops
    assert end not in tok.stop_ids
    assert tok.bos_id == 3


# --- which kind: by content, never by name

def test_kind_is_detected_by_content_not_name(tmp_path, sentencepiece_model_path, tiktoken_file_path,
                                              tiktoken_special_tokens, sp_tok, tt_tok):
    sp_named_tiktoken = shutil.copy(sentencepiece_model_path, tmp_path / "tokenizer.tiktoken")
    tt_named_model = shutil.copy(tiktoken_file_path, tmp_path / "tokenizer.model")
    sp = load_tokenizer(sp_named_tiktoken)
    tt = load_tokenizer(tt_named_model, tiktoken_special_tokens)
    assert isinstance(sp, SentencePieceTokenizer)
    assert isinstance(tt, TiktokenTokenizer)
    text = TEXTS[5]
    assert sp.encode(text) == sp_tok.encode(text)
    assert tt.encode(text) == tt_tok.encode(text)


# --- a bare tiktoken file: Llama 3's specials

def test_bare_tiktoken_file_gets_llama3_specials(tiktoken_file_path):
    n = n_ranks(tiktoken_file_path)
    tok = load_tokenizer(tiktoken_file_path)
    s = tok.special_tokens
    # Meta's Llama 3.1 layout (llama-models' tokenizer.py): 11 named specials, then
    # <|reserved_special_token_2|> .. <|reserved_special_token_246|>: 256 in all.
    assert len(s) == 256
    assert sorted(s.values()) == list(range(n, n + 256))
    expected = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|reserved_special_token_0|>": 2,
                "<|reserved_special_token_1|>": 3, "<|finetune_right_pad_id|>": 4, "<|step_id|>": 5,
                "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9,
                "<|python_tag|>": 10, "<|reserved_special_token_2|>": 11, "<|reserved_special_token_246|>": 255}
    assert {k: s[k] - n for k in expected} == expected
    assert "<|reserved_special_token_247|>" not in s
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)
    assert tok.stop_ids == [n + 1, n + 9, n + 8]  # end_of_text, eot, eom
    assert tok.encode("<|eot_id|>") == [n + 9]


def test_empty_special_tokens_mean_llama3_defaults(tiktoken_file_path):
    tok = load_tokenizer(tiktoken_file_path, special_tokens={})
    assert len(tok.special_tokens) == 256


# --- bad input

def test_missing_path_raises_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(TokenizerError, match="not found") as e:
        load_tokenizer(missing)
    assert str(missing) in str(e.value)


def test_directory_path_raises(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b"\x00" * 100, b"", b"\n\n"],
                         ids=["garbage", "zeros", "empty", "blank-lines"])
def test_garbage_file_raises(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value)


def test_truncated_sentencepiece_model_raises(tmp_path, sentencepiece_model_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sentencepiece_model_path.read_bytes()[:1000])
    with pytest.raises(TokenizerError):
        load_tokenizer(path)


@pytest.mark.parametrize("bad_line", [b"not-base64! 3", b"QUJD", b"QUJD x", b"QUJD 1 2"])
def test_tiktoken_file_with_a_malformed_line_raises_naming_the_line(tmp_path, tiktoken_file_path, bad_line):
    lines = tiktoken_file_path.read_bytes().splitlines()
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n".join(lines[:5] + [bad_line] + lines[5:]) + b"\n")
    with pytest.raises(TokenizerError, match=f"{path}:6"):
        load_tokenizer(path)


@pytest.mark.parametrize("bad_line", [b"QUJD -1", b"= 1"])
def test_tiktoken_file_with_a_negative_rank_or_empty_token_raises(tmp_path, tiktoken_file_path, bad_line):
    lines = tiktoken_file_path.read_bytes().splitlines()
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n".join(lines + [bad_line]))
    with pytest.raises(TokenizerError, match=f"{path}:{len(lines) + 1}"):
        load_tokenizer(path)


@pytest.mark.parametrize("what", ["rank", "token"])
def test_tiktoken_file_repeating_a_rank_or_token_raises(tmp_path, tiktoken_file_path, what):
    # A repeated rank made tiktoken panic (pyo3 PanicException, a BaseException that escaped load_tokenizer);
    # a repeated token was silently dropped.
    lines = tiktoken_file_path.read_bytes().splitlines()
    token, rank = lines[300].split()
    extra = b"QUJDREVGRw== " + rank if what == "rank" else token + b" %d" % len(lines)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n".join(lines + [extra]))
    with pytest.raises(TokenizerError, match=f"{path}:{len(lines) + 1} repeats a {what}"):
        load_tokenizer(path)


def test_special_tokens_clashing_with_ranks_raise(tiktoken_file_path, tiktoken_special_tokens):
    # tiktoken took these silently, then decoded the special as the ordinary token with that id.
    with pytest.raises(TokenizerError, match="ordinary tokens"):
        load_tokenizer(tiktoken_file_path, {"<|begin_of_text|>": 5, "<|end_of_text|>": 1000})


def test_special_tokens_sharing_an_id_raise(tiktoken_file_path, tiktoken_special_tokens):
    s = dict(tiktoken_special_tokens, **{"<|eot_id|>": tiktoken_special_tokens["<|end_of_text|>"]})
    with pytest.raises(TokenizerError, match="share the id"):
        load_tokenizer(tiktoken_file_path, s)


def test_text_file_that_is_no_tokenizer_raises(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("this is a README, not a tokenizer\nsecond line\n")
    with pytest.raises(TokenizerError, match="neither a tiktoken file nor a sentencepiece"):
        load_tokenizer(path)


# --- agreement with transformers' own tokenizers (independent implementations)

# Strings without leading whitespace: transformers' converted Llama tokenizer treats leading spaces
# differently from sentencepiece (ours is sentencepiece itself, as Meta's reference code uses).
HF_TEXTS = [t for t in TEXTS if t and not t[0].isspace()] + ["a  b", "x=1;y=22;z=333"]


def test_sentencepiece_ids_match_transformers_llama_tokenizer(tmp_path, sentencepiece_model_path, sp_tok):
    pytest.importorskip("google.protobuf", reason="transformers reads sentencepiece models through protobuf")
    transformers = pytest.importorskip("transformers")
    shutil.copy(sentencepiece_model_path, tmp_path / "tokenizer.model")
    hf = transformers.LlamaTokenizer.from_pretrained(tmp_path, add_bos_token=True)  # as Llama 2's config says
    for text in HF_TEXTS:
        with_bos = hf(text).input_ids
        assert with_bos[0] == sp_tok.bos_id
        assert with_bos[1:] == sp_tok.encode(text), text
        assert hf(text, add_special_tokens=False).input_ids == sp_tok.encode(text), text


def test_tiktoken_ids_match_transformers_tiktoken_converter(tiktoken_file_path, tiktoken_special_tokens, tt_tok):
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from tokenizer import LLAMA3_PATTERN

    names = sorted(tiktoken_special_tokens, key=tiktoken_special_tokens.get)
    hf = TikTokenConverter(vocab_file=str(tiktoken_file_path), pattern=LLAMA3_PATTERN,
                           extra_special_tokens=names).converted()
    assert {name: hf.token_to_id(name) for name in names} == tiktoken_special_tokens
    for text in TEXTS + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        assert hf.encode(text, add_special_tokens=False).ids == tt_tok.encode(text), text


# Qwen2's pre-tokenizer split (from its tokenizer.json), a byte-level BPE as Qwen2 and Llama 3 ship.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def byte_level_tokenizer_json(tmp_path_factory):
    """A Qwen2-style tokenizer.json trained with the tokenizers library, specials after the vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(make_corpus(), trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    path = tmp_path_factory.mktemp("bytelevel") / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def test_byte_level_tokenizer_json_becomes_a_tiktoken_file_with_the_same_ids(byte_level_tokenizer_json, tmp_path):
    from tokenizer import tiktoken_from_tokenizer_json, write_tiktoken_file

    path, hf = byte_level_tokenizer_json
    ranks, special, pattern = tiktoken_from_tokenizer_json(path)
    assert pattern == QWEN2_SPLIT and set(special) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    write_tiktoken_file(tmp_path / "tokenizer.model", ranks)
    ours = load_tokenizer(tmp_path / "tokenizer.model", special, pattern=pattern)
    for text in TEXTS + ["<|im_start|>user\nhi there<|im_end|>\n"]:
        assert ours.encode(text) == hf.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == text
    assert special["<|im_end|>"] in ours.stop_ids


def test_tokenizer_json_that_is_not_byte_level_bpe_is_refused(tmp_path):
    from tokenizer import tiktoken_from_tokenizer_json

    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "Unigram", "vocab": []}}')
    with pytest.raises(TokenizerError, match="byte-level BPE"):
        tiktoken_from_tokenizer_json(bad)


def test_qwen2_checkpoint_with_only_tokenizer_json_converts_and_generates(byte_level_tokenizer_json, tmp_path):
    import subprocess
    import sys

    import torch

    from conftest import ROOT, make_hf_model
    from convert_hf_checkpoint import convert

    path, hf_tok = byte_level_tokenizer_json
    make_hf_model("qwen2").save_pretrained(tmp_path)
    shutil.copy(path, tmp_path / "tokenizer.json")
    model_path = convert(tmp_path)
    facts = torch.load(model_path, mmap=True, weights_only=True)["tokenizer"]
    assert facts["pattern"] == QWEN2_SPLIT and "<|im_end|>" in facts["special_tokens"]
    assert facts["add_bos"] is False
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(model_path),
                        "--prompt", "def cache(", "--max_new_tokens", "8", "--num_samples", "1", "--device", "cpu",
                        "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def cache(")
