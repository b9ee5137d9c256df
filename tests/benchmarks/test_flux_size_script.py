"""benchmarks/flux_size.py: argument handling, the plan and the disk plan, on tiny-flux (nothing is exported)."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def script(load_bench):
    return load_bench("flux_size")


def test_dry_run_plans_every_step_with_its_disk(script, tmp_path, capsys):
    assert script.main(["--work", str(tmp_path / "w"), "--preset", "tiny-flux", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in plan["plan"]] == list(script.STEPS)
    weights = plan["weights_bytes"]
    assert plan["plan"][0]["disk_bytes"] == sum(weights.values())  # materialise writes the whole pipeline
    export = plan["plan"][1]
    assert export["disk_bytes"] > weights["transformer"] and "--dtype" in export["command"]
    assert export["command"][export["command"].index("--dtype") + 1] == "bf16"
    assert not (tmp_path / "w").exists()  # a dry run writes nothing


def test_bad_arguments_are_refused(script, tmp_path):
    with pytest.raises(SystemExit) as exc:
        script.parse_args(["--work", str(tmp_path), "--steps", "materialise,bogus"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        script.parse_args(["--work", str(tmp_path), "--preset", "no-such-preset"])
    assert script.main(["--work", str(tmp_path), "--preset", "tiny-flux", "--component", "unet", "--dry-run"]) == 2


def test_a_step_over_the_disk_plan_is_refused_before_it_starts(script, tmp_path):
    work = tmp_path / "w"
    assert script.main(["--work", str(work), "--preset", "tiny-flux", "--steps", "export-bf16", "--max-disk", "1k"]) == 1
    rows = json.loads((work / "results.json").read_text())["rows"]
    assert "refused" in rows[0] and not (work / "export-bf16").exists()
