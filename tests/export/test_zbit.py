from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tiny_models import EXAMPLE, TINY_MODELS

from zerobit.export.layout import layer_layouts
from zerobit.export.runtime import decode, load, read_zbit, save_zbit
from zerobit.export.zbit import FORMAT_VERSION, ZbitFormatError, estimate_bytes, safetensors_bytes
from zerobit.graph import analyse
from zerobit.policy import GroupDecision, LayerDecision, Policy
from zerobit.quant import apply_policy
from zerobit.train.calibrate import calibrate_activations, recalibrate_batchnorm


def mixed_policy(graph, seed: int, act_bits: int) -> Policy:
    """Random per-channel bits from every choice, at least one channel kept per group."""
    gen = torch.Generator().manual_seed(seed)
    choices = torch.tensor([0, 2, 3, 4, 5, 6, 8, 32])
    groups = {}
    for name, g in graph.groups.items():
        pick = choices[torch.randint(0 if g.prunable else 1, len(choices), (g.channels,), generator=gen)]
        pick[0] = 8 if pick[0] == 0 else pick[0]
        groups[name] = GroupDecision(tuple(pick.tolist()))
    return Policy(groups, act_bits)


def applied(name: str, seed: int, act_bits: int):
    torch.manual_seed(seed)
    model = TINY_MODELS[name]().eval()
    graph = analyse(model, EXAMPLE)
    policy = mixed_policy(graph, seed, act_bits)
    q = apply_policy(model, graph, policy, EXAMPLE)
    batches = [(torch.randn(32, 1, 8, 8), None) for _ in range(3)]
    recalibrate_batchnorm(q, batches)
    calibrate_activations(q, batches)
    return model, graph, policy, q.eval()


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("seed,act_bits", [(0, 8), (1, 32), (2, 4)])
def test_estimate_is_file_size_and_load_is_exact(tmp_path, name, seed, act_bits):
    model, graph, policy, q = applied(name, seed, act_bits)
    path = tmp_path / "m.zbit"
    written = save_zbit(q, graph, policy, path)
    assert written == os.path.getsize(path) == estimate_bytes(graph, policy)
    loaded = load(path, TINY_MODELS[name]())
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert read_zbit(path).policy == policy
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())  # folded away


def test_zero_bit_channels_are_physically_gone(tmp_path):
    _model, graph, policy, q = applied("residual", 3, 8)
    kept = policy["stem.0"].kept
    assert kept < 8  # the seed removes some channels of the residual group
    path = tmp_path / "m.zbit"
    save_zbit(q, graph, policy, path)
    loaded = load(path, TINY_MODELS["residual"]())
    assert loaded.get_submodule("stem.0").weight.shape[0] == kept
    assert loaded.get_submodule("a1.1").weight.shape[:2] == (kept, policy["a1.0.0"].kept)
    assert loaded.get_submodule("fc").weight.shape == (10, kept)


def test_removing_channels_shrinks_the_file():
    model = TINY_MODELS["plain"]().eval()
    graph = analyse(model, EXAMPLE)
    full = Policy({n: GroupDecision((4,) * g.channels) for n, g in graph.groups.items()})
    half = Policy({n: GroupDecision((4,) * (g.channels // 2) + ((0,) if g.prunable else (4,)) * (g.channels -
                   g.channels // 2)) for n, g in graph.groups.items()})
    assert estimate_bytes(graph, half) < estimate_bytes(graph, full)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_file_gives_one_clear_error(tmp_path, damage):
    _model, graph, policy, q = applied("plain", 0, 8)
    path = tmp_path / "m.zbit"
    save_zbit(q, graph, policy, path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(300))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(ZbitFormatError, match="corrupt|not a readable"):
        load(path, TINY_MODELS["plain"]())


def test_custom_model_needs_the_model_object(tmp_path):
    _model, graph, policy, q = applied("plain", 0, 8)
    save_zbit(q, graph, policy, tmp_path / "m.zbit")
    with pytest.raises(ValueError, match="pass the model object"):
        load(tmp_path / "m.zbit")
    with pytest.raises(ValueError, match="different model"):
        load(tmp_path / "m.zbit", TINY_MODELS["residual"]())


def sparse_policy(graph, seed: int, codebook: bool) -> Policy:
    """One bit-width per group, unstructured sparsity (and optionally codebooks) on every layer."""
    gen = torch.Generator().manual_seed(seed)
    groups, layers = {}, {}
    for name, g in graph.groups.items():
        bits = [2, 3, 4, 5, 6, 8][int(torch.randint(0, 6, (1,), generator=gen))]
        keep = g.channels if not g.prunable else max(1, g.channels - 2)
        groups[name] = GroupDecision((bits,) * keep + (0,) * (g.channels - keep))
    for i, name in enumerate(graph.layers):
        sparsity = [0.0, 0.3, 0.8, 0.97][(i + seed) % 4]
        layers[name] = LayerDecision(sparsity, codebook and i % 2 == 0)
    return Policy(groups, 8, layers=layers)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("seed,codebook", [(0, False), (1, True)])
def test_sparse_and_codebook_layers_are_exact(tmp_path, name, seed, codebook):
    torch.manual_seed(seed)
    model = TINY_MODELS[name]().eval()
    graph = analyse(model, EXAMPLE)
    policy = sparse_policy(graph, seed, codebook)
    q = apply_policy(model, graph, policy, EXAMPLE)
    batches = [(torch.randn(32, 1, 8, 8), None) for _ in range(2)]
    calibrate_activations(q, batches)
    path = tmp_path / "m.zbit"
    assert save_zbit(q, graph, policy, path) == estimate_bytes(graph, policy) == os.path.getsize(path)
    loaded = load(path, TINY_MODELS[name]())
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert read_zbit(path).full_policy(graph) == policy
    for lname, decision in policy.layers.items():
        w = q.get_submodule(lname).deploy().weight
        assert int((w != 0).sum()) <= w.numel() - round(decision.sparsity * w.numel())


def test_sparsity_shrinks_the_file_and_positions_are_counted():
    model = TINY_MODELS["plain"]().eval()
    graph = analyse(model, EXAMPLE)
    dense = Policy({n: GroupDecision((4,) * g.channels) for n, g in graph.groups.items()})
    sizes = [estimate_bytes(graph, Policy(dense.groups, layers={n: LayerDecision(s) for n in graph.layers}))
             for s in (0.0, 0.5, 0.9)]
    assert sizes[0] > sizes[1] > sizes[2]
    # 50% sparse at 4 bits: codes halve, a 1-bit-per-weight bitmap is added: 3 bits per weight instead of 4
    half = Policy(dense.groups, layers={n: LayerDecision(0.5) for n in graph.layers})
    payload = sum(lay.code_bytes + lay.position_bytes for lay in layer_layouts(graph, half))
    params = sum(layer.params for layer in graph.layers.values())
    assert payload == pytest.approx(params * 3 / 8, abs=len(graph.layers) * 2)
    # 97% sparse: the index list beats the bitmap
    lay = [x for x in layer_layouts(graph, Policy(dense.groups, layers={"features.1.0": LayerDecision(0.97)}))
           if x.name == "features.1.0"][0]
    assert lay.position_bytes < (16 * 108) // 8


@pytest.mark.parametrize("per", [300, 5000, 70_000])
@pytest.mark.parametrize("sparsity", [0.3, 0.97])
def test_wide_layers_need_wide_position_codes(tmp_path, per, sparsity):
    """Channels of more than 256 weights need 9+ bit indices and counts (bitmap at 30%, index list at 97%)."""
    torch.manual_seed(per)
    model = torch.nn.Sequential(torch.nn.Linear(per, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).eval()
    example = torch.zeros(1, per)
    graph = analyse(model, example)
    policy = Policy({"0": GroupDecision((4, 0, 4, 4, 0, 4)), "2": GroupDecision((4, 4, 4))},
                    layers={"0": LayerDecision(sparsity)})
    q = apply_policy(model, graph, policy, example)
    calibrate_activations(q, [(torch.randn(8, per), None)])
    path = tmp_path / "wide.zbit"
    assert save_zbit(q, graph, policy, path) == os.path.getsize(path) == estimate_bytes(graph, policy)
    loaded = load(path, torch.nn.Sequential(torch.nn.Linear(per, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)))
    x = torch.randn(4, per)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_load_inside_no_grad_and_inference_mode(tmp_path, mode):
    _model, graph, policy, q = applied("depthwise", 0, 8)
    save_zbit(q, graph, policy, tmp_path / "m.zbit")
    with getattr(torch, mode)():
        loaded = load(tmp_path / "m.zbit", TINY_MODELS["depthwise"]())
        x = torch.randn(4, 1, 8, 8)
        assert torch.equal(loaded(x), q(x))


def test_non_finite_weights_never_reach_a_file(tmp_path):
    _model, graph, policy, q = applied("plain", 0, 8)
    with torch.no_grad():
        q.get_submodule("features.1.0").layer.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'features.1.0'.*not finite"):
        save_zbit(q, graph, policy, tmp_path / "m.zbit")
    assert not (tmp_path / "m.zbit").exists()


def test_model_code_reading_layer_attributes_runs_quantized_and_loaded(tmp_path):
    class ReadsAttributes(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
            self.fc = torch.nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert self.conv.stride == (1, 1) and self.fc.in_features == self.conv.out_channels
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    model = ReadsAttributes().eval()
    graph = analyse(model, EXAMPLE)
    policy = Policy({"conv": GroupDecision((4, 0, 8, 8, 0, 2)), "fc": GroupDecision((8,) * 4)})
    q = apply_policy(model, graph, policy, EXAMPLE)
    calibrate_activations(q, [(torch.randn(8, 1, 8, 8), None)])
    save_zbit(q, graph, policy, tmp_path / "m.zbit")
    loaded = load(tmp_path / "m.zbit", ReadsAttributes())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert isinstance(loaded.conv, torch.nn.Conv2d) and loaded.conv.out_channels == 4


@pytest.mark.parametrize("k", range(0, 18))
def test_position_codes_of_every_width_round_trip(k):
    """Per-channel weight counts around each power of two: count and index widths 1 to 18 bits, both codes."""
    from zerobit.export.layout import decode_positions, encode_positions, position_bytes

    rng = np.random.default_rng(k)
    for per in {max(1, 2**k - 1), 2**k, 2**k + 1}:
        channels = max(1, min(5, 300_000 // per))
        for density in (0.002, 0.5):
            mask = (rng.random((channels, per)) < density).astype(np.int64)
            code = encode_positions(mask)
            assert len(code) == position_bytes(channels, per, int(mask.sum()))
            assert np.array_equal(decode_positions(code, channels, per, int(mask.sum())), mask)


def test_file_size_is_computed_without_building_the_file() -> None:
    """estimate_bytes counts bytes instead of writing a file: equal to safetensors' own writer, for any blobs."""
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float16, torch.int16, torch.uint8]
    names = ["codes", "scales", "biases", "floats", "pos", "bits", "act", "ldec", "x.h.0.ln_1.weight", "x.é"]
    for trial in range(200):
        picked = [n for n in names if torch.rand(1, generator=g) < 0.5] or ["codes"]
        sizes = {n: (dtypes[int(torch.randint(4, (1,), generator=g))], int(torch.randint(1, 10 ** int(
            torch.randint(1, 6, (1,), generator=g)), (1,), generator=g))) for n in picked}
        meta = {"format": "zbit", "groups": '[["a",3],["b\\n\\"",4]]', "crc32": "00000000", "n": str(trial)}
        written = save({n: torch.zeros(k, dtype=dt) for n, (dt, k) in sizes.items()}, metadata=meta)
        assert safetensors_bytes(meta, sizes) == len(written), sizes


def test_version_2_files_decode_their_biases_as_stored(tmp_path):
    """Version 3 rounds the biases behind quantized inputs to the accumulator's grid, as the model that was
    measured does; a version-2 file (written before) still loads to the model it measured: biases as stored."""
    from safetensors.numpy import save_file

    from zerobit.export.container import checksum, read_container
    from zerobit.quant.modules import grid_bias

    _model, graph, _policy, _q = applied("plain", 0, 8)
    policy = Policy({n: GroupDecision(tuple(4 if i % 3 else 0 for i in range(g.channels)) if g.prunable
                                      else (6,) * g.channels) for n, g in graph.groups.items()}, 8)
    q = apply_policy(TINY_MODELS["plain"]().eval(), graph, policy, EXAMPLE)
    calibrate_activations(q, [(torch.randn(32, 1, 8, 8), None)])
    q.eval()
    save_zbit(q, graph, policy, tmp_path / "v3.zbit")
    meta, arrays = read_container(tmp_path / "v3.zbit")
    assert meta["version"] == FORMAT_VERSION
    meta["version"] = "2"
    meta["crc32"] = f"{checksum(meta, arrays):08x}"
    save_file(arrays, str(tmp_path / "v2.zbit"), metadata=meta)
    new, old = load(tmp_path / "v3.zbit", TINY_MODELS["plain"]()), load(tmp_path / "v2.zbit", TINY_MODELS["plain"]())
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(new(x), q(x))
    stored = torch.from_numpy(arrays["biases"]).float()
    old_biases = torch.cat([m.bias.detach() for m in old.modules() if getattr(m, "bias", None) is not None
                            and isinstance(m, torch.nn.Conv2d | torch.nn.Linear)])
    assert torch.equal(old_biases, stored)
    codes: dict = {}
    decode(tmp_path / "v3.zbit", TINY_MODELS["plain"](), layer_codes=codes)
    expected = grid_bias(old.fc.bias.detach(), new.fc.input_quant.scale, codes["fc"].scale16)
    assert torch.equal(new.fc.bias.detach(), expected) and not torch.equal(new.fc.bias, old.fc.bias)
