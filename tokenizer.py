"""Tokenizers: sentencepiece models (Llama 2, Mistral, CodeLlama) and tiktoken BPE files (Llama 3).

Which kind a file is comes from its content, never its name: a tiktoken file is text, one
`base64-token rank` pair a line; a sentencepiece model is a binary protobuf.
"""
import base64
from pathlib import Path
from typing import Optional

# Llama 3's pre-tokenizer split (its tiktoken file does not carry one).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


class TokenizerError(ValueError):
    pass


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.vocab_size()
        # sentencepiece says -1 for a disabled bos/eos; None is what callers check for.
        self.bos_id, self.eos_id = (i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id()))
        self.special_tokens = {}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def token_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i


class TiktokenTokenizer:
    def __init__(self, path: Path, special_tokens: Optional[dict] = None, pattern: str = LLAMA3_PATTERN):
        import tiktoken

        ranks = read_tiktoken_ranks(path)
        n = len(ranks)
        if not special_tokens:  # a bare Llama 3 file: its 256 specials follow the ranks
            special_tokens = {t: n + i for i, t in enumerate(LLAMA3_NAMED_SPECIALS)}
            k = len(LLAMA3_NAMED_SPECIALS)
            special_tokens.update({f"<|reserved_special_token_{2 + i}|>": n + k + i for i in range(256 - k)})
        self.special_tokens = dict(special_tokens)
        check_special_tokens(path, ranks, self.special_tokens)
        self.enc = tiktoken.Encoding(name=Path(path).name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.vocab_size = self.enc.n_vocab
        self.bos_id = self.special_tokens.get("<|begin_of_text|>")
        self.eos_id = self.special_tokens.get("<|end_of_text|>")

    def encode(self, text: str) -> list[int]:
        # Special-token text in a prompt is encoded as the special token, as Llama 3's chat format needs.
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))

    def token_id(self, piece: str) -> Optional[int]:
        return self.special_tokens.get(piece)


def read_tiktoken_ranks(path) -> dict:
    ranks, seen = {}, set()
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
            if not token or rank < 0:
                raise ValueError
        except ValueError:
            raise TokenizerError(f"{path}:{n} is not a tiktoken 'base64 rank' line") from None
        # tiktoken itself would panic (an exception no `except Exception` catches) on a repeated rank,
        # and silently keep the last of a repeated token.
        if token in ranks or rank in seen:
            raise TokenizerError(f"{path}:{n} repeats a {'token' if token in ranks else 'rank'} of an earlier line")
        ranks[token] = rank
        seen.add(rank)
    return ranks


def check_special_tokens(path, ranks: dict, special_tokens: dict):
    """Special ids must be distinct and clear of the file's ranks: tiktoken accepts a clash silently and then
    decodes the special as the ordinary token, or panics."""
    taken = set(ranks.values())
    clash = sorted(t for t, i in special_tokens.items() if i in taken)
    if clash:
        raise TokenizerError(f"special tokens {clash[:3]} have ids that {path} gives to ordinary tokens; are the "
                             "checkpoint's special tokens from another tokenizer?")
    by_id = {}
    for t, i in special_tokens.items():
        if i in by_id:
            raise TokenizerError(f"special tokens {by_id[i]} and {t} for {path} share the id {i}")
        by_id[i] = t


def is_tiktoken_file(path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(4096).split()
    try:
        return len(first) == 2 and bool(base64.b64decode(first[0], validate=True)) and int(first[1]) >= 0
    except ValueError:
        return False


def _byte_level_alphabet() -> dict:
    """The printable character byte-level BPE (GPT-2's scheme) writes for each byte: printable Latin-1 bytes
    stand for themselves, the others are moved to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


def tiktoken_from_tokenizer_json(path) -> tuple:
    """(ranks, special_tokens, pattern) of a byte-level BPE `tokenizer.json` (Qwen2, Llama 3), whose token ids
    follow merge order as tiktoken's ranks do."""
    import json

    spec = json.loads(Path(path).read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: only byte-level BPE tokenizer.json files can be read, not {model.get('type')}")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    splits = [p["pattern"]["Regex"] for p in steps if p.get("type") == "Split" and "Regex" in p.get("pattern", {})]
    if not splits or not any(p.get("type") == "ByteLevel" for p in steps):
        raise TokenizerError(f"{path}: not a byte-level BPE with a split pattern (as Qwen2 and Llama 3 have)")
    alphabet = _byte_level_alphabet()
    try:
        ranks = {bytes(alphabet[c] for c in token): i for token, i in model["vocab"].items()}
    except KeyError:
        raise TokenizerError(f"{path}: a vocabulary entry is not in the byte-level alphabet") from None
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    return ranks, special, splits[0]


def write_tiktoken_file(path, ranks: dict):
    """Write ranks as a tiktoken file: one `base64(token bytes) rank` line per token, in rank order."""
    lines = (base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    Path(path).write_bytes(b"".join(lines))


def load_tokenizer(path, special_tokens: Optional[dict] = None, bos_id: Optional[int] = None,
                   eos_ids: Optional[list] = None, pattern: Optional[str] = None):
    """Open a sentencepiece model or tiktoken file, told apart by content.

    special_tokens, bos_id, eos_ids and pattern (the pre-tokenizer split of a tiktoken file; default Llama 3's)
    come from the checkpoint (what the conversion read from the HF files) and take precedence over what the
    tokenizer file says. `stop_ids` is every id that ends generation.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer {path} not found; pass --tokenizer_path or put tokenizer.model "
                             "beside the checkpoint")
    tiktoken_file = False
    try:
        tiktoken_file = is_tiktoken_file(path)
        tok = (TiktokenTokenizer(path, special_tokens, pattern or LLAMA3_PATTERN) if tiktoken_file
               else SentencePieceTokenizer(path))
    except TokenizerError:
        raise
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer {path}: {e.strerror or e}") from None
    except Exception as e:
        if tiktoken_file:
            raise TokenizerError(f"cannot read tiktoken file {path}: {type(e).__name__}: {e}") from None
        raise TokenizerError(f"cannot read tokenizer {path}: neither a tiktoken file nor a sentencepiece "
                             f"model ({type(e).__name__})") from None
    if bos_id is not None:
        tok.bos_id = bos_id
    stop = list(eos_ids or [])
    if not stop and tok.eos_id is not None and tok.eos_id >= 0:
        stop = [tok.eos_id]
    for name in ("<|eot_id|>", "<|eom_id|>", "<|im_end|>"):  # chat turn ends stop generation too
        i = tok.token_id(name)
        if i is not None and i not in stop:
            stop.append(i)
    tok.stop_ids = stop
    return tok
