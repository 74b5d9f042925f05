"""A longer fuzz run of the .zbit reader than the test suite's: every damaged file must load to exactly the model
written or raise ZbitFormatError — no other exception, no hang, no memory beyond the model's own.

Files: the zoo ResNet-20 (pretrained, a mixed policy with sparse and codebook layers, calibrated on
Fashion-MNIST) and the tiny plain test model. Mutations: bit flips, truncation, header edits, metadata edits
(with and without a recomputed checksum), tensor edits with a recomputed checksum. Results go to
bench/results/fuzz_zbit.json and a section of BENCHMARKS.md.

    python bench/fuzz_zbit.py --trials 3000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit import zoo  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.data.loaders import Batches  # noqa: E402
from zerobit.export.container import ZbitFormatError, checksum, read_container, write_container  # noqa: E402
from zerobit.export.runtime import load, save_zbit  # noqa: E402
from zerobit.graph import analyse  # noqa: E402
from zerobit.policy import GroupDecision, LayerDecision, Policy  # noqa: E402
from zerobit.quant import apply_policy  # noqa: E402
from zerobit.train.calibrate import calibrate_activations  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fuzz_zbit.json"
KINDS = ("bit flips", "truncation", "header edit", "metadata edit", "metadata edit, resealed",
         "tensor edit, resealed")


def resnet_file(path: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    """Write a ResNet-20 file with every feature a file can hold; returns (fresh model builder input, x)."""
    model = zoo.load_pretrained("resnet20")
    x = zoo.example_input("resnet20")
    graph = analyse(model, x)
    gen = torch.Generator().manual_seed(0)
    groups = {}
    for name, g in graph.groups.items():
        bits = [2, 3, 4, 5, 6, 8, 32][int(torch.randint(0, 7, (1,), generator=gen))]
        keep = g.channels if not g.prunable else max(1, int(g.channels * 0.7))
        groups[name] = GroupDecision((bits,) * keep + (0,) * (g.channels - keep))
    layers = {}
    for i, (name, layer) in enumerate(graph.layers.items()):
        if groups[layer.out_group].bits[0] != 32 and i % 3:
            layers[name] = LayerDecision([0.3, 0.95][i % 2], codebook=i % 4 == 1)
    policy = Policy(groups, 8, layers=layers)
    q = apply_policy(model, graph, policy, x)
    calibrate_activations(q, Batches(get_splits("fashion-mnist").train, 128, shuffle=True, seed=0), 2)
    save_zbit(q, graph, policy, path)
    probe = torch.randn(32, 1, 28, 28, generator=gen)
    with torch.no_grad():
        return q.eval()(probe), probe


def mutate(data: bytes, kind: str, rng: np.random.Generator, tmp: Path) -> bytes:
    if kind == "bit flips":
        out = bytearray(data)
        for _ in range(int(rng.integers(1, 5))):
            out[int(rng.integers(len(out)))] ^= 1 << int(rng.integers(8))
        return bytes(out)
    if kind == "truncation":
        return data[: int(rng.integers(len(data)))]
    src = tmp / "src.zbit"
    src.write_bytes(data)
    meta, arrays = read_container(src)
    values = [None, -1, 0, 1, 2**40, "x", "", [], {}, [1, 2], "[" * 5000, 1.5, True]
    if kind == "header edit":
        key = sorted(arrays)[int(rng.integers(len(arrays)))]
        field = ["dtype", "shape", "data_offsets", None][int(rng.integers(4))]

        def edit(header: dict) -> None:
            value = values[int(rng.integers(len(values)))]
            if field is None:
                header[key] = value
            else:
                header[key][field] = value

        return write_container(meta, arrays, edit)
    if kind.startswith("metadata edit"):
        field = sorted(meta)[int(rng.integers(len(meta)))]
        meta[field] = json.dumps(values[int(rng.integers(len(values)))])[:200] if rng.random() < 0.5 else \
            meta[field][: int(rng.integers(len(meta[field]) + 1))] + chr(int(rng.integers(32, 127)))
    else:
        key = sorted(arrays)[int(rng.integers(len(arrays)))]
        a = arrays[key].copy()
        how = int(rng.integers(5))
        if how == 0 and a.dtype.kind == "f":
            a[int(rng.integers(a.size))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
        elif how == 1:
            a = np.concatenate([a, a[:1]])
        elif how == 2:
            a = a[:-1]
        elif how == 3:
            a = a.astype(np.float32 if a.dtype != np.float32 else np.float16)
        else:
            a = rng.integers(0, 256, a.nbytes, dtype=np.uint8).view(a.dtype)
        arrays[key] = a
    if kind.endswith("resealed"):
        meta["crc32"] = f"{checksum(meta, arrays):08x}"
    return write_container(meta, arrays)


def fuzz(name: str, data: bytes, build, expected: torch.Tensor, probe: torch.Tensor, trials: int,
         seed: int) -> dict:
    rng = np.random.default_rng(seed)
    outcomes: dict[str, Counter] = {k: Counter() for k in KINDS}
    worst = {"seconds": 0.0, "case": ""}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        path = tmp / "damaged.zbit"
        for i in range(trials):
            kind = KINDS[i % len(KINDS)]
            path.write_bytes(mutate(data, kind, rng, tmp))
            start = time.perf_counter()
            try:
                model = load(path, build())
                with torch.no_grad():
                    result = "same model" if torch.equal(model(probe), expected) else "another model"
            except ZbitFormatError:
                result = "ZbitFormatError"
            except Exception as exc:  # noqa: BLE001 - this is what the run counts
                result = f"{type(exc).__name__}"
                print(f"  {kind}: {type(exc).__name__}: {str(exc)[:200]}")
            seconds = time.perf_counter() - start
            if seconds > worst["seconds"]:
                worst = {"seconds": round(seconds, 3), "case": f"{kind} → {result}"}
            outcomes[kind][result] += 1
    table = {k: dict(v) for k, v in outcomes.items()}
    print(f"{name}: {json.dumps(table)}; slowest load {worst}")
    return {"model": name, "file_bytes": len(data), "trials": trials, "outcomes": table, "slowest": worst}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3000, help="per model file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import EXAMPLE, TINY_MODELS

    runs = []
    with tempfile.TemporaryDirectory() as tmpdir:
        path = Path(tmpdir) / "resnet20.zbit"
        expected, probe = resnet_file(path)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runs.append(fuzz("resnet20", path.read_bytes(), lambda: zoo.build("resnet20"), expected, probe,
                         args.trials, args.seed))
        torch.manual_seed(0)
        tiny = TINY_MODELS["plain"]().eval()
        graph = analyse(tiny, EXAMPLE)
        policy = Policy({n: GroupDecision((4,) * g.channels) for n, g in graph.groups.items()},
                        layers={"features.1.0": LayerDecision(0.97)})
        q = apply_policy(tiny, graph, policy, EXAMPLE)
        calibrate_activations(q, [(torch.randn(32, 1, 8, 8), None)])
        save_zbit(q, graph, policy, path)
        probe8 = torch.randn(16, 1, 8, 8)
        with torch.no_grad():
            expected8 = q.eval()(probe8)
        runs.append(fuzz("tiny plain", path.read_bytes(), lambda: TINY_MODELS["plain"](), expected8, probe8,
                         args.trials, args.seed + 1))
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = {"runs": runs, "peak rss growth MB during fuzzing": round((rss1 - rss0) / 1024, 1),
               "seed": args.seed, "device": "cpu"}
    print(f"peak RSS grew by {summary['peak rss growth MB during fuzzing']} MB while fuzzing")
    RESULTS.write_text(json.dumps(summary, indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    allowed = {kind: {"ZbitFormatError", "same model"} | ({"another model"} if "resealed" in kind else set())
               for kind in KINDS}  # only a forger who recomputed the checksum can make a consistent other model
    bad = [(r["model"], k, o) for r in runs for k, v in r["outcomes"].items() for o in v if o not in allowed[k]]
    print("every outcome allowed" if not bad else f"NOT ALLOWED: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
