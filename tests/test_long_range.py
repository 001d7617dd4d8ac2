"""The long-range task and its four model variants (swa_lib/lab/long_range.py, chapter 11)."""

import pytest
import torch

from swa_lib.lab.cost import score_count
from swa_lib.lab.long_range import (
    DIGITS,
    LETTERS,
    MARK,
    QUERY,
    CausalGlobalAttention,
    NeedleTask,
    Variant,
    causal_global_mask,
    evaluate,
    standard_variants,
    train_on_task,
)
from swa_lib.masks import AttentionPattern
from swa_lib.lab.model import BOS
from swa_lib.lab.training import TrainConfig


@pytest.mark.parametrize("context,stride", [(64, 16), (29, 5), (10, 3)])
def test_task_sequences_are_what_the_docstring_says(context, stride):
    task = NeedleTask(context, stride)
    tokens, answers, dist = task.sample(200, torch.Generator().manual_seed(0))
    assert tokens.shape == (200, context) and tokens.dtype == torch.long
    assert (tokens[:, 0] == BOS).all() and (tokens[:, -1] == QUERY).all()
    marks = task.marker_positions()
    assert ((marks % stride == 0) & (marks > 0) & (marks < context - 1)).all()
    assert (tokens[:, marks] == MARK).all()
    for row, ans, d in zip(tokens, answers, dist):
        is_digit = torch.isin(row, DIGITS)
        assert int(is_digit.sum()) == 1, "exactly one needle"
        pos = int(is_digit.nonzero())
        assert pos == context - 1 - int(d) and int(row[pos]) == int(ans)
        body = torch.ones(context, dtype=torch.bool)
        body[[0, context - 1, pos]] = False
        body[marks] = False
        assert torch.isin(row[body], LETTERS).all()
    # every allowed distance is reachable, and uniform sampling hits them all
    assert set(dist.tolist()) <= set(task.distances().tolist())
    assert min(task.distances().tolist()) == 1 and max(task.distances().tolist()) == context - 2


def test_task_fixed_distance_and_errors():
    task = NeedleTask(64, 16)
    tokens, answers, dist = task.sample(5, torch.Generator().manual_seed(1), distance=40)
    assert (dist == 40).all() and (tokens[:, 63 - 40] == answers).all()
    with pytest.raises(ValueError, match="distance 15"):
        task.sample(2, torch.Generator(), distance=15)  # position 48 is a marker
    with pytest.raises(ValueError, match="context"):
        NeedleTask(3, 2)


@pytest.mark.parametrize("n,left,stride", [(64, 8, 16), (13, 2, 4), (7, 0, 3)])
def test_causal_global_mask_is_the_library_pattern_made_causal(n, left, stride):
    mask = causal_global_mask(n, left, stride)
    g = torch.tensor([j > 0 and j % stride == 0 for j in range(n)])[None]
    pattern = AttentionPattern(left, 0, global_tokens=g)
    for i in range(n):
        for j in range(n):
            assert bool(mask[i, j]) == (pattern.allows(i, j) and j <= i), (i, j)
    assert not mask.triu(1).any(), "no query sees the future"
    # without globals it is the plain band, whose size score_count knows
    assert int(causal_global_mask(n, left, None).sum()) == score_count(n, (left, 0))


def test_variants_build_and_count():
    vs = {v.name: v for v in standard_variants(window=8, layers=2, stride=16)}
    assert vs["sliding"].windows == (8, 8) and vs["interleaved"].windows == (8, None)
    assert vs["full"].windows == (None, None) and vs["global"].global_stride == 16
    n = 64
    assert vs["sliding"].scores(n) == 2 * score_count(n, (8, 0))
    assert vs["full"].scores(n) == 2 * n * (n + 1) // 2
    assert vs["interleaved"].scores(n) == score_count(n, (8, 0)) + n * (n + 1) // 2
    assert vs["sliding"].scores(n) < vs["global"].scores(n) < vs["interleaved"].scores(n) < vs["full"].scores(n)
    assert vs["sliding"].reach(n) == 16  # two layers of 8
    assert vs["global"].reach(n) == vs["interleaved"].reach(n) == vs["full"].reach(n) == n - 1
    assert Variant("one", (3,)).reach(n) == 3
    sparse = Variant("g32", (8, 8), global_stride=32).sees(n)  # slot 32 reads 0..32, windows 47..63
    assert sparse[:33].all() and not sparse[33:47].any() and sparse[47:].all()
    assert vs["global"].sees(n).all()
    models = {name: v.build(dim=16, heads=2) for name, v in vs.items()}
    assert isinstance(models["global"].blocks[0].attn, CausalGlobalAttention)
    sizes = {sum(p.numel() for p in m.parameters()) for m in models.values()}
    assert len(sizes) == 1, "all variants have the same parameters"
    with pytest.raises(ValueError, match="cached"):
        models["global"].new_caches(1)


@pytest.mark.parametrize("name", ["sliding", "global", "interleaved", "full"])
def test_no_future_leakage(name):
    """Changing tokens after position t cannot change the logits at positions <= t."""
    variant = {v.name: v for v in standard_variants(window=3, layers=2, stride=4)}[name]
    model = variant.build(dim=16, heads=2, seed=0)
    task = NeedleTask(24, 4)
    tokens, _, _ = task.sample(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 4, 5, 11, 22):
            changed = tokens.clone()
            changed[:, t + 1 :] = torch.randint(0, 256, changed[:, t + 1 :].shape, generator=torch.Generator().manual_seed(t))
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :]), "the change must reach later positions"


def test_global_model_matches_the_band_model_when_no_global_slot_is_visible():
    """With the slots beyond the sequence, the global variant computes the plain SWA model exactly."""
    sliding = Variant("s", (3, 3)).build(dim=16, heads=2, seed=0)
    globl = Variant("g", (3, 3), global_stride=50).build(dim=16, heads=2, seed=0)
    globl.load_state_dict(sliding.state_dict())
    tokens, _, _ = NeedleTask(20, 7).sample(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(globl(tokens), sliding(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_short_training_run_lowers_the_loss_and_evaluate_reports_every_distance():
    task = NeedleTask(16, 8)
    variant = standard_variants(window=4, layers=2, stride=8)[-1]  # full attention
    model = variant.build(dim=16, heads=2, seed=0)
    cfg = TrainConfig(steps=60, batch=16, lr=1e-2, weight_decay=0.0, warmup=5, log_every=20, progress=False)
    history = train_on_task(model, task, cfg)
    assert [s for s, _ in history] == [20, 40, 60]
    assert history[-1][1] < history[0][1] - 0.5, history
    acc = evaluate(model, task, per_distance=4)
    assert sorted(acc) == sorted(task.distances().tolist())
    assert all(0.0 <= a <= 1.0 for a in acc.values())
