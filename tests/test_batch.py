"""Continuous batching (`charlm.generation.batch`): groups with their own options join and
leave one batch between steps, and each writes exactly the text it writes alone."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import alone_in_shared_engine

from charlm.config.run import ModelConfig
from charlm.config.sampling import SampleOptions
from charlm.data.vocab import Vocab
from charlm.generation.batch import BatchSampler, exact_rows, padded_rows
from charlm.generation.sampler import Sampler
from charlm.model.network import CharRNN

VOCAB = Vocab("".join(sorted("\nabcdefghijklmnopqrstuvwxyz .,")))


def _model(cell: str) -> CharRNN:
    torch.manual_seed(3)
    model = CharRNN(ModelConfig(cell=cell, num_layers=2, hidden_size=40, embedding_size=12), len(VOCAB)).eval()
    with torch.no_grad():  # sharper than at initialisation, so that text depends on every step
        model.head.weight.mul_(8)
    return model


def _requests(count: int) -> list[SampleOptions]:
    """Requests that differ in every option: length, temperature (0: greedy), top-k, top-p,
    stop, prime, rows and seed."""
    out = []
    for i in range(count):
        r = random.Random(i)
        out.append(SampleOptions(length=r.randint(1, 120), temperature=[0.0, 0.5, 1.0, 1.5][i % 4],
                                 top_k=[0, 4][i % 2], top_p=[1.0, 0.8][(i // 2) % 2], stop=["", "a"][i % 5 == 0],
                                 prime=["", "the ", "a"][i % 3], num_samples=1 + (i % 3 == 0), seed=1000 + i))
    return out


def _alone(model: CharRNN, opts: SampleOptions) -> list[str]:
    """What a group writes alone in a shared engine (as one request in `charlm serve`)."""
    return alone_in_shared_engine(model, VOCAB, opts)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_groups_joining_and_leaving_write_what_they_write_alone(cell):
    model = _model(cell)
    requests = _requests(30)
    want = [_alone(model, o) for o in requests]
    engine = BatchSampler(model, VOCAB, shared=True)
    rng = random.Random(7)
    index, texts = {}, {}
    todo = list(range(len(requests)))
    most = 0
    while todo or engine.groups:
        while todo and rng.random() < 0.4:  # joins arrive between steps, several at a time
            i = todo.pop(0)
            group = engine.add(requests[i])
            index[id(group)], texts[i] = i, [[] for _ in range(group.n)]
        if engine.groups and rng.random() < 0.1:  # one steps aside for a few steps, then is back
            aside = rng.choice(engine.groups)
            engine.detach(aside)
            for _ in range(rng.randint(1, 3)):
                for group, chars in engine.step():
                    assert group is not aside
                    for row, ch in enumerate(chars):
                        texts[index[id(group)]][row].append(ch)
            engine.attach(aside)
        most = max(most, engine.rows)
        for group, chars in engine.step():
            for row, ch in enumerate(chars):
                texts[index[id(group)]][row].append(ch)
    assert most >= 8  # they did share the batch
    for i, o in enumerate(requests):
        assert ["".join(r) for r in texts[i]] == want[i], (i, o)


def test_a_removed_group_stops_taking_steps_and_rows():
    model = _model("lstm")
    engine = BatchSampler(model, VOCAB)
    long = engine.add(SampleOptions(length=10_000, seed=1, num_samples=3))
    other = engine.add(SampleOptions(length=50, seed=2))
    for _ in range(10):
        engine.step()
    assert engine.rows == 4 and long.steps == 10
    engine.remove(long)
    assert engine.rows == 1
    for _ in range(5):
        assert [g for g, _ in engine.step()] == [other]
    assert long.steps == 10 and long.state is None  # nothing of it is kept or computed
    assert other.steps == 15


def test_a_group_ends_at_its_length_or_when_every_row_has_stopped():
    model = _model("lstm")
    engine = BatchSampler(model, VOCAB)
    zero = engine.add(SampleOptions(length=0, seed=1))
    assert zero.finished and engine.rows == 0  # nothing to generate: it never joins
    short = engine.add(SampleOptions(length=3, seed=1))
    stopping = engine.add(SampleOptions(length=5_000, seed=2, stop="e", temperature=1.0))
    steps = 0
    while engine.groups:
        engine.step()
        steps += 1
    assert short.finished and short.steps == 3
    assert stopping.finished and stopping.steps < 5_000 and all(stopping.done)


def test_a_seed_is_required():
    engine = BatchSampler(_model("lstm"), VOCAB)
    with pytest.raises(Exception, match="seed"):
        engine.add(SampleOptions(length=5))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_rows_numbers_are_bit_for_bit_those_it_has_alone(cell):
    """Not only the text: every state value of a one-row group is the same alone and beside
    others (text alone would hide a rounding difference until two characters nearly tie)."""
    model = _model(cell)
    opts = SampleOptions(length=200, temperature=1.0, seed=5, prime="the ")
    alone, shared = BatchSampler(model, VOCAB, shared=True), BatchSampler(model, VOCAB, shared=True)
    mine = alone.add(opts)
    shared.add(SampleOptions(length=200, temperature=0.7, seed=6, num_samples=5))
    theirs = shared.add(opts)
    for _ in range(40):
        alone.step()
        shared.step()
        (a, b), = [(a, b) for g, a, b in shared.spans if g is theirs]
        assert torch.equal(alone.stepper.rows()[0][:1], shared.stepper.rows()[0][a:b])
    assert mine.steps == theirs.steps == 40


def test_an_engine_that_is_not_shared_runs_its_own_rows_only():
    """`charlm sample` and the API: no spare rows (on this machine a one-row product is the
    fastest), and the text of the Sampler is the engine's."""
    model = _model("lstm")
    for n in (1, 3):
        opts = SampleOptions(length=30, seed=9, num_samples=n, temperature=0.9)
        engine = BatchSampler(model, VOCAB)
        engine.add(opts)
        engine.step()
        assert engine.stepper.n == n and engine.spare is None
        rows = [list(r) for r in zip(*Sampler(model, VOCAB).generate_batch(opts), strict=True)]
        assert len(rows) == n and all(len(r) == 30 for r in rows)


def test_padded_rows_takes_the_smallest_exact_size_that_holds_the_batch():
    assert [padded_rows(n, (4, 8, 12)) for n in (1, 3, 4, 5, 8, 9, 12, 13, 70)] == [4, 4, 4, 8, 8, 12, 12, 13, 70]
    assert [padded_rows(n, (2,)) for n in (1, 2, 3)] == [2, 2, 3]
    assert padded_rows(1, (1,)) == 1


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_exact_rows_finds_sizes_that_agree_and_only_those(cell):
    """The sizes exact_rows gives compute a row as a 64-row batch does, checked here through
    the engine's own stepper; a size below the last that it leaves out (where this machine
    has one) does round differently, so the padding is needed, not a guess."""
    model = _model(cell)
    st = BatchSampler(model, VOCAB).stepper
    sizes = exact_rows(st)
    assert sizes == tuple(sorted(sizes)) and st.n == 1
    torch.manual_seed(11)
    hs, c = torch.rand(64, st.L * st.H) * 2 - 1, torch.randn(st.L, 64, st.H)
    ids = torch.randint(0, len(VOCAB), (64,))

    def rows(m):
        st.resize(m)
        st.set_rows(hs[:m], c[:, :m] if st.cell == "lstm" else None)
        st.step(ids[:m])
        h, cc = st.rows()
        return h.clone(), torch.addmm(st.head_b, st.top, st.head_w), cc.clone() if cc is not None else None

    def same(m, ref):
        got = rows(m)
        return (torch.equal(got[0], ref[0][:m]) and torch.equal(got[1], ref[1][:m])
                and (got[2] is None or torch.equal(got[2], ref[2][:, :m])))

    ref = rows(64)
    for m in (*sizes, *range(sizes[-1], 40)):
        assert same(m, ref), m
    for m in [m for m in range(1, sizes[-1]) if m not in sizes]:
        assert not same(m, ref), m
