"""A real sweep: a trained residual model on scikit-learn's digits, each run a task of a real local Ray instance;
then started again, it redoes only what was not finished."""

from __future__ import annotations

import json

import pytest
from tiny_models import EXAMPLE

from zerobit.cli import main, split_budgets
from zerobit.export.runtime import read_zbit
from zerobit.sweeps import SweepRun, sweep

pytestmark = pytest.mark.slow
EPOCHS = 2.0


def _sweep(out, budgets, model, digits, **kw):
    return sweep(budgets, ["uniform"], out, model=model, example_inputs=EXAMPLE, train_data=digits.train,
                 eval_data=digits.val, test_data=digits.test, data="digits", finetune_epochs=EPOCHS,
                 progress=False, **({"report": False} | kw))


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory, trained_residual, digits):
    out = tmp_path_factory.mktemp("sweep")
    return out, _sweep(out, ["1/4", "1/8", "100B"], trained_residual, digits, ray_address="auto", report=True)


def test_each_run_is_a_ray_task_and_writes_its_file(swept):
    out, summary = swept
    assert summary["mode"] == "ray" and [r["name"] for r in summary["runs"]] == [
        "uniform@1_4", "uniform@1_8", "uniform@100B"]
    done = [r for r in summary["runs"] if r["status"] == "done"]
    assert len(done) == 2
    for r in done:
        result = json.loads((out / r["dir"] / "result.json").read_text())
        assert result["budget_text"] == r["budget"] and result["finetune_epochs"] == EPOCHS
        zbit = out / r["dir"] / "model.zbit"
        assert zbit.stat().st_size == result["file_bytes"] <= result["budget_limit"]
        assert read_zbit(zbit) is not None and result["accuracy"] > 0.5
    ratio = {r["budget"]: json.loads((out / r["dir"] / "result.json").read_text())["ratio"] for r in done}
    assert ratio["1/8"] >= 8 > ratio["1/4"] >= 4
    # an impossible budget fails alone, with its reason, and the others still ran
    failed = summary["runs"][2]
    assert failed["status"] == "failed" and "100" in failed["error"] and "budget" in failed["error"].lower()
    assert json.loads((out / "sweep.json").read_text())["runs"] == summary["runs"]
    html = (out / "report.html").read_text()  # the sweep ends with its report
    assert summary["report"] == str(out / "report.html") and "uniform@1_8" in html
    assert (out / "figures" / "pareto_bytes.png").stat().st_size > 1000


def test_a_started_again_sweep_redoes_only_what_is_not_finished(swept, trained_residual, digits):
    out, first = swept
    kept = out / "runs" / "uniform@1_4" / "result.json"
    lost = out / "runs" / "uniform@1_8" / "result.json"
    before, accuracy = kept.stat().st_mtime_ns, json.loads(lost.read_text())["accuracy"]
    lost.unlink()  # as if the sweep had been killed during this run
    again = _sweep(out, ["1/4", "1/8"], trained_residual, digits)  # here, without Ray
    assert [r["status"] for r in again["runs"]] == ["done", "done"] and again["mode"] == "local"
    assert kept.stat().st_mtime_ns == before  # the finished run was not redone
    assert abs(json.loads(lost.read_text())["accuracy"] - accuracy) < 0.03  # redone here, under the same seed
    # a finished run is reused only under the same settings: another fine-tune budget redoes it
    other = sweep(["1/4"], ["uniform"], out, model=trained_residual, example_inputs=EXAMPLE,
                  train_data=digits.train, eval_data=digits.val, data="digits", finetune_epochs=1.0,
                  progress=False, report=False)
    assert other["runs"][0]["status"] == "done" and kept.stat().st_mtime_ns != before
    assert json.loads(kept.read_text())["sweep_key"]["finetune_epochs"] == 1.0
    assert SweepRun("uniform", "bops=1/64").name == "uniform@bops=1_64"


def test_an_ajpq_run_keeps_its_search_state_in_its_folder(tmp_path, trained_residual, digits):
    options = {"ajpq": {"episodes": 6, "warmup": 2, "rerank": 0, "proxy.samples": 300, "proxy.recovery_batches": 4}}
    summary = sweep(["1/4"], ["ajpq"], tmp_path, model=trained_residual, example_inputs=EXAMPLE,
                    train_data=digits.train, eval_data=digits.val, data="digits", finetune_epochs=1.0,
                    options=options, progress=False)
    run = tmp_path / summary["runs"][0]["dir"]
    assert summary["runs"][0]["status"] == "done", summary["runs"][0].get("error")
    assert (run / "ajpq.state").exists()  # what a killed sweep's AJPQ search resumes from
    result = json.loads((run / "result.json").read_text())
    assert len(result["info"]["rewards"]) == 6 and result["file_bytes"] <= result["budget_limit"]
    html = (tmp_path / "report.html").read_text()
    assert "ajpq" in html and (tmp_path / "figures" / "ajpq_rewards.png").exists()


def test_bad_sweep_arguments_fail_before_any_run(tmp_path, capsys):
    with pytest.raises(ValueError, match="budget"):
        sweep(["1/32", "lots"], ["uniform"], tmp_path, progress=False)
    with pytest.raises(ValueError, match="strategy"):
        sweep(["1/32"], ["nope"], tmp_path, progress=False)
    assert main(["sweep", "--budgets", "1/32", "--strategies", "uniform", "--option", "episodes=3",
                 "--out", str(tmp_path)]) == 2
    assert "STRATEGY:KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_budget_lists_keep_a_latency_budgets_settings():
    assert split_budgets("1/16, 1/32,latency=1/4,batch=64,threads=2,bops=1/64") == [
        "1/16", "1/32", "latency=1/4,batch=64,threads=2", "bops=1/64"]
