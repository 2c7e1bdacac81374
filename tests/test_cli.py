"""generate.py end to end on a tiny converted model, and its one-line errors on bad input."""
import shutil
import subprocess
import sys

from conftest import ROOT, assert_one_line_error

GENERATE = [sys.executable, str(ROOT / "generate.py")]
FAST = ["--device", "cpu", "--precision", "float32", "--num_samples", "2", "--max_new_tokens", "12"]


def run(*args):
    return subprocess.run(GENERATE + list(args), capture_output=True, text=True, timeout=300)


def test_greedy_cli_is_deterministic_and_streams_prompt_and_text(cli_checkpoint):
    first = run("--checkpoint_path", str(cli_checkpoint), "--prompt", "def model(", "--temperature", "0", *FAST)
    assert first.returncode == 0, first.stderr
    samples = first.stdout.strip("\n").split("\n")
    assert len(samples) == 2 and samples[0] == samples[1] and samples[0].startswith("def model(")
    assert len(samples[0]) > len("def model(")
    assert "tok/s" in first.stderr and "GB/s" in first.stderr and "time to first token" in first.stderr
    second = run("--checkpoint_path", str(cli_checkpoint), "--prompt", "def model(", "--temperature", "0", *FAST)
    assert second.stdout == first.stdout


def test_sampling_cli_with_batch_synthetic_prompt_and_profile(cli_checkpoint, tmp_path):
    trace = tmp_path / "trace.json"
    r = run("--checkpoint_path", str(cli_checkpoint), "--prompt", "16", "--batch_size", "2", "--top_p", "0.9",
            "--profile", str(trace), *FAST)
    assert r.returncode == 0, r.stderr
    assert "median of 2" in r.stderr
    assert trace.stat().st_size > 0


def test_missing_checkpoint_is_one_line_error(tmp_path):
    assert_one_line_error(run("--checkpoint_path", str(tmp_path / "nope.pth")), "not found")


def test_truncated_checkpoint_is_one_line_error(cli_checkpoint, tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_bytes(cli_checkpoint.read_bytes()[:5000])
    shutil.copy(cli_checkpoint.parent / "tokenizer.model", tmp_path)
    assert_one_line_error(run("--checkpoint_path", str(bad), *FAST), "cannot read checkpoint")


def test_prompt_beyond_context_is_one_line_error(cli_checkpoint):
    # the tiny llama2 config has a 128-token context
    r = run("--checkpoint_path", str(cli_checkpoint), "--prompt", "100", "--max_new_tokens", "50")
    assert_one_line_error(r, "context", "128")


def test_missing_tokenizer_is_one_line_error(cli_checkpoint, tmp_path):
    alone = tmp_path / "model.pth"
    shutil.copy(cli_checkpoint, alone)
    assert_one_line_error(run("--checkpoint_path", str(alone), *FAST), "tokenizer")


def test_bad_sampling_arguments_are_refused(cli_checkpoint):
    r = run("--checkpoint_path", str(cli_checkpoint), "--top_p", "1.5")
    assert r.returncode != 0 and "top_p" in r.stderr and "Traceback" not in r.stderr


def test_interactive_chat_answers_each_turn_and_exits_at_end_of_input(cli_checkpoint):
    r = subprocess.run(GENERATE + ["--checkpoint_path", str(cli_checkpoint), "--interactive", "--device", "cpu",
                                   "--precision", "float32", "--max_new_tokens", "8", "--temperature", "0"],
                       input="hello there\nand again\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 3  # two answered turns, then the prompt that meets end of input


def test_chat_formats_use_single_special_tokens(tiktoken_file_path, tiktoken_special_tokens):
    from generate import encode_chat
    from tokenizer import load_tokenizer

    tok = load_tokenizer(tiktoken_file_path, tiktoken_special_tokens)
    ids = encode_chat(tok, "llama3", [("user", "hi")])
    s = tiktoken_special_tokens
    assert ids[0] == s["<|begin_of_text|>"] and ids[1] == s["<|start_header_id|>"]
    assert ids.count(s["<|eot_id|>"]) == 1 and ids.count(s["<|end_header_id|>"]) == 2
    assert tok.decode(ids[1:]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_speculative_cli_prints_the_targets_greedy_text_and_the_acceptance(cli_checkpoint, tmp_path):
    from quantize import quantize_checkpoint

    draft = quantize_checkpoint(cli_checkpoint, "int8", output=tmp_path / "model_int8.pth")
    args = ["--checkpoint_path", str(cli_checkpoint), "--prompt", "def model(", "--temperature", "0", *FAST]
    plain = run(*args)
    speculative = run(*args, "--draft_checkpoint_path", str(draft), "--speculate_k", "3")
    assert speculative.returncode == 0, speculative.stderr
    assert speculative.stdout == plain.stdout
    assert speculative.stderr.count("acceptance by draft position") == 3  # each sample, then all of them
    assert "tokens per target forward" in speculative.stderr and "median of 2" in speculative.stderr


def test_speculative_cli_refuses_another_vocabulary_tokenizer_or_a_batch(cli_checkpoint, tiktoken_file_path,
                                                                         tmp_path):
    from model import ModelArgs, load_checkpoint, save_checkpoint

    target = load_checkpoint(cli_checkpoint)
    # A config of another vocabulary and no weights at all: refused by its config, before any weight is read.
    other_vocab = dict(target["model_args"], vocab_size=256)
    save_checkpoint(tmp_path / "small_vocab.pth", {}, ModelArgs.from_dict(other_vocab), target["tokenizer"])
    args = ["--checkpoint_path", str(cli_checkpoint), *FAST]
    assert_one_line_error(run(*args, "--draft_checkpoint_path", str(tmp_path / "small_vocab.pth")),
                          "vocabulary of 256 tokens", "320")
    # The same vocabulary size but another tokenizer file beside the draft.
    folder = tmp_path / "other"
    folder.mkdir()
    shutil.copy(cli_checkpoint, folder / "model.pth")
    shutil.copy(tiktoken_file_path, folder / "tokenizer.model")
    assert_one_line_error(run(*args, "--draft_checkpoint_path", str(folder / "model.pth")), "tokenizer", "differs")
    assert_one_line_error(run(*args, "--draft_checkpoint_path", str(cli_checkpoint), "--batch_size", "2"),
                          "--batch_size 1")
    assert_one_line_error(run(*args, "--draft_checkpoint_path", str(tmp_path / "missing.pth")), "not found")
