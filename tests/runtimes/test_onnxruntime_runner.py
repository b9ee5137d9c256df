"""ONNX Runtime runner: it reports the execution providers the session really runs on, and refuses
a session that dropped one it was asked for (ONNX Runtime itself only warns and falls back)."""
from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from exporters.errors import EXIT_BACKEND_UNAVAILABLE, BackendUnavailable
from exporters.tree import read_tree_info
from runtimes.onnxruntime_runner import OnnxRuntimeRunner

MISSING = "CUDAExecutionProvider"


@pytest.fixture(autouse=True)
def _cpu_only():
    if MISSING in ort.get_available_providers():
        pytest.skip(f"this onnxruntime offers {MISSING}; the test needs a provider that cannot start")


def _runner(out, providers=None) -> OnnxRuntimeRunner:
    _, specs = read_tree_info(out / "onnx")
    return OnnxRuntimeRunner(specs["text_encoder"], out / "onnx" / "text_encoder" / "model.onnx", providers=providers)


def test_describe_reports_the_active_providers(exported):
    runner = _runner(exported("tiny-sd"))
    with runner:
        assert runner.active_providers == runner.session.get_providers() == ["CPUExecutionProvider"]
        assert runner.describe()["providers"] == "CPUExecutionProvider"
        # the session options it really runs with, as recorded in verdicts and benchmarks
        assert runner.describe()["graph_optimization"] == runner.session.get_session_options().graph_optimization_level.name
        assert runner.describe()["intra_op_threads"] == "default"
    with _runner_threads(exported("tiny-sd"), 1) as runner:
        assert runner.describe()["intra_op_threads"] == "1"


def _runner_threads(out, threads: int) -> OnnxRuntimeRunner:
    _, specs = read_tree_info(out / "onnx")
    return OnnxRuntimeRunner(specs["text_encoder"], out / "onnx" / "text_encoder" / "model.onnx", threads=threads)


def test_a_provider_that_did_not_start_is_an_error(exported):
    """ONNX Runtime would run this on CPU with a warning; the runner says what happened instead."""
    runner = _runner(exported("tiny-sd"), providers=[(MISSING, {"device_id": 0}), "CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable) as err:
        runner.activate()
    assert MISSING in str(err.value) and "runs on CPUExecutionProvider" in str(err.value)
    assert err.value.fix and err.value.exit_code == EXIT_BACKEND_UNAVAILABLE
    assert runner.session is None and not runner.active


def test_validate_asking_for_an_unavailable_provider_fails_with_its_exit_code(copy_export, capsys):
    from diffprism.cli import main

    out = copy_export("tiny-sd")
    code = main(["--json", "validate", str(out), "--target", "onnxruntime", "--components", "text_encoder",
                 "--option", f'providers=["{MISSING}"]'])
    assert code == EXIT_BACKEND_UNAVAILABLE
    captured = capsys.readouterr()
    assert MISSING in captured.out + captured.err
    # no verdict recorded: nothing ran
    assert "onnxruntime-fp32" not in json.loads((out / "manifest.json").read_text()).get("validation", {})
