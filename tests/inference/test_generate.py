"""``DecoderLM.generate`` and the cache's API: ragged prompts, greedy and top-p sampling, EOS, bad input."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import VOCAB, same_state, snapshot, tiny_model

from spla_lit.inference import DecodeStep, KVCache, fill_greedy, sample

VARIANTS = [["model=spla"], ["model=dense"], ["model=linear"], ["model=spla", "sparse=window"]]


def _ids(B, N, seed=0):
    return torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(o))
def test_ragged_batch_equals_each_row_alone_and_greedy_is_deterministic(overrides):
    net = tiny_model(overrides)
    ids = _ids(3, 21)
    lengths = [21, 6, 13]
    out = net.generate(ids, 12, prompt_lengths=lengths)
    assert out.shape == (3, 12) and out.dtype == torch.long
    for b, n in enumerate(lengths):
        alone = net.generate(ids[b:b + 1, :n], 12)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=0, atol=0)
    again = net.generate(ids, 12, prompt_lengths=torch.tensor(lengths))
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_greedy_continuation_is_the_argmax_of_full_forwards():
    net = tiny_model(["model=spla"])
    ids = _ids(1, 9)
    out = net.generate(ids, 6)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, net(seq)[:, -1:].argmax(-1)], 1)
    torch.testing.assert_close(out, seq[:, 9:], rtol=0, atol=0)


def test_sampling_follows_the_generator_and_top_p():
    net = tiny_model(["model=spla"])
    ids = _ids(2, 10)
    a = net.generate(ids, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(4))
    b = net.generate(ids, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a nucleus of one token is the argmax
    tiny = net.generate(ids, 8, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(tiny, net.generate(ids, 8), rtol=0, atol=0)
    hot = net.generate(ids, 8, temperature=5.0, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(hot, net.generate(ids, 8))


def test_sample_keeps_exactly_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, 0.7, g) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert sample(logits, 0.0).tolist() == [0]


def test_eos_stops_a_row():
    net = tiny_model(["model=spla"])
    ids = _ids(2, 10, seed=1)
    free = net.generate(ids, 10)
    eos = int(free[0, 3])
    first = int((free[0] == eos).nonzero()[0])
    out = net.generate(ids, 10, eos_token_id=eos)
    assert out[0, : first + 1].tolist() == free[0, : first + 1].tolist()
    assert (out[0, first:] == eos).all()
    hit = (free[1] == eos).nonzero()
    stop = int(hit[0]) if len(hit) else 10
    assert out[1, :stop].tolist() == free[1, :stop].tolist()


def test_fill_greedy_generates_the_marked_positions():
    net = tiny_model(["model=spla"])
    ids = _ids(2, 24, seed=2)
    fill = torch.zeros(2, 24, dtype=torch.bool)
    fill[0, 15:19] = True  # row 0: a 4-token answer after a 15-token prompt
    fill[1, 9:11] = True  # row 1: two answers with a given token between them
    fill[1, 12:14] = True
    out = fill_greedy(net, ids, fill)
    torch.testing.assert_close(out[~fill], ids[~fill], rtol=0, atol=0)
    torch.testing.assert_close(out[0, 15:19], net.generate(ids[:1, :15], 4)[0], rtol=0, atol=0)
    with torch.no_grad():  # row 1 by hand: the given token at 11 follows the generated ones
        seq = ids[1:, :9]
        for i in range(9, 14):
            nxt = net(seq)[:, -1:].argmax(-1) if fill[1, i] else ids[1:, i:i + 1]
            seq = torch.cat([seq, nxt], 1)
    torch.testing.assert_close(out[1, :14], seq[0], rtol=0, atol=0)


def test_cache_api():
    net = tiny_model(["model=spla", "scorer.covariance=lowrank"])
    cache = net.new_cache(3, 20)
    assert isinstance(cache, KVCache) and cache.dtype == torch.float32 and cache.empty and cache.nbytes > 0
    ids = _ids(3, 8)
    with torch.no_grad():
        net(ids[1:2, :5], cache=cache.rows(1, 2))
        assert cache.lengths_list() == [0, 5, 0] and not cache.empty
        assert torch.equal(cache.layers[0].k[1, :5], cache.rows(1, 2).layers[0].k[0, :5])
        cache.reset()
        assert cache.empty and cache.lengths.tolist() == [0, 0, 0]
        torch.testing.assert_close(net(ids, cache=cache), net(ids), rtol=1e-5, atol=1e-5)
    half = net.new_cache(1, 4, dtype=torch.bfloat16)
    assert half.layers[0].k.dtype == torch.bfloat16 and half.layers[0].state.dtype == torch.float32


@torch.no_grad()
def test_bad_input_names_the_problem_and_leaves_the_cache_unchanged():
    net = tiny_model(["model=spla"])
    other = tiny_model(["model=spla"], seed=1)
    cache = net.new_cache(2, 10)
    net(_ids(2, 6), cache=cache)
    saved = snapshot(cache)
    cases = [
        (lambda: net(_ids(2, 5), cache=cache), "max_seq_len"),
        (lambda: net(_ids(3, 1), cache=cache), "batch size"),
        (lambda: other(_ids(2, 1), cache=cache), "another model"),
        (lambda: net(_ids(1, 2), torch.tensor([0, 2]), cache=cache), "cu_seqlens"),
        (lambda: net(torch.zeros(2, 1), cache=cache), "input_ids"),
        (lambda: net(_ids(2, 1)[:, :0], cache=cache), "input_ids"),
        (lambda: net(_ids(2, 1), cache=cache.layers[0]), "cache"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
        assert same_state(cache, saved), message
    ids = _ids(2, 4)
    for kwargs, name in [({"prompt_lengths": [4, 5]}, "prompt_lengths"), ({"prompt_lengths": [4]}, "prompt_lengths"),
                         ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                         ({"eos_token_id": VOCAB}, "eos_token_id")]:
        with pytest.raises(ValueError, match=name):
            net.generate(ids, 3, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        net.generate(ids, -1)
    with pytest.raises(ValueError, match="query_block"):
        tiny_model(["model=spla", "sparse.query_block=4"]).new_cache(1, 8)
    with pytest.raises(ValueError, match="max_seq_len"):
        net.new_cache(1, 0)


def test_decode_step_is_the_eager_step_on_cpu():
    net = tiny_model(["model=spla"])
    ids = _ids(2, 8)
    cache = net.new_cache(2, 12)
    with torch.no_grad():
        net(ids[:, :7], cache=cache)
        step = DecodeStep(net, cache)
        assert not step.use_graph
        torch.testing.assert_close(step(ids[:, 7]), net(ids)[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cuda_graph"):
        DecodeStep(net, cache, cuda_graph=True)
