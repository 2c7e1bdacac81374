"""Speculative decoding: greedy output equal to the target's, sampled output distributed as the target's, both
caches consistent after every round, the stop and length limits exact, a draft of another vocabulary or a batch
refused, and the compiled round equal to the eager one, without recompiling."""
import pytest
import torch
import torch._dynamo

from generate import generate, load_model, prefill
from model import ModelArgs, Transformer, UserError
from speculative import accept_drafts, compile_speculative_round, speculative_generate, speculative_round

CACHE = 160


def loaded(path):
    model = load_model(path, "cpu", torch.float32)
    model.setup_caches(1, CACHE)
    return model


@pytest.fixture(scope="module")
def models(hf_checkpoint, tmp_path_factory):
    """name -> a tiny model with vocab 320: two float families, the first one's int8 copy and a second,
    separate instance of the first (its own caches, the same weights)."""
    from quantize import quantize_checkpoint

    path = hf_checkpoint("llama3.1")[1]
    int8 = quantize_checkpoint(path, "int8", output=tmp_path_factory.mktemp("spec") / "int8.pth")
    return {"llama3.1": loaded(path), "llama3.1-int8": loaded(int8), "llama3.1-copy": loaded(path),
            "mistral": loaded(hf_checkpoint("mistral")[1]), "llama2": loaded(hf_checkpoint("llama2")[1])}


def prompt_of(length, seed=1):
    return torch.randint(3, 320, (length,), generator=torch.Generator().manual_seed(seed))


# The int8 copy accepts most drafts (exercising full acceptance, the bonus token and the next round's first draft
# step caching dk); another family accepts few (exercising rejections). Mistral as the target runs past its sliding
# window (24), and 12 + 64 positions run past Llama 3.1's original context (32).
@pytest.mark.parametrize("target, draft, k", [("llama3.1", "llama3.1-int8", 1), ("llama3.1", "llama3.1-int8", 3),
                                              ("llama3.1", "llama3.1-int8", 5), ("llama3.1", "mistral", 1),
                                              ("llama3.1", "mistral", 3), ("llama3.1", "mistral", 5),
                                              ("mistral", "llama2", 3)])
def test_greedy_output_equals_the_targets_greedy_output(models, target, draft, k):
    prompt = prompt_of(12)
    expected = generate(models[target], prompt, 64, temperature=0.0)
    rows, stats = speculative_generate(models[target], models[draft], prompt, 64, speculate_k=k)
    assert rows == expected
    assert stats["rounds"] == sum(stats["accepted_counts"]) >= 63 / (k + 1)
    if draft == "llama3.1-int8":  # both paths are really taken
        assert stats["accepted_counts"][k] > 0 and stats["mean_accepted"] > 0.7 * k
    else:
        assert stats["accepted_counts"][0] > 0


def assert_cache_holds(model, seq):
    """model's KV cache at positions 0 .. len(seq)-1 equals a fresh forward over seq [T]; the cache is left as it
    was."""
    saved = [(layer.attention.kv_cache.k_cache.clone(), layer.attention.kv_cache.v_cache.clone())
             for layer in model.layers]
    with torch.no_grad():
        model(seq[None], torch.arange(seq.numel()))
    for layer, (k, v) in zip(model.layers, saved):
        cache = layer.attention.kv_cache
        assert torch.allclose(cache.k_cache[0, :, :seq.numel()], k[0, :, :seq.numel()], atol=1e-5)
        assert torch.allclose(cache.v_cache[0, :, :seq.numel()], v[0, :, :seq.numel()], atol=1e-5)
        cache.k_cache.copy_(k), cache.v_cache.copy_(v)


def start_rounds(target, draft, prompt):
    """speculative_generate's prefill: -> (emitted sequence, prompt included, as a list; last_two; pos)."""
    positions = torch.arange(prompt.numel())
    with torch.no_grad():
        token = prefill(target, prompt[None], positions, temperature=0.0)
        draft(prompt[None], positions)
    last_two = torch.cat([prompt[None, -1:], token], dim=1)
    return prompt.tolist() + [token.item()], last_two, torch.tensor([prompt.numel()])


def run_round(target, draft, emitted, last_two, pos, k):
    """One greedy speculative_round; checks what it hands the next round -> (emitted, last_two, pos, n)."""
    with torch.no_grad():
        drafted, n, last_two = speculative_round(target, draft, last_two, pos, k)
    n = n.item()
    emitted = emitted + drafted[0, :n].tolist() + [last_two[0, 1].item()]
    # The next round's [prev, token]: the last accepted draft (or the round's token when n = 0), then the new token.
    assert last_two[0].tolist() == emitted[-2:] and pos.item() + n + 1 == len(emitted) - 1
    return emitted, last_two, pos + n + 1, n


def test_both_caches_hold_exactly_the_emitted_sequence_after_every_round(models):
    # A draft whose cache missed a token (say, its last accepted one) would only accept less: the output stays
    # right. So check the caches themselves, after each round, against a fresh forward over the emitted sequence:
    # the target holds all but the last token; the draft too, except after a round that accepted all k drafts,
    # whose last draft dk it caches at the start of the next round (checked there).
    target, draft, k = models["llama3.1"], models["llama3.1-int8"], 4
    prompt = prompt_of(9, seed=5)
    emitted, last_two, pos = start_rounds(target, draft, prompt)
    counts = [0] * (k + 1)
    while len(emitted) < 9 + 80:
        emitted, last_two, pos, n = run_round(target, draft, emitted, last_two, pos, k)
        counts[n] += 1
        seq = torch.tensor(emitted)
        assert_cache_holds(target, seq[:-1])
        assert_cache_holds(draft, seq[:-2] if n == k else seq[:-1])
    assert counts[k] > 0 and sum(counts[:k]) > 0  # both paths taken
    assert emitted[9:9 + 80] == generate(target, prompt, 80, temperature=0.0)[0]


@pytest.mark.parametrize("k", [1, 3])
def test_a_round_that_accepts_every_draft_leaves_the_drafts_cache_complete_for_the_next(models, k):
    # The draft identical to the target accepts every greedy draft, so each round ends with the draft not yet run
    # on dk (at pos + k); the next round's first draft step, on [dk, token], must cache it: once it has run, the
    # draft holds the whole sequence up to that round's token, as a fresh forward computes it.
    target, draft = models["llama3.1"], models["llama3.1-copy"]
    prompt = prompt_of(7, seed=11)
    emitted, last_two, pos = start_rounds(target, draft, prompt)
    for _ in range(3):
        emitted, last_two, pos, n = run_round(target, draft, emitted, last_two, pos, k)
        assert n == k
    assert_cache_holds(draft, torch.tensor(emitted[:-1 - k]))  # the last round ran on the dk before it
    with torch.no_grad():  # a next round's first draft step alone: [dk, token] at pos - 1, pos
        draft(last_two, pos + torch.arange(-1, 1))
    assert_cache_holds(draft, torch.tensor(emitted))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_draft_identical_to_the_target_accepts_every_token(models, temperature):
    torch.manual_seed(0)
    rows, stats = speculative_generate(models["llama3.1"], models["llama3.1-copy"], prompt_of(10), 60,
                                       speculate_k=5, temperature=temperature, top_k=100)
    assert len(rows[0]) == 60
    # p = q, so min(1, p/q) = 1 up to the rounding between a 1-token and a 6-token forward (~1e-7 relative):
    # every draft is accepted and each step yields k + 1 tokens.
    assert stats["accepted_counts"] == [0] * 5 + [10] and stats["acceptance_by_position"] == [1.0] * 5


@pytest.mark.parametrize("k", [1, 2, 5])
def test_stop_token_and_max_new_tokens_are_respected_exactly(models, k):
    target, draft = models["llama3.1"], models["llama3.1-int8"]
    prompt = prompt_of(8, seed=3)
    full = generate(target, prompt, 40, temperature=0.0)[0]
    for n in range(1, 2 * (k + 1) + 2):  # every position within the first rounds and across their ends
        streamed = []
        rows, _ = speculative_generate(target, draft, prompt, n, speculate_k=k, on_token=streamed.append)
        assert rows[0] == full[:n] and streamed == [[t] for t in full[:n]]
    for stop_at in (0, 3, 7, 11):
        stop = full[stop_at]
        expected = generate(target, prompt, 40, temperature=0.0, stop_ids=[stop])[0]
        assert expected == full[:full.index(stop) + 1]
        streamed = []
        rows, _ = speculative_generate(target, draft, prompt, 40, speculate_k=k, stop_ids=[stop],
                                       on_token=streamed.append)
        assert rows[0] == expected and streamed == [[t] for t in expected]


# ------------------------------------------------------------------------------------------ distributions

def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """P(chi-square >= the observed statistic) under `expected` (counts); 0 when a cell the expected gives no mass
    is not empty. Cells expecting fewer than 5 are pooled into one, as the chi-square approximation wants."""
    observed, expected = observed.double().flatten(), expected.double().flatten()
    if observed[expected == 0].sum() > 0:
        return 0.0
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = ((obs - exp) ** 2 / exp).sum()
    return torch.special.gammaincc(torch.tensor((exp.numel() - 1) / 2.0), chi2 / 2).item()


def random_distributions(gen, *shape, zero_prob=0.25):
    """Random rows over the last dim, some entries exactly 0 (as top-k/top-p leave them); never an all-zero row."""
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64) * 1.5
    zero = torch.rand(*shape, generator=gen) < zero_prob
    zero[..., 0] = False
    return torch.softmax(logits.masked_fill(zero, float("-inf")), dim=-1).float()


def test_acceptance_rule_emits_tokens_distributed_as_the_target():
    # k = 2 over 6 tokens with exactly known distributions: the target's p1, p2[d1], p3[d1, d2] and the draft's
    # q1, q2[d1]. The rule must emit t1 ~ p1; then, when it went on (t1 was an accepted draft), t2 ~ p2[t1];
    # then t3 ~ p3[t1, t2]. (A token not emitted in this round comes from the next one, again ~ the target.)
    V, B = 6, 200_000
    gen = torch.Generator().manual_seed(0)
    p1, p2, p3 = (random_distributions(gen, *[V] * n) for n in (1, 2, 3))
    q1, q2 = random_distributions(gen, V), random_distributions(gen, V, V)
    d1 = torch.multinomial(q1, B, replacement=True, generator=gen)
    d2 = torch.multinomial(q2[d1], 1, generator=gen)[:, 0]
    target = torch.stack([p1.expand(B, V), p2[d1], p3[d1, d2]], dim=1)  # [B, 3, V]
    draft = torch.stack([q1.expand(B, V), q2[d1]], dim=1)  # [B, 2, V]
    torch.manual_seed(0)
    n, token = accept_drafts(target, draft, torch.stack([d1, d2], dim=1))
    token = token[:, 0]
    t1 = torch.where(n >= 1, d1, token)
    assert chi_square_p_value(torch.bincount(t1, minlength=V), B * p1) > 1e-3

    went_on = n >= 1
    t2 = torch.where(n >= 2, d2, token)[went_on]
    pairs = torch.bincount(t1[went_on] * V + t2, minlength=V * V).view(V, V)
    assert chi_square_p_value(pairs, pairs.sum(1, keepdim=True) * p2) > 1e-3

    bonus = n == 2
    triples = torch.bincount((d1[bonus] * V + d2[bonus]) * V + token[bonus], minlength=V ** 3).view(V, V, V)
    assert chi_square_p_value(triples, triples.sum(2, keepdim=True) * p3) > 1e-3

    # The same samples under wrong rules fail: 200k draws make the chi-square statistic of each in the thousands
    # (total variation between p1 and the wrong distribution ~0.1-0.4), against ~20 for the 1e-3 threshold.
    accept_always = d1
    assert chi_square_p_value(torch.bincount(accept_always, minlength=V), B * p1) < 1e-12
    resample_from_target = torch.where(n >= 1, d1, torch.multinomial(p1, B, replacement=True, generator=gen))
    assert chi_square_p_value(torch.bincount(resample_from_target, minlength=V), B * p1) < 1e-12


def test_sampled_output_follows_the_targets_distribution_end_to_end():
    # Two tiny random models over 4 tokens, the draft different from the target; 3 new tokens with k = 2, so the
    # first comes from the prefill and the next two from a speculative step (including the draft's second
    # proposal and its distribution). The exact target distribution of the 64 possible outputs is the product
    # of the target's conditionals, with the same temperature and top-k.
    def tiny(seed):
        torch.manual_seed(seed)
        args = ModelArgs(vocab_size=4, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=32,
                         head_dim=8, max_seq_len=32)
        model = Transformer(args).eval()
        model.setup_caches(16, 16)
        return model

    target, draft = tiny(0), tiny(1)
    prompt, V, N = torch.tensor([1, 2, 3]), 4, 2000
    sampling = dict(temperature=1.0, top_k=3)
    from generate import logits_to_probs

    seqs = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # every (t1, t2)
    with torch.no_grad():
        logits = target(torch.cat([prompt.expand(V * V, -1), seqs], dim=1), torch.arange(5))
    probs = logits_to_probs(logits, **sampling)  # [16, 5, V]
    p1 = probs[0, 2]
    p2 = probs[::V, 3]  # [t1, V]
    p3 = probs[:, 4].view(V, V, V)  # [t1, t2, V]
    exact = p1[:, None, None] * p2[:, :, None] * p3

    torch.manual_seed(0)
    counts = torch.zeros(V ** 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of 4 to 64 numbers: a second thread only adds synchronisation
    try:
        for _ in range(N):
            rows, _ = speculative_generate(target, draft, prompt, 3, speculate_k=2, **sampling)
            t1, t2, t3 = rows[0]
            counts[(t1 * V + t2) * V + t3] += 1
    finally:
        torch.set_num_threads(threads)
    assert chi_square_p_value(counts, N * exact) > 1e-3
    # N detects a rule that lets the draft's tokens through: the draft's own 3-token distribution would give a
    # chi-square statistic with expectation sum N (r - p)^2 / p (~3500 here), far above the 1e-3 threshold (~50
    # at 26 df); and it puts mass on outputs the target's top-k excludes. (Checked by hand: accepting every
    # draft, resampling from p instead of the residual, and misaligning the draft's distributions by one
    # position each fail this test.)
    with torch.no_grad():
        d = logits_to_probs(draft(torch.cat([prompt.expand(V * V, -1), seqs], dim=1), torch.arange(5)),
                            **sampling)
    draft_joint = (d[0, 2][:, None, None] * d[::V, 3][:, :, None] * d[:, 4].view(V, V, V)).flatten()
    mass = exact.flatten() > 0
    assert (N * (draft_joint[mass] - exact.flatten()[mass]) ** 2 / exact.flatten()[mass]).sum() > 200


# ------------------------------------------------------------------------------------------ refusals

def test_a_draft_with_another_vocabulary_is_refused_before_any_work(models):
    args = ModelArgs(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64,
                     head_dim=16, max_seq_len=64)
    other = Transformer(args).eval()  # no caches: the refusal must come before they are touched
    with pytest.raises(UserError, match="vocabulary has 256 tokens and the target's 320"):
        speculative_generate(models["llama3.1"], other, prompt_of(5), 10)


def test_batches_and_caches_too_small_are_refused(models):
    target, draft = models["llama3.1"], models["mistral"]
    with pytest.raises(UserError, match="batch size 1 only"):
        speculative_generate(target, draft, torch.stack([prompt_of(5), prompt_of(5, seed=2)]), 10)
    with pytest.raises(UserError, match="speculate_k"):  # prompt + new tokens fit, the k drafted beyond do not
        speculative_generate(target, draft, prompt_of(10), CACHE - 10, speculate_k=3)


# ------------------------------------------------------------------------------------------ compiled

@pytest.mark.parametrize("one_graph", [True, False], ids=["one-graph", "graph-per-step"])
def test_compiled_round_equals_eager_and_never_recompiles(models, one_graph):
    target, draft = models["llama3.1"], models["llama3.1-int8"]
    prompts = [prompt_of(10, seed=9), prompt_of(6, seed=7)]
    eager = [speculative_generate(target, draft, p, 30, speculate_k=3) for p in prompts]
    counts = [a + b for a, b in zip(eager[0][1]["accepted_counts"], eager[1][1]["accepted_counts"])]
    assert counts[3] > 0 and sum(counts[:3]) > 0  # full acceptances and rejections
    old = torch._dynamo.config.error_on_recompile
    # One graph for the round (or one for each of its three steps), whatever the positions and acceptances; a second
    # graph of any of them fails the test.
    # Greedy and sampling are separate compilations (a CLI run has one temperature), hence the reset between them.
    torch._dynamo.config.error_on_recompile = True
    try:
        torch._dynamo.reset()
        round_fn = compile_speculative_round("cpu", one_graph)
        compiled = [speculative_generate(target, draft, p, 30, speculate_k=3, round_fn=round_fn) for p in prompts]
        assert compiled == eager
        torch._dynamo.reset()
        round_fn = compile_speculative_round("cpu", one_graph)
        for seed in (0, 1):
            torch.manual_seed(seed)
            rows, stats = speculative_generate(target, draft, prompts[seed], 24, speculate_k=3, temperature=0.9,
                                               top_k=50, top_p=0.9, round_fn=round_fn)
            assert len(rows[0]) == 24 and all(0 <= t < 320 for t in rows[0])
            assert stats["mean_accepted"] > 1.5  # the int8 copy agrees with the target on most draws
    finally:
        torch._dynamo.config.error_on_recompile = old


@pytest.mark.parametrize("agreement", [1.0, 0.5, 0.0])
def test_bench_agreement_sets_how_often_a_random_draft_is_accepted(agreement):
    # scripts/bench.py's synthetic weights for speculative benchmarks on GPU: the target's greedy chain follows a
    # permutation, and a draft of another shape agrees with it on the given fraction of the vocabulary.
    from bench import MODELS, build_model, disagreeing_successor, make_predictable

    cpu, generator = torch.device("cpu"), torch.Generator().manual_seed(0)
    target_args = ModelArgs(**MODELS["tiny"])
    draft_args = ModelArgs(**dict(MODELS["tiny"], dim=64, n_layers=2, tie_word_embeddings=True))
    successor = torch.randperm(target_args.vocab_size, generator=generator)
    target = make_predictable(build_model(target_args, cpu, torch.float32, "none"), successor)
    draft = make_predictable(build_model(draft_args, cpu, torch.float32, "none"),
                             disagreeing_successor(successor, agreement, generator))
    for model in (target, draft):
        model.setup_caches(1, 200)
    prompt = torch.randint(0, target_args.vocab_size, (1, 4), generator=generator)
    rows, stats = speculative_generate(target, draft, prompt, 150, speculate_k=1)
    chain = [prompt[0, -1].item()]
    for _ in range(150):
        chain.append(successor[chain[-1]].item())
    assert rows[0] == chain[1:]  # the target follows the permutation
    # one draft per round: its acceptance rate estimates the agreement (about 75 rounds at 0.5)
    assert stats["acceptance_by_position"][0] == pytest.approx(agreement, abs=0.15)


def test_bench_int4_self_draft_of_a_predictable_target_is_accepted():
    # bench.py --draft self-int4 --agreement 1: the draft is the predictable target quantized to int4, whose
    # rounding must not move the greedy chain, so every draft is accepted (the bf16 target + int4 self)
    from bench import MODELS, build_draft, build_model, make_predictable

    cpu, generator = torch.device("cpu"), torch.Generator().manual_seed(1)
    args = ModelArgs(**MODELS["tiny"])
    successor = torch.randperm(args.vocab_size, generator=generator)
    target = make_predictable(build_model(args, cpu, torch.float32, "none"), successor)
    draft = build_draft("self-int4", target, cpu, torch.float32, 32)
    assert draft.output.weight.dtype == torch.uint8  # int4-packed: the head is quantized too
    for model in (target, draft):
        model.setup_caches(1, 64)
    prompt = torch.randint(0, args.vocab_size, (1, 4), generator=generator)
    rows, stats = speculative_generate(target, draft, prompt, 40, speculate_k=3)
    assert rows == generate(target, prompt, 40)
    assert stats["acceptance_by_position"] == [1.0, 1.0, 1.0]


def test_bench_times_both_round_graphs_in_one_run(tmp_path):
    # bench.py --round_graph one --round_graph per-step: one record each, from the same models in one process, each
    # compiled round giving the target's greedy output with every self draft accepted
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "spec.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", "tiny", "--device", "cpu",
                        "--precision", "float32", "--draft", "self", "--speculate_k", "3", "--runs", "1",
                        "--max_new_tokens", "12", "--round_graph", "one", "--round_graph", "per-step",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["round_graph"] for x in records] == ["one", "per-step"]
    for x in records:
        assert x["first_difference"] is None and x["acceptance_by_position"] == [1.0, 1.0, 1.0]
