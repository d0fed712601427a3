"""Streaming recorders (tl_skill.record) against a slow reference that keeps every activation.

The reference stores each example's activations with `run_with_cache` and
computes the statistics with numpy and `math.fsum`. The recorder's sums are
exact, so baselines and dev accuracies must match the reference bit for bit.

Activations themselves depend on the batch a sequence is padded in (the
attention kernels sum over more positions), so exact comparisons either use
the same batches in both, or examples truncated to one length (no padding:
then batching changes no activation, and only the recorder's own summation
order could change the result).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import DatasetDict

from tl_skill import compat
from tl_skill.data.tasks import SPLITS, Task
from tl_skill.find import record_run
from tl_skill.models import model_spec
from tl_skill.predictivity import make_subtasks
from tl_skill.record import MomentStats, Recorder, RecordingError, ThresholdStats, exact_parts, exact_total
from tl_skill.tuning.prompt import SoftPrompt, layout_for

EQ_TOKENS = 8  # every example truncated to this many tokens: no padding anywhere
P = 4


# ----------------------------------------------------------------------------- reference
def reference_activations(
    model, task, split, prompt, positions="prompt", max_input_tokens=EQ_TOKENS, padding_side=None, groups=None
):
    """Activations [N, L, T, D] (dataset order, float32; float64 for "mean") and labels, via run_with_cache.

    `groups`: lists of example indices run together (default: the whole split in one batch).
    """
    texts, labels = task.texts(split), task.labels(split)
    layout = layout_for(model, prompt.length if prompt is not None else 0, max_input_tokens, padding_side)
    L = model_spec(model).n_layers
    out: list = [None] * len(texts)
    for idx in groups or [list(range(len(texts)))]:
        batch = layout.encode([texts[i] for i in idx], labels[idx])
        with prompt.applied(model, batch), torch.no_grad():
            _, cache = model.run_with_cache(
                batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n.endswith("mlp.hook_post")
            )
        acts = torch.stack([cache[compat.mlp_post_hook(l)] for l in range(L)], 1)  # [B, L, pos, D]
        for r, i in enumerate(idx):
            s, a, e = int(batch.prompt_start[r]), int(batch.input_start[r]), int(batch.input_end[r])
            if positions == "prompt":
                out[i] = acts[r, :, s : s + prompt.length].numpy()
            elif positions == "last":
                out[i] = acts[r, :, e - 1 : e].numpy()
            else:
                out[i] = acts[r, :, a:e].double().mean(1, keepdim=True).numpy()
    return np.stack(out), labels


def ref_mean(acts: np.ndarray) -> torch.Tensor:
    """Correctly rounded mean over axis 0: fsum of the float64 values, divided by N."""
    flat = acts.reshape(len(acts), -1).astype(np.float64)
    return torch.tensor([math.fsum(col) / len(acts) for col in flat.T], dtype=torch.float64).reshape(acts.shape[1:])


def ref_accuracy(acts, labels, baseline, positive, negative) -> torch.Tensor:
    """Dev accuracy of "predict positive iff activation > baseline" on the examples of the subtask's classes."""
    keep = np.isin(labels, list(positive) + list(negative))
    x = acts[keep].astype(np.float64)
    y = np.isin(labels[keep], list(positive))
    pred = x > baseline.numpy()[None]
    return torch.from_numpy((pred == y.reshape((-1,) + (1,) * (x.ndim - 1))).mean(0))


def no_hooks_left(model) -> bool:
    """Only the bridge's own permanent hooks remain (tiny-bert wires some at load time)."""
    return all(
        all(h.is_permanent for h in hp.fwd_hooks) and len(hp._forward_hooks) == len(hp.fwd_hooks)
        for hp in model.hook_dict.values()
    )


# ------------------------------------------------------------------------------ fixtures
def _take(task: Task, keep: dict[str, list[int]]) -> Task:
    return Task(DatasetDict({s: task[s].select(keep[s]) for s in SPLITS}), task.spec)


@pytest.fixture(scope="module")
def eq_task(small_task, tiny_gpt2):
    """rotten_tomatoes examples with >= EQ_TOKENS tokens (the tiny models share one tokenizer): 48 / 40 / 8."""
    sizes = {"train": 48, "dev": 40, "test": 8}
    keep = {}
    for s in SPLITS:
        lens = [len(ids) for ids in tiny_gpt2.tokenizer(small_task.texts(s), add_special_tokens=False)["input_ids"]]
        keep[s] = [i for i, n in enumerate(lens) if n >= EQ_TOKENS][: sizes[s]]
    task = _take(small_task, keep)
    for s in ("train", "dev"):
        assert set(task.labels(s)) == {0, 1}
    return task


def prompt_for(model, seed=1):
    return SoftPrompt.from_vocab(model, P, seed=seed)


# --------------------------------------------------------------------- exact arithmetic
def test_exact_parts_reconstruct_and_sum_order_free():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 7, generator=gen) * torch.logspace(-16, 5, 7)  # tiny to large magnitudes
    x[0] = torch.tensor([0.0, -0.0, 1e-17, -3e-12, 2.0**27, -(2.0**27), 1e-7])
    x = x.float()
    q1, q2, rest = exact_parts(x)
    assert torch.equal(q1.double() / 2**24 + q2.double() / 2**48 + rest, x.double())
    want = torch.tensor([math.fsum(c) for c in x.double().T.tolist()], dtype=torch.float64)
    for order in (torch.arange(500), torch.randperm(500, generator=gen), torch.arange(499, -1, -1)):
        got = exact_total(q1[order].sum(0), q2[order].sum(0), rest[order].sum(0))
        assert torch.equal(got, want)


def test_moment_and_threshold_stats_independent_of_chunking():
    """Same values fed in different chunkings and orders: identical statistics, equal to fsum references."""
    gen = torch.Generator().manual_seed(1)
    N, L, T, D, K = 57, 2, 3, 11, 3
    x = (torch.randn(N, L, T, D, generator=gen) * 3).float()
    x[:, 0, 0, 0] = 0.25  # a constant neuron
    labels = torch.randint(0, K, (N,), generator=gen)
    labels[:K] = torch.arange(K)
    results = []
    for chunks, order in (
        ([N], torch.arange(N)),
        ([1] * N, torch.arange(N)),
        ([3] * 19, torch.randperm(N, generator=gen)),
        ([20, 30, 7], torch.randperm(N, generator=gen)),
    ):
        m = MomentStats(K, L, T, D)
        start = 0
        for c in chunks:
            idx = order[start : start + c]
            start += c
            m.count_batch(labels[idx])
            for l in range(L):
                m.update(l, x[idx, l], labels[idx])
        th = ThresholdStats(torch.stack([m.mean(), m.mean([0, 2])]), K)
        for idx in order.split(5):
            th.count_batch(labels[idx])
            for l in range(L):
                th.update(l, x[idx, l], labels[idx])
        results.append((m, th))
    xn, yn = x.numpy(), labels.numpy()
    mean_all = ref_mean(xn)
    mean_02 = ref_mean(xn[np.isin(yn, [0, 2])])
    for m, th in results:
        assert torch.equal(m.count, torch.bincount(labels, minlength=K))
        assert torch.equal(m.mean(), mean_all)
        assert torch.equal(m.mean([0, 2]), mean_02)
        for c in range(K):
            assert torch.equal(m.mean([c]), ref_mean(xn[yn == c]))
        assert torch.allclose(m.std(), torch.from_numpy(xn.astype(np.float64).std(0)), rtol=1e-9, atol=1e-12)
        assert torch.equal(m.min, torch.from_numpy(xn.min(0)).double())
        assert torch.equal(m.max, torch.from_numpy(xn.max(0)).double())
        assert m.constant()[0, 0, 0] and m.constant().sum() == 1
        for b, base in enumerate((mean_all, mean_02)):
            for c in range(K):
                want = (xn[yn == c].astype(np.float64) > base.numpy()).sum(0)
                assert torch.equal(th.above[b, c], torch.from_numpy(want))
        first_m, first_th = results[0]
        for k in ("s1", "s2", "rest"):
            assert torch.equal(getattr(m, k), getattr(first_m, k)), k
        # sums of squares are plain float64 sums (only the std uses them): equal up to rounding
        assert torch.allclose(m.sumsq, first_m.sumsq, rtol=1e-14, atol=0)
        assert torch.equal(th.above, first_th.above)


def test_mean_of_absent_classes_is_an_error():
    m = MomentStats(3, 1, 1, 2)
    m.count_batch(torch.tensor([0, 0]))
    m.update(0, torch.ones(2, 1, 2), torch.tensor([0, 0]))
    with pytest.raises(RecordingError, match="no examples"):
        m.mean([1, 2])


# ---------------------------------------------------------------------- against the model
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
def test_record_run_matches_reference(request, eq_task, name):
    model = request.getfixturevalue(name.replace("-", "_"))
    prompt = prompt_for(model)
    train, ytr = reference_activations(model, eq_task, "train", prompt)
    dev, ydev = reference_activations(model, eq_task, "dev", prompt)
    subtasks = make_subtasks(eq_task.spec.label_names)
    got = record_run(model, eq_task, prompt, subtasks, batch_size=32, max_input_tokens=EQ_TOKENS, progress=False)

    spec = model_spec(model)
    assert got.baseline.shape == (spec.n_layers, P, spec.d_mlp)
    baseline = ref_mean(train)
    assert torch.equal(got.baseline, baseline)
    assert torch.allclose(got.std.double(), torch.from_numpy(train.astype(np.float64).std(0)), rtol=1e-5, atol=1e-7)
    assert torch.equal(got.accuracy[0], ref_accuracy(dev, ydev, baseline, (1,), (0,)))
    assert (got.n_train, got.n_eval) == (len(ytr), len(ydev))
    const = (train.min(0) == train.max(0)) & (dev.min(0) == dev.max(0)) & (dev.min(0) == train.min(0))
    assert torch.equal(got.constant, torch.from_numpy(const))
    assert no_hooks_left(model)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_recorder_with_padding_matches_reference(tiny_gpt2, small_task, padding_side):
    """Mixed lengths (padding; right padding puts the prompt at a different place in every row)."""
    model, prompt = tiny_gpt2, prompt_for(tiny_gpt2, seed=2)
    task = _take(small_task, {"train": list(range(30)), "dev": list(range(20)), "test": [0, 1]})
    groups = [list(range(0, 7)), list(range(7, 30))]
    acts, y = reference_activations(
        model, task, "train", prompt, max_input_tokens=96, padding_side=padding_side, groups=groups
    )
    layout = layout_for(model, P, 96, padding_side)
    texts = task.texts("train")
    spec = model_spec(model)
    moments = MomentStats(2, spec.n_layers, P, spec.d_mlp)
    rec = Recorder(model, moments)
    with rec.attached():
        for idx in groups:
            batch = layout.encode([texts[i] for i in idx], y[idx])
            if padding_side == "right":
                assert not batch.uniform_prompt
            rec.run(batch, prompt)
    assert no_hooks_left(model)
    assert torch.equal(moments.mean(), ref_mean(acts))
    for c in (0, 1):
        assert torch.equal(moments.mean([c]), ref_mean(acts[y == c]))
    assert torch.equal(moments.min, torch.from_numpy(acts.min(0)).double())
    assert torch.equal(moments.max, torch.from_numpy(acts.max(0)).double())

    th = ThresholdStats(moments.mean()[None], 2)
    rec = Recorder(model, th)
    with rec.attached():
        for idx in groups:
            rec.run(layout.encode([texts[i] for i in idx], y[idx]), prompt)
    want = np.stack([(acts[y == c].astype(np.float64) > moments.mean().numpy()).sum(0) for c in (0, 1)])
    assert torch.equal(th.above[0], torch.from_numpy(want))


def test_batch_size_and_order_do_not_change_results(tiny_gpt2, eq_task):
    model, prompt = tiny_gpt2, prompt_for(tiny_gpt2, seed=3)
    task = _take(eq_task, {"train": list(range(16)), "dev": list(range(12)), "test": [0]})
    shuffled = Task(DatasetDict({s: task[s].shuffle(seed=5) for s in SPLITS}), task.spec)
    assert not np.array_equal(shuffled.labels("train"), task.labels("train"))
    subtasks = make_subtasks(task.spec.label_names)
    runs = [
        record_run(model, t, prompt, subtasks, batch_size=bs, max_input_tokens=EQ_TOKENS, progress=False)
        for t, bs in ((task, 32), (task, 1), (task, 3), (shuffled, 3))
    ]
    train, _ = reference_activations(model, task, "train", prompt)
    assert torch.equal(runs[0].baseline, ref_mean(train))
    for r in runs[1:]:
        for key in ("accuracy", "baseline", "std", "constant"):
            assert torch.equal(getattr(r, key), getattr(runs[0], key)), key


@pytest.mark.parametrize("positions", ["last", "mean"])
def test_position_modes_match_reference(tiny_llama, eq_task, positions):
    model, prompt = tiny_llama, prompt_for(tiny_llama, seed=4)
    train, _ = reference_activations(model, eq_task, "train", prompt, positions)
    dev, ydev = reference_activations(model, eq_task, "dev", prompt, positions)
    got = record_run(
        model,
        eq_task,
        prompt,
        make_subtasks(eq_task.spec.label_names),
        positions=positions,
        batch_size=32,
        max_input_tokens=EQ_TOKENS,
        progress=False,
    )
    spec = model_spec(model)
    assert got.baseline.shape == (spec.n_layers, 1, spec.d_mlp)
    baseline = ref_mean(train)
    want = ref_accuracy(dev, ydev, baseline, (1,), (0,))
    if positions == "last":
        assert torch.equal(got.baseline, baseline)
        assert torch.equal(got.accuracy[0], want)
    else:
        # The recorder averages positions in float32; the reference in float64.
        assert torch.allclose(got.baseline, baseline, rtol=1e-5, atol=1e-7)
        near = (np.abs(dev - baseline.numpy()[None]) < 1e-5).any(0)
        assert torch.equal(got.accuracy[0][~near], want[~near])
        assert (got.accuracy[0] - want).abs().max() <= near.sum() / len(ydev) + 1e-12


def test_recorder_stops_after_last_recorded_layer(tiny_gpt2, eq_task):
    model, prompt = tiny_gpt2, prompt_for(tiny_gpt2)
    layout = layout_for(model, P, EQ_TOKENS)
    batch = layout.encode(eq_task.texts("train")[:4], eq_task.labels("train")[:4])
    fired: dict[str, int] = {}

    def counter(name):
        def hook(act, hook):
            fired[name] = fired.get(name, 0) + 1

        return hook

    watch = [
        compat.embed_hook(model),
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        compat.mlp_post_hook(1),
        compat.UNEMBED_IN_HOOK,
    ]
    extra = [(n, counter(n)) for n in watch]
    for layers, stop, reached in (
        ([0], True, set(watch[:2])),
        # the counter on layer 1's hook_post runs after the recorder's, which stops
        (None, True, set(watch[:3])),
        ([0], False, set(watch)),
    ):
        fired.clear()
        spec = model_spec(model)
        n_l = 1 if layers else spec.n_layers
        stats = MomentStats(2, n_l, P, spec.d_mlp)
        rec = Recorder(model, stats, layers=layers, stop_early=stop)
        with rec.attached():
            rec.run(batch, prompt, extra_hooks=extra)
        assert set(fired) == reached, (layers, stop)
        assert int(stats.count.sum()) == 4 and torch.isfinite(stats.mean()).all()
    assert no_hooks_left(model)


def test_statistics_memory_does_not_grow_with_examples(tiny_gpt2, eq_task):
    model, prompt = tiny_gpt2, prompt_for(tiny_gpt2)
    layout = layout_for(model, P, EQ_TOKENS)
    spec = model_spec(model)

    def footprint(n):
        m = MomentStats(2, spec.n_layers, P, spec.d_mlp)
        th = ThresholdStats(torch.zeros(1, spec.n_layers, P, spec.d_mlp), 2)
        for stats in (m, th):
            rec = Recorder(model, stats)
            with rec.attached():
                for s in range(0, n, 16):
                    rec.run(
                        layout.encode(
                            eq_task.texts("train")[s : s + min(16, n - s)],
                            eq_task.labels("train")[s : s + min(16, n - s)],
                        ),
                        prompt,
                    )
        out = {}
        for stats in (m, th):
            for k, v in vars(stats).items():
                assert not isinstance(v, (list, dict)), f"{type(stats).__name__}.{k} keeps a collection"
                if isinstance(v, torch.Tensor):
                    out[f"{type(stats).__name__}.{k}"] = tuple(v.shape)
        return out, int(m.count.sum())

    small, n_small = footprint(4)
    big, n_big = footprint(48)
    assert (n_small, n_big) == (4, 48)
    assert small == big
    assert small["MomentStats.s1"] == (2, spec.n_layers, P, spec.d_mlp)


# ------------------------------------------------------------------------------ bad input
def test_bad_recorder_arguments(tiny_gpt2, eq_task):
    model = tiny_gpt2
    spec = model_spec(model)
    stats = MomentStats(2, spec.n_layers, P, spec.d_mlp)
    with pytest.raises(RecordingError, match="out of range"):
        Recorder(model, stats, layers=[0, spec.n_layers])
    with pytest.raises(RecordingError, match="out of range"):
        Recorder(model, stats, layers=[-1])
    with pytest.raises(RecordingError, match="position mode"):
        Recorder(model, stats, positions="first")
    sub = make_subtasks(eq_task.spec.label_names)
    with pytest.raises(RecordingError, match="position mode"):
        record_run(model, eq_task, prompt_for(model), sub, positions="middle", progress=False)
    with pytest.raises(RecordingError, match="out of range"):
        record_run(model, eq_task, prompt_for(model), sub, layers=[7], progress=False)
    # no prompt to read at the prompt positions
    with pytest.raises(RecordingError, match="soft prompt"):
        record_run(model, eq_task, None, sub, max_input_tokens=EQ_TOKENS, progress=False)
    layout = layout_for(model, P, EQ_TOKENS)
    rec = Recorder(model, stats)
    with rec.attached(), pytest.raises(RecordingError, match="labelled"):
        rec.run(layout.encode(eq_task.texts("train")[:2]), prompt_for(model))
    assert no_hooks_left(model)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2.0**29])
def test_non_finite_or_huge_activations_are_refused_and_hooks_removed(tiny_gpt2, eq_task, value):
    model, prompt = tiny_gpt2, prompt_for(tiny_gpt2)
    layout = layout_for(model, P, EQ_TOKENS)
    batch = layout.encode(eq_task.texts("train")[:3], eq_task.labels("train")[:3])
    with torch.no_grad():
        with prompt.applied(model, batch):
            before = compat.forward(model, batch.input_ids, batch.attention_mask)

    def poison(act, hook):
        act = act.clone()
        act[:, :, 5] = value
        return act

    spec = model_spec(model)
    rec = Recorder(model, MomentStats(2, spec.n_layers, P, spec.d_mlp))
    with pytest.raises(RecordingError, match="non-finite|2\\^28"):
        with model.hooks(fwd_hooks=[(compat.mlp_post_hook(0), poison)]), rec.attached():
            rec.run(batch, prompt)
    assert no_hooks_left(model)
    with torch.no_grad():
        with prompt.applied(model, batch):
            after = compat.forward(model, batch.input_ids, batch.attention_mask)
    assert torch.equal(before, after)
