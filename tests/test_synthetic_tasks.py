"""The synthetic tasks of ``benchmarks.synthetic`` ask what they say they ask: each target is derivable from
the inputs before it by the task's rule, written here independently, row by row."""

from __future__ import annotations

import pytest
import torch

from benchmarks.synthetic import IGNORE, Task, accuracy


def _rows(task: Task, n: int = 64, seed: int = 0):
    inputs, targets = task.batch(n, torch.Generator().manual_seed(seed))
    assert inputs.shape == targets.shape == (n, task.seq_len) and inputs.dtype == torch.long
    assert int(inputs.min()) >= 0 and int(inputs.max()) < task.vocab_size
    return inputs.tolist(), targets.tolist()


@pytest.mark.parametrize("pairs,queries,seq_len", [(8, 16, 32), (4, 6, 20), (1, 1, 3)])
def test_mqar_targets_are_the_values_of_the_queried_keys(pairs, queries, seq_len):
    task = Task("mqar", vocab_size=65, seq_len=seq_len, num_pairs=pairs, num_queries=queries)
    for x, y in zip(*_rows(task), strict=True):
        context = dict(zip(x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2], strict=True))
        assert len(context) == pairs and len(set(context.values())) == pairs  # distinct keys and values
        assert all(1 <= k <= 32 < v for k, v in context.items())
        asked = [t for t in range(seq_len) if y[t] != IGNORE]
        assert len(asked) == queries and min(asked) >= 2 * pairs
        for t in range(2 * pairs, seq_len):
            if y[t] == IGNORE:
                assert x[t] == 0, "a position after the context that asks nothing holds filler"
            else:
                assert y[t] == context[x[t]], "the target of a query is its key's value"


def test_mqar_query_power_pulls_the_queries_towards_the_context():
    """Uniform by default; with ``query_power`` > 0 the queries sit nearer the context on average, and the
    targets still follow the rule."""
    mean_gap = {}
    for power in (0.0, 2.0):
        task = Task("mqar", seq_len=64, num_pairs=8, num_queries=8, query_power=power)
        inputs, targets = _rows(task, n=256)
        gaps = [t - 16 for row in targets for t, y in enumerate(row) if y != IGNORE]
        assert len(gaps) == 256 * 8 and min(gaps) >= 0
        mean_gap[power] = sum(gaps) / len(gaps)
        for x, y in zip(inputs, targets, strict=True):
            context = dict(zip(x[0:16:2], x[1:16:2], strict=True))
            assert all(y[t] == context[x[t]] for t in range(16, 64) if y[t] != IGNORE)
    assert 20 < mean_gap[0.0] < 28 and mean_gap[2.0] < 12, mean_gap  # uniform over 48 slots: 23.5


def test_induction_target_follows_the_first_trigger():
    task = Task("induction", vocab_size=20, seq_len=24)
    for x, y in zip(*_rows(task), strict=True):
        assert x[-1] == 0 and x[:-1].count(0) == 1
        first = x.index(0)
        assert first <= len(x) - 3
        assert y[:-1] == [IGNORE] * (len(x) - 1) and y[-1] == x[first + 1]


def test_selective_copy_targets_are_the_data_tokens_in_order():
    task = Task("selective_copy", vocab_size=12, seq_len=30, num_tokens=5)
    for x, y in zip(*_rows(task), strict=True):
        data = [t for t in x[:25] if t >= 2]
        assert len(data) == 5 and x[25:] == [1] * 5 and set(x[:25]) <= {0, *data}
        assert y[:25] == [IGNORE] * 25 and y[25:] == data


def test_batches_are_reproducible_from_the_generator():
    task = Task()
    a = task.batch(8, torch.Generator().manual_seed(3))
    b = task.batch(8, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_accuracy_counts_only_the_asked_positions():
    class Oracle(torch.nn.Module):
        """Predicts the target where one is asked and token 0 elsewhere (wrong wherever something is asked
        and the target is not 0)."""

        def __init__(self, targets):
            super().__init__()
            self.targets = targets

        def forward(self, x):
            wanted = self.targets.clamp(min=0)
            return torch.nn.functional.one_hot(wanted, 65).float()

    inputs, targets = Task().batch(16, torch.Generator().manual_seed(0))
    assert accuracy(Oracle(targets), inputs, targets) == 1.0
    shifted = torch.where(targets == IGNORE, targets, (targets + 1) % 65)
    assert accuracy(Oracle(shifted), inputs, targets) == 0.0


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"name": "copy"}, r"task must be one of \['mqar', 'induction', 'selective_copy'\], got 'copy'"),
        ({"num_pairs": 40}, r"num_pairs=40 needs at least 81 tokens .* got vocab_size=65"),
        ({"num_queries": 20}, r"8 pairs \(2 tokens each\) and 20 queries need seq_len >= 36, got 32"),
        ({"seq_len": 0}, r"seq_len must be an int >= 1, got 0"),
        ({"name": "selective_copy", "num_tokens": 16}, r"num_tokens=16 needs seq_len >= 33"),
        ({"query_power": -1.0}, r"query_power must be a finite number >= 0, got -1.0"),
    ],
)
def test_bad_task_knobs_are_named(fields, match):
    with pytest.raises(ValueError, match=match):
        Task(**fields)
