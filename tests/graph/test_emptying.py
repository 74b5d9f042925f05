"""Groups removed whole (residual branches, MLPs): found on the model itself, exact, stored, loaded and exported."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import EXAMPLE, TINY_MODELS
from torch import nn

import zerobit as zb
from zerobit import zoo
from zerobit.budget import macs
from zerobit.export.zbit import estimate_bytes
from zerobit.graph import analyse
from zerobit.graph.emptying import Constant, Emptied
from zerobit.policy import GroupDecision, LayerDecision, Policy, uniform_policy
from zerobit.quant.apply import prune_structure
from zerobit.strategies import Sequential, Uniform


def _with_statistics(model: nn.Module) -> nn.Module:
    """Eval mode with BatchNorm statistics and shifts that are not the identity (a folded constant is not 0)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    return model.eval()


def _emptied(graph, names, bits: int = 8) -> Policy:
    policy = uniform_policy(graph, {n: torch.ones(g.channels) for n, g in graph.groups.items()}, 1.0, bits)
    return Policy(dict(policy.groups) | {n: GroupDecision((0,) * graph.groups[n].channels) for n in names}, 8)


def test_residual_branches_and_mlps_can_go_whole_and_nothing_else():
    found = {name: {g for g, grp in analyse(cls().eval(), EXAMPLE).groups.items() if grp.empties}
             for name, cls in TINY_MODELS.items()}
    # plain: its first conv's only reader is the next conv, but without it the output no longer depends on the
    # input; concat: the 1×1 conv reads both branches
    assert found == {"plain": set(), "residual": {"a1.0.0", "a2.0.0"}, "depthwise": {"expand.0"}, "concat": set(),
                     "layernorm": {"fc1"}}
    vit = analyse(zoo.build("vit").eval(), zoo.example_input("vit"))
    assert {g for g, grp in vit.groups.items() if grp.empties} == {f"blocks.{i}.fc1" for i in range(4)}


@pytest.mark.parametrize("name, group, reader", [("residual", "a1.0.0", "a1.1"), ("depthwise", "expand.0", "project.0"),
                                                 ("layernorm", "fc1", "fc2")])
def test_an_emptied_group_computes_what_zero_weights_in_its_readers_compute(name, group, reader):
    torch.manual_seed(0)
    model = _with_statistics(TINY_MODELS[name]())
    graph = analyse(model, EXAMPLE)
    policy = _emptied(graph, [group])
    pruned = prune_structure(model, graph, policy, EXAMPLE)
    assert isinstance(pruned.get_submodule(reader), Constant)
    assert all(isinstance(pruned.get_submodule(n), Emptied) for n in graph.groups[group].layers)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.get_submodule(reader).weight.zero_()
        x = torch.randn(16, 1, 8, 8)
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-5)
    gone = graph.layers[reader].macs + sum(graph.layers[n].macs for n in graph.groups[group].layers)
    assert macs(graph, policy) == graph.macs - gone


def test_policies_remove_only_what_can_go_whole():
    graph = analyse(TINY_MODELS["residual"]().eval(), EXAMPLE)
    with pytest.raises(ValueError, match="keep at least one"):
        _emptied(graph, ["stem.0"]).validate(graph)
    policy = _emptied(graph, ["a1.0.0"])
    policy.validate(graph)
    assert policy.removed_layers(graph) == {"a1.0.0", "a1.1"}
    sparse = Policy(policy.groups, 8, layers={"a1.1": LayerDecision(sparsity=0.5)})
    with pytest.raises(ValueError, match="removes whole"):
        sparse.validate(graph)
    with pytest.raises(ValueError, match="cannot be removed whole"):
        Uniform(empty=("stem.0",)).search(_problem(graph))
    with pytest.raises(ValueError, match="holds no group"):
        Uniform(empty=("stem",)).search(_problem(graph))
    with pytest.raises(ValueError, match="neither a channel group"):
        Uniform(empty=("nothing",)).search(_problem(graph))


def _problem(graph):
    from zerobit.strategies import Problem

    model = TINY_MODELS["residual"]().eval()
    scores = {n: torch.ones(g.channels) for n, g in graph.groups.items()}
    return Problem(model, graph, zb.Size(fraction=1 / 4), EXAMPLE, None, None, scores, 8)


@pytest.mark.parametrize("strategy", [Uniform, Sequential])
def test_named_branches_are_removed_and_the_file_loads_and_deploys_them(tmp_path, trained_residual, digits, strategy):
    result = zb.compress(trained_residual, EXAMPLE, zb.Size(fraction=1 / 5), strategy(empty="a2"),
                         train_data=digits.train, eval_data=digits.val, test_data=digits.test, progress=False,
                         finetune_config=zb.FinetuneConfig(epochs=3, lr=0.02))
    graph = result.graph
    assert result.policy["a2.0.0"].kept == 0 and result.policy["a1.0.0"].kept > 0
    assert result.info["emptied"] == ["a2.0.0"]
    # one of this 8-channel model's two branches gone (9% right without it before the fine-tune), 5× smaller,
    # 3 short epochs on 1,200 images
    assert result.accuracy > 0.4
    path = tmp_path / "m.zbit"
    assert zb.save(result, path) == path.stat().st_size == estimate_bytes(graph, result.policy) == result.file_bytes
    loaded = zb.load(path, TINY_MODELS["residual"]())
    assert isinstance(loaded.a2[1], Constant) and not any(isinstance(m, nn.Conv2d) for m in loaded.a2.modules())
    with torch.no_grad():
        assert torch.equal(loaded(digits.test.x), result.model.eval()(digits.test.x))
    pytest.importorskip("onnxruntime")
    from zerobit.export.onnx import export_onnx, parity

    report = export_onnx(path, tmp_path / "m.onnx", model=TINY_MODELS["residual"](), mode="exact")
    assert set(report.layers) == set(graph.layers) - {"a2.0.0", "a2.1"}
    found = parity(tmp_path / "m.onnx", loaded, digits.test)
    assert found["agreement"] >= 0.99, found


def test_a_transformers_mlp_goes_whole_and_its_pooler_does_not(tmp_path):
    pytest.importorskip("transformers")
    from test_transformers import bert, token_batches

    model, train = bert(), token_batches(4, 16, 1)
    example = {k: v[:2] for k, v in train[0].items() if k != "labels"}
    graph = analyse(model, example)
    # the pooler's only reader is the classifier: without it every input gets the same logits (token ids are
    # changed by reversing them, as a float input gets noise)
    layers = [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    assert {g for g, grp in graph.groups.items() if grp.empties} == set(layers)
    result = zb.compress(model, example, zb.Size(fraction=1 / 8), Uniform(empty=("bert.encoder.layer.1",)),
                         train_data=train, eval_data=train[:1], finetune_config=zb.FinetuneConfig(epochs=0),
                         progress=False)
    assert result.policy[layers[1]].kept == 0
    path = tmp_path / "bert.zbit"
    assert zb.save(result, path) == path.stat().st_size == result.file_bytes
    loaded = zb.load(path, bert(), example_inputs=example)
    assert isinstance(loaded.bert.encoder.layer[1].output.dense, Constant)
    with torch.no_grad():
        assert torch.equal(loaded(**example).logits, result.model.eval()(**example).logits)
