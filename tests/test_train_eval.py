"""scripts/train_tiny.py (training), eval.py (perplexity), the uncached forward both use, and the shipped model
that `python generate.py` runs with no arguments."""
import json
import math
import re
import shutil
import subprocess
import sys
import zlib

import pytest
import torch

from conftest import ROOT, assert_one_line_error, make_corpus
from model import ModelArgs, Transformer, save_checkpoint

EVAL = [sys.executable, str(ROOT / "eval.py")]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train_tiny.py")]
GENERATE = [sys.executable, str(ROOT / "generate.py")]
TINY = ModelArgs(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, head_dim=16,
                 max_seq_len=64)
FACTS = {"bos_id": 1, "eos_ids": [2], "special_tokens": {}, "chat_format": None, "add_bos": True}


def run(cmd, *args):
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def corpus_stream(sentencepiece_model_path):
    """make_corpus() as training documents of 40 lines each, through the tiny sentencepiece tokenizer."""
    from eval import document_ids
    from tokenizer import load_tokenizer

    tok = load_tokenizer(sentencepiece_model_path)
    lines = make_corpus()
    return torch.tensor([t for i in range(0, len(lines), 40) for t in document_ids(tok, "\n".join(lines[i:i + 40]))])


def tiny_model(seed: int = 0, args: ModelArgs = TINY) -> Transformer:
    from train_tiny import init_weights

    torch.manual_seed(seed)
    model = Transformer(args)
    init_weights(model)
    return model


def test_uncached_forward_matches_cached_prefill_past_a_sliding_window(hf_checkpoint):
    from generate import load_model

    _, path = hf_checkpoint("mistral")  # sliding window 24: the uncached mask must apply it too
    model = load_model(path, "cpu", torch.float32)
    idx = torch.randint(0, model.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    uncached = model(idx)
    model.setup_caches(2, 40)
    cached = model(idx, torch.arange(40))
    torch.testing.assert_close(uncached, cached, rtol=0, atol=1e-5)


def test_training_a_few_steps_on_a_tiny_corpus_lowers_the_loss(corpus_stream):
    from train_tiny import train

    losses = train(tiny_model(), corpus_stream, steps=40, batch_size=8, lr=3e-3, seed=0, seq_len=32)
    assert losses[0] > math.log(TINY.vocab_size) - 0.5  # starts near chance...
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5  # ...and learns the corpus' words


def test_training_is_deterministic_for_a_seed(corpus_stream):
    from train_tiny import train

    runs = []
    for _ in range(2):
        model = tiny_model(seed=3)
        runs.append((train(model, corpus_stream, steps=4, batch_size=4, lr=1e-3, seed=3, seq_len=32), model))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1].parameters(), runs[1][1].parameters()):
        assert torch.equal(a, b)
    other = train(tiny_model(seed=3), corpus_stream, steps=4, batch_size=4, lr=1e-3, seed=4, seq_len=32)
    assert other != runs[0][0]  # the seed picks the batches


def test_stdlib_split_is_fixed_by_each_path_and_holds_out_about_one_file_in_twenty():
    from eval import VALIDATION_BUCKETS, is_validation_file, stdlib_files, stdlib_split

    files = stdlib_files()
    train, val = stdlib_split()
    assert len(train) + len(val) == len(files) and not set(train) & set(val)
    assert 0.02 < len(val) / len(files) < 0.1
    assert all(is_validation_file(p) == (zlib.crc32(p.as_posix().encode()) % VALIDATION_BUCKETS == 0) for p in files)
    assert not any(part in ("test", "tests", "site-packages") for p in files for part in p.parts[:-1])


def write_fake_stdlib(folder, n_files: int = 8):
    """A few code-like .py files, at least one of which falls in the validation split."""
    from eval import is_validation_file

    lines = make_corpus(n_lines=1200, seed=1)
    names = [f"mod{i}.py" for i in range(200)]
    val, train = [n for n in names if is_validation_file(n)], [n for n in names if not is_validation_file(n)]
    picked = val[:1] + train[:n_files - 1]
    for i, name in enumerate(picked):
        (folder / name).write_text("\n".join(lines[i * 150:(i + 1) * 150]) + "\n")


def test_distilling_makes_the_student_agree_with_its_teacher_more_than_training_on_the_data(corpus_stream):
    from train_tiny import top1_agreement, train

    # a teacher the data cannot teach: a random model with peaked logits (std about 8), whose argmax is its own
    teacher = tiny_model(seed=5)
    with torch.no_grad():
        teacher.output.weight.mul_(50)
    teacher.eval()
    student_args = ModelArgs(**{**TINY.to_dict(), "n_layers": 1})
    on_data, distilled = tiny_model(seed=1, args=student_args), tiny_model(seed=1, args=student_args)
    train(on_data, corpus_stream, steps=40, batch_size=8, lr=3e-3, seed=0, seq_len=32)
    losses = train(distilled, corpus_stream, steps=40, batch_size=8, lr=3e-3, seed=0, seq_len=32, teacher=teacher)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5  # the soft cross-entropy to the teacher falls
    held_out = corpus_stream[-(4 * 32 + 1):]
    agree_on_data = top1_agreement(on_data, teacher, held_out, window=32)
    agree_distilled = top1_agreement(distilled, teacher, held_out, window=32)
    assert agree_distilled > agree_on_data + 0.2, (agree_distilled, agree_on_data)


def test_train_tiny_refuses_a_teacher_that_is_missing_or_has_another_vocabulary(tmp_path, sentencepiece_model_path):
    src, out = tmp_path / "lib", tmp_path / "out"
    src.mkdir()
    write_fake_stdlib(src)
    args = ["--preset", "draft", "--out", out, "--steps", 1, "--batch_size", 2, "--source_dir", src,
            "--eval_windows", 1, "--device", "cpu", "--tokenizer_path", sentencepiece_model_path]
    assert_one_line_error(run(TRAIN, *args, "--distill_from", tmp_path / "none.pth"), "--distill_from", "not found")
    other_vocab = ModelArgs(**{**TINY.to_dict(), "vocab_size": 300, "max_seq_len": 256})
    save_checkpoint(tmp_path / "teacher.pth", tiny_model(args=other_vocab).state_dict(), other_vocab, tokenizer=FACTS)
    assert_one_line_error(run(TRAIN, *args, "--distill_from", tmp_path / "teacher.pth"),
                          "vocabulary of 300 tokens", "--tokenizer_path")
    short = ModelArgs(**{**TINY.to_dict(), "max_seq_len": 64})  # (TINY's own context)
    save_checkpoint(tmp_path / "short.pth", tiny_model(args=short).state_dict(), short, tokenizer=FACTS)
    assert_one_line_error(run(TRAIN, *args, "--distill_from", tmp_path / "short.pth"), "context of 64 tokens")
    no_tokenizer = args[:-2]
    assert_one_line_error(run(TRAIN, *no_tokenizer, "--distill_from", tmp_path / "teacher.pth"),
                          "needs --tokenizer_path")
    assert not out.exists() or not any(out.iterdir())


def test_train_tiny_cli_writes_a_checkpoint_generate_reads_and_refuses_to_overwrite(tmp_path):
    src, out = tmp_path / "lib", tmp_path / "out"
    src.mkdir()
    write_fake_stdlib(src)
    args = ["--preset", "draft", "--out", out, "--steps", 3, "--batch_size", 2, "--source_dir", src,
            "--vocab_size", 320, "--eval_windows", 1, "--device", "cpu"]
    r = run(TRAIN, *args)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "train_info.json").read_text())
    assert info["steps"] == 3 and info["seed"] == 0 and info["validation_files"] == 1 and info["train_files"] == 7
    assert info["python"] and math.isfinite(info["validation_loss"]) and math.isfinite(info["final_train_loss"])
    g = run(GENERATE, "--checkpoint_path", out / "model.pth", "--max_new_tokens", 5, "--num_samples", 1,
            "--device", "cpu")
    assert g.returncode == 0, g.stderr
    before = (out / "model.pth").read_bytes()
    assert_one_line_error(run(TRAIN, *args), "exist", "--force")
    assert (out / "model.pth").read_bytes() == before


@pytest.fixture(scope="module")
def eval_checkpoint(sentencepiece_model_path, tmp_path_factory):
    """A tiny random model with peaked logits (std 0.2), saved with its tokenizer beside it."""
    from train_tiny import init_weights

    folder = tmp_path_factory.mktemp("eval")
    model = tiny_model()
    init_weights(model, std=0.2)
    save_checkpoint(folder / "model.pth", model.state_dict(), TINY, tokenizer=FACTS)
    shutil.copy(sentencepiece_model_path, folder / "tokenizer.model")
    return folder / "model.pth"


def perplexity_of(r) -> float:
    assert r.returncode == 0, r.stderr
    return float(re.search(r"perplexity ([0-9.]+)", r.stdout).group(1))


def test_eval_perplexity_equals_a_hand_computation_from_cached_decoding(eval_checkpoint, tmp_path):
    from eval import document_ids
    from generate import checkpoint_tokenizer, load_model
    from model import load_checkpoint

    text = "def model(x):\n    return cache(x, 7)\n"
    files = [tmp_path / "a.py", tmp_path / "b.py"]
    files[0].write_text(text)
    files[1].write_text(text.upper())
    window = 6
    r = run(EVAL, "--checkpoint_path", eval_checkpoint, "--files", *files, "--window", window, "--batch_size", 2,
            "--device", "cpu")
    reported = perplexity_of(r)

    # By hand: the two documents joined, cut into windows of `window` inputs; each window decoded one token at a
    # time through the KV cache (not the uncached forward eval.py uses), -log p of each next token averaged.
    tok = checkpoint_tokenizer(eval_checkpoint, load_checkpoint(eval_checkpoint))
    ids = document_ids(tok, text) + document_ids(tok, text.upper())
    n_windows = (len(ids) - 1) // window
    assert n_windows >= 3 and (len(ids) - 1) % window  # some windows in odd batches, and a tail left unscored
    model = load_model(eval_checkpoint, "cpu", torch.float32)
    model.setup_caches(1, window)
    nll = []
    for w in range(n_windows):
        chunk = ids[w * window:(w + 1) * window + 1]
        for pos in range(window):
            logits = model(torch.tensor([[chunk[pos]]]), torch.tensor([pos]))[0, -1]
            nll.append(-torch.log_softmax(logits.double(), -1)[chunk[pos + 1]].item())
    by_hand = math.exp(sum(nll) / len(nll))
    assert reported == pytest.approx(by_hand, rel=1e-4)
    assert f"over {n_windows * window} tokens" in r.stdout
    assert "eval:" in r.stderr  # the progress display


def test_eval_reads_a_quantized_checkpoint_from_its_record(eval_checkpoint, tmp_path):
    from quantize import quantize_checkpoint

    text = tmp_path / "a.py"
    text.write_text("\n".join(make_corpus(n_lines=60, seed=2)))
    common = ["--files", text, "--window", 32, "--device", "cpu"]
    float_ppl = perplexity_of(run(EVAL, "--checkpoint_path", eval_checkpoint, *common))
    int8 = quantize_checkpoint(eval_checkpoint, "int8", output=tmp_path / "model_int8.pth")
    r = run(EVAL, "--checkpoint_path", int8, "--tokenizer_path", eval_checkpoint.parent / "tokenizer.model", *common)
    assert "int8" in r.stderr
    int8_ppl = perplexity_of(r)
    assert int8_ppl != float_ppl and int8_ppl == pytest.approx(float_ppl, rel=0.05)


def test_eval_of_text_shorter_than_one_window_is_one_line_error(eval_checkpoint, tmp_path):
    short = tmp_path / "short.py"
    short.write_text("x = 1\n")
    r = run(EVAL, "--checkpoint_path", eval_checkpoint, "--files", short, "--window", 32, "--device", "cpu")
    assert_one_line_error(r, "tokens", "window of 32")


def test_eval_window_longer_than_the_context_is_one_line_error(eval_checkpoint, tmp_path):
    text = tmp_path / "a.py"
    text.write_text("\n".join(make_corpus()))
    r = run(EVAL, "--checkpoint_path", eval_checkpoint, "--files", text, "--window", TINY.max_seq_len + 1)
    assert_one_line_error(r, "context")


def test_generate_with_no_arguments_writes_code_from_the_shipped_model():
    r = run(GENERATE, "--max_new_tokens", 40, "--num_samples", 1, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "models/stdlib-target/model.pth" in r.stderr
    assert r.stdout.startswith("def fib(n):")
    new = r.stdout[len("def fib(n):"):]
    assert len(new.strip()) > 20
    # Python's shape: the body of the def indented, and Python's words or punctuation in it (an untrained
    # model's byte soup has neither)
    assert re.search(r"\n {4}\S", new), new
    assert any(w in new for w in ('"""', "return", "self", "import", "(", " = ", "if ", "for ")), new
