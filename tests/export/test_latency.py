"""Latency budget: a per-layer onnxruntime table, monotone predictions, a cache that round-trips, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import train_tiny
from tiny_models import EXAMPLE, TINY_MODELS

import zerobit as zb
from zerobit.budget import float_policy, parse_budget
from zerobit.export import latency
from zerobit.export.latency import LatencyTable, LayerShape
from zerobit.policy import GroupDecision, Policy

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # shared by this module's tests: each layer shape is timed once


@pytest.fixture(autouse=True)
def own_cache(cache, monkeypatch):
    monkeypatch.setenv("ZEROBIT_CACHE", str(cache))
    monkeypatch.setattr(latency, "SESSIONS", 1)  # one session per timing: these tests check behaviour, not accuracy
    monkeypatch.setattr(latency, "GRID_FRACTIONS", (1 / 4, 1 / 2))  # and fewer widths timed per layer


@pytest.fixture(scope="module")
def graph():
    return zb.analyse(TINY_MODELS["residual"]().eval(), EXAMPLE)


def _policy(graph, kept: int, bits: int = 4) -> Policy:
    groups = {}
    for name, g in graph.groups.items():
        n = min(kept, g.channels) if g.prunable else g.channels
        groups[name] = GroupDecision((bits,) * n + (0,) * (g.channels - n))
    return Policy(groups, 8)


# A budget this machine can meet: 1.3 × the *measured* latency of the slower of two policies timed together (the
# least of two rounds, the way a policy over its budget is measured again), at a batch where compute outweighs
# onnxruntime's fixed costs: 6 of 8 channels per group at 6 bits, and the whole model at 8 bits. Latency is nearly
# flat in channels here, and the default ×8 widths keep 8-channel groups whole, so the whole 8-bit model is often
# the only policy a search can offer: a budget from the 6-channel policy alone left it 13% over (1.15×) and then 3%
# over (1.3×) on busy CI machines. A budget from the table's prediction depended on this CPU's measured/predicted
# ratio: over the budget → search again, smaller, and CI's CPU cut the stem to 2 channels (19% on digits).
# FINETUNE trains enough that a cut policy recovers.
FINETUNE = zb.FinetuneConfig(epochs=6, lr=0.02, batch_size=64)


def _latency_budget(model, graph, digits) -> zb.Latency:
    from zerobit.export.latency import measure_policies

    policies = [_policy(graph, 6, bits=6), _policy(graph, 8, bits=8)]
    ms = measure_policies(model, graph, policies, EXAMPLE, digits.train, batch=256, threads=1)
    return zb.Latency(ms=1.3 * max(ms), batch=256)


def test_predictions_never_fall_when_channels_are_added(graph):
    table = LatencyTable(batch=8, threads=1)
    shape = LayerShape.of(graph, "a1.0.0")
    for weights in ("int8", "float"):
        for cin in (1, 3, 8):
            times = [table.layer_ms(shape, cin, cout, weights, "u8") for cout in range(1, 9)]
            assert all(a <= b for a, b in zip(times, times[1:], strict=False)), times
        times = [table.layer_ms(shape, cin, 8, weights, "u8") for cin in range(1, 9)]
        assert all(a <= b for a, b in zip(times, times[1:], strict=False)), times
    whole = [table.predict(graph, _policy(graph, k)) for k in range(1, 9)]
    assert all(a <= b for a, b in zip(whole, whole[1:], strict=False)), whole
    assert whole[0] > 0


def test_a_branch_removed_whole_costs_no_time_in_the_table(graph):
    table = LatencyTable(batch=8, threads=1)
    full = _policy(graph, 8)
    emptied = Policy(dict(full.groups) | {"a1.0.0": GroupDecision((0,) * 8)}, 8)
    saved = full_ms = table.predict(graph, full)
    for name in ("a1.0.0", "a1.1"):  # the branch's two convolutions, as the full policy has them
        saved -= table.layer_ms(LayerShape.of(graph, name), 8, 8, "int4", "u8")
    assert table.predict(graph, emptied) == pytest.approx(saved)
    assert saved < full_ms


def test_the_table_round_trips_without_measuring_again(graph, monkeypatch, tmp_path):
    monkeypatch.setenv("ZEROBIT_CACHE", str(tmp_path))
    first = LatencyTable(batch=4, threads=1)
    policy = _policy(graph, 5)
    predicted = first.predict(graph, policy)
    assert first.path.exists()

    def no_measuring(*args, **kwargs):
        raise AssertionError("a cached layer was measured again")

    monkeypatch.setattr(LatencyTable, "kernel_ms", no_measuring)
    again = LatencyTable(batch=4, threads=1)
    assert again.predict(graph, policy) == predicted
    assert LatencyTable(batch=4, threads=1, path=first.path).entries == first.entries
    first.path.write_text("{not json")  # a damaged cache is measured again, not trusted
    assert LatencyTable(batch=4, threads=1).entries == {}


def test_float_reference_and_fractions(graph):
    budget = zb.Latency(fraction=0.5, batch=8)
    assert budget.reference(graph) == budget.cost(graph, float_policy(graph)) > 0
    assert budget.limit(graph) == pytest.approx(0.5 * budget.reference(graph))


def test_impossible_latency_is_refused_before_any_work(digits, graph):
    """Refused naming the floor: one channel per group (by default every width is searched where multiples of 8
    cannot reach the budget), or with channel_multiple=8 the fastest policy of such widths."""
    model = TINY_MODELS["residual"]().eval()
    with pytest.raises(zb.BudgetError, match=r"cannot be met: the fastest policy \(one channel per group\) takes "
                                             r"\d+\.\d+ ms at batch 1"):
        zb.compress(model, EXAMPLE, zb.Latency(ms=1e-6), "uniform", train_data=digits.train, eval_data=digits.val,
                    progress=False)
    with pytest.raises(zb.BudgetError, match=r"the fastest policy \(8 channels \(or all of a smaller group; "
                                             r"channel_multiple=8\) per group\) takes \d+\.\d+ ms"):
        zb.Latency(ms=1e-6).check_feasible(graph, 8, multiple=8)


def test_a_latency_searches_multiples_of_8_where_they_reach_it(graph):
    """compress's default widths under a latency: multiples of 8 (the fast kernels) unless the fastest policy of
    such widths is predicted over 90% of the budget; any other budget, any width."""
    fastest = zb.Latency(ms=1.0).floor(graph, 8, multiple=8)
    assert fastest >= zb.Latency(ms=1.0).floor(graph, 8, multiple=1)  # whole 8-channel groups vs one channel
    assert zb.Latency(ms=1.01 * fastest / 0.9).default_multiple(graph, 8) == 8
    assert zb.Latency(ms=0.99 * fastest / 0.9).default_multiple(graph, 8) == 1
    assert zb.Size(fraction=0.5).default_multiple(graph, 8) == zb.MACs(fraction=0.5).default_multiple(graph, 8) == 1


def test_a_budget_is_calibrated_on_its_model(digits, graph, monkeypatch):
    """The table's predictions are fitted to measured milliseconds of the model's calibration policies: each
    exported and timed in onnxruntime (at a batch where compute outweighs onnxruntime's fixed costs), the scale
    the geometric mean of those times over the table's predictions."""
    from zerobit.budget import calibration_policies

    timed, measure = [], latency.measure_policies

    def recording(model, graph, policies, *args, **kwargs):
        timed.append((policies, measure(model, graph, policies, *args, **kwargs)))
        return timed[-1][1]

    monkeypatch.setattr(latency, "measure_policies", recording)
    model = TINY_MODELS["residual"]().eval()
    calibrated = zb.Latency(ms=3.0, batch=256).measured_against(model, graph, EXAMPLE, digits.train)
    assert calibrated.ms == 3.0 and calibrated.batch == 256
    policies = calibration_policies(graph)
    assert len({str(p.groups) for p in policies}) == len(policies) >= 1  # the same policy is not timed twice
    for policy in policies:
        kept = {n: policy[n].kept for n in graph.groups if graph.groups[n].prunable}
        assert all(k % 8 == 0 or k == graph.groups[n].channels for n, k in kept.items())  # widths of fast kernels
    [(sent, measured)] = timed
    assert sent == policies and all(0 < m < 1e3 for m in measured)  # real timings of exported files, in ms
    predicted = [calibrated.table().predict(graph, p) for p in policies]
    expected = float(np.exp(np.mean(np.log(np.array(measured) / np.array(predicted)))))
    assert calibrated.scale == pytest.approx(expected, rel=1e-9)
    assert calibrated.cost(graph, policies[0]) == pytest.approx(calibrated.scale * predicted[0])


def test_the_scale_is_the_geometric_mean_of_measured_over_predicted(graph):
    budget = zb.Latency(ms=1.0, batch=8)
    policies = [_policy(graph, k) for k in (1, 4, 8)]
    table = [budget.table().predict(graph, p) for p in policies]
    fitted = budget.calibrated(graph, policies, [2 * table[0], 3 * table[1], 4 * table[2]])
    assert fitted.scale == pytest.approx(24 ** (1 / 3)) and fitted.ms == 1.0
    assert fitted.cost(graph, policies[1]) == pytest.approx(24 ** (1 / 3) * table[1])
    with pytest.raises(ValueError, match="scale must be a positive number"):
        budget.calibrated(graph, policies[:1], [float("nan")])


def test_the_table_is_made_monotone_without_carrying_outliers():
    from zerobit.export.latency import monotone

    rng = np.random.default_rng(0)
    for _ in range(20):
        ms = rng.uniform(0, 1, (4, 6))
        out = monotone(ms)
        assert (np.diff(out, axis=0) >= -1e-12).all() and (np.diff(out, axis=1) >= -1e-12).all()
    rising = np.add.outer(np.arange(4.0), np.arange(6.0))
    assert np.array_equal(monotone(rising), rising)  # already monotone: unchanged
    spike = rising.copy()
    spike[0, 1] = 50.0  # one slow measurement at a small width
    assert monotone(spike)[3, 5] < 50.0  # does not become the time of every larger width


def test_a_busy_moment_of_the_machine_does_not_enter_the_table(tmp_path, monkeypatch):
    """Each measurement is scaled to the machine's speed when the table began (its REFERENCE layer timed around
    it): on a machine that has become three times slower a layer times about as before, not three times slower."""
    monkeypatch.setattr(latency, "SESSIONS", 3)
    table = LatencyTable(batch=4, threads=1, path=tmp_path / "table.json")
    model, x = latency._layer_model(latency.REFERENCE, 32, 24, "int8", "u8", 4)
    quiet = table.kernel_ms(model, x)
    assert quiet > 0 and table.reference_ms > 0
    measured = latency.median_ms
    monkeypatch.setattr(latency, "median_ms", lambda *args, **kwargs: 3 * measured(*args, **kwargs))
    busy = table.kernel_ms(model, x)
    assert quiet / 1.8 < busy < 1.8 * quiet, (quiet, busy)
    table.save()
    assert LatencyTable(batch=4, threads=1, path=table.path).reference_ms == table.reference_ms


def test_parse_latency_budgets():
    assert parse_budget("latency=2.5ms") == zb.Latency(ms=2.5)
    assert parse_budget("latency=1/4,batch=64,threads=2") == zb.Latency(fraction=0.25, batch=64, threads=2)
    for bad in ("latency=2.5", "latency=2ms,batch=x", "latency=2ms,cores=2"):
        with pytest.raises(ValueError, match="latency"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="runtime"):
        zb.Latency(ms=1, runtime="tensorrt")


def test_compress_under_a_latency_budget_meets_it_measured(digits):
    model = train_tiny("residual", digits)
    graph = zb.analyse(model, EXAMPLE)
    budget = _latency_budget(model, graph, digits)
    torch.manual_seed(0)
    result = zb.compress(model, EXAMPLE, budget, "uniform", train_data=digits.train, eval_data=digits.val,
                         finetune_config=FINETUNE, progress=False)
    info = result.info
    assert info["latency_ms"] <= budget.limit(graph)  # measured on the exported file
    assert 1 <= info["latency_tries"] <= 3 and info["latency_scale"] > 0  # the table's calibration on this model
    # by default the widths of fast kernels where they reach the budget (this CPU's timings decide): 8-channel
    # groups then stay whole
    multiple = result.budget.default_multiple(graph, 8)
    assert info["channel_multiple"] == multiple
    assert multiple == 1 or all(result.policy[n].kept in (0, 8) for n, g in graph.groups.items() if g.prunable)
    assert result.accuracy > 0.3  # far above chance (0.1); the policy found depends on the timings measured


def test_opq_refuses_a_latency_budget(digits, graph):
    model = TINY_MODELS["residual"]().eval()
    ms = LatencyTable(batch=1, threads=1).predict(graph, _policy(graph, 6, bits=6))
    with pytest.raises(zb.BudgetError, match="latency"):
        zb.compress(model, EXAMPLE, zb.Latency(ms=ms), "opq", train_data=digits.train, eval_data=digits.val,
                    progress=False)


def test_the_table_is_differentiable_in_the_kept_channels(graph):
    """SBS trains its gates against the table: the same values as `layer_ms`, and gradients that never say
    fewer channels would be slower."""
    table = LatencyTable(batch=8, threads=1)
    shape = LayerShape.of(graph, "a1.0.0")
    grads = []
    for cin, cout in ((1.0, 1.0), (2.5, 5.2), (6.0, 3.0), (8.0, 8.0), (0.5, 0.5)):
        c_in, c_out = torch.tensor(cin, requires_grad=True), torch.tensor(cout, requires_grad=True)
        ms = table.layer_ms_torch(shape, c_in, c_out, "int8", "u8")
        assert float(ms.detach()) == pytest.approx(table.layer_ms(shape, cin, cout, "int8", "u8"), rel=1e-5)
        ms.backward()
        grads += [float(c_in.grad), float(c_out.grad)]
    assert min(grads) >= 0 and max(grads) > 0, grads


def test_sbs_trains_under_a_latency_budget_and_meets_it_measured(digits):
    model = train_tiny("residual", digits)
    graph = zb.analyse(model, EXAMPLE)
    budget = _latency_budget(model, graph, digits)
    torch.manual_seed(0)
    # any width: this model's groups have 8 channels, and rounding SBS's widths to ×8 keeps a partly pruned group
    # whole, which CI's table once predicted 2% over the budget (a refusal, before anything was measured)
    result = zb.compress(model, EXAMPLE, budget, "sbs", train_data=digits.train, eval_data=digits.val,
                         finetune_config=FINETUNE, progress=False, channel_multiple=1)
    assert result.info["latency_ms"] <= budget.limit(graph)  # measured on the exported file
    assert result.info["sbs_steps"] >= 40 and result.accuracy > 0.3  # gates trained; far above chance (0.1)


def test_the_next_search_follows_the_line_through_the_last_two_measurements():
    from zerobit.api import next_latency_target

    def measure(predicted: float) -> float:  # a machine that adds 0.5 ms to twice the table's prediction
        return 0.5 + 2 * predicted

    seen = [(0.5, measure(0.5))]
    first = next_latency_target(1.0, seen)
    assert first == pytest.approx(0.98 * 0.5 / 1.5) and measure(first) > 1.0  # the ratio alone: still over
    seen.append((first, measure(first)))
    assert measure(next_latency_target(1.0, seen)) == pytest.approx(0.98)  # the line: 2% under the budget
    assert next_latency_target(1.0, [(0.5, 1.5), (0.4, 1.6)]) == pytest.approx(0.98 * 0.4 / 1.6)  # falls: ratio
    assert next_latency_target(1.0, [(0.5, 0.5)]) == pytest.approx(1.0)  # under the budget: aim at it
