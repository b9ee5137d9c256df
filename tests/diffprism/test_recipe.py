"""Recipes: parsing, errors that name the key and line, --only selection, and the CI job matrix."""
import json

import pytest

from diffprism import matrix
from diffprism.cli import main
from diffprism.recipe import RecipeError, find_line, load, parse
from exporters.errors import EXIT_USAGE

BASE = """\
components = ["text_encoder"]

[source]
preset = "tiny-sd"

[[build]]
target = "onnxruntime"
"""


def test_example_recipe_parses():
    from pathlib import Path

    recipe = load(Path(__file__).parents[2] / "examples" / "tiny-sd.toml")
    ids = [b.variant.id for b in recipe.build]
    assert "onnxruntime:fp32" in ids and any(i.startswith("openvino:") for i in ids)
    assert recipe.source.preset == "tiny-sd"


def test_default_batch_is_the_clis():
    """A recipe without [shapes] batch exports what 'diffprism export' does without --batch (images per call)."""
    from diffprism.cli import build_parser
    from exporters.spec import ShapeRequest

    cli = build_parser().parse_args(["export", "tiny-sd", "--out", "x"])
    assert parse(BASE).shapes.request().batch == ShapeRequest.parse_range(cli.batch, "batch") == ShapeRequest().batch
    assert parse(BASE).shapes.batch == cli.batch  # in the stage key as the value it stands for


def test_full_recipe_fields():
    recipe = parse(BASE + """\
[[build]]
target = "openvino"
precision = "int8"
options = { }

[shapes]
batch = "1:2:4"
size = "256:512:768"

[validation]
prompts = ["a cat"]

[validation.tolerances.int8.unet]
cosine = 0.9

[publish]
url = "memory://releases/x"
""")
    assert [b.variant.id for b in recipe.build] == ["onnxruntime:fp32", "openvino:int8"]
    assert recipe.shapes.request().batch == (1, 2, 4)
    assert recipe.validation.policy().tolerance("int8", "unet").cosine == 0.9
    assert recipe.validation.policy().tolerance("int8", "vae_decoder").cosine == 0.98  # default kept
    assert recipe.publish.url == "memory://releases/x"


@pytest.mark.parametrize("extra, line, key", [
    ('[[build]]\ntarget = "openvino"\nprecison = "fp16"\n', 11, "build.1.precison"),
    ('[[build]]\ntarget = "metal"\n', 10, "build.1.target"),
    ('[validation.tolerances.fp16.unet]\nrel_l3 = 0.1\n', 10, "validation.tolerances.fp16.unet.rel_l3"),
    ('[publish]\ndestination = "x"\n', 10, "publish.destination"),
])
def test_errors_name_key_and_line(extra, line, key):
    with pytest.raises(RecipeError) as err:
        parse(BASE + "\n" + extra, "r.toml")
    assert err.value.message.startswith(f"r.toml:{line}: {key}"), err.value.message
    assert "\n" not in str(err.value)


def test_source_errors():
    with pytest.raises(RecipeError, match=r"r.toml:4: source.preset: unknown preset 'nope'"):
        parse(BASE.replace('"tiny-sd"', '"nope"'), "r.toml")
    with pytest.raises(RecipeError, match="exactly one of preset, path, hub"):
        parse(BASE.replace('preset = "tiny-sd"', 'preset = "tiny-sd"\nhub = "org/x"'), "r.toml")
    with pytest.raises(RecipeError, match="build: required key is missing"):
        parse('[source]\npreset = "tiny-sd"\n', "r.toml")


def test_bad_shape_and_syntax():
    with pytest.raises(RecipeError, match=r"r.toml:9: batch range 'x'"):
        parse(BASE + '\n[shapes]\nbatch = "x"\n', "r.toml")
    with pytest.raises(RecipeError, match="not valid TOML.*line 2"):
        parse("a = 1\nb = = 2\n", "r.toml")


def test_key_lines_handles_arrays_of_tables_and_multiline_values():
    text = 'a = [\n  "x = 1",\n]\n[[build]]\ntarget = "t"\n[build.options]\nk = 1\n[[build]]\ntarget = "u"\n'
    assert find_line(text, ("build", 0, "options", "k")) == 7
    assert find_line(text, ("build", 1, "target")) == 9
    assert find_line(text, ("x",)) is None


def test_only_selects_and_rejects():
    recipe = parse(BASE + '[[build]]\ntarget = "openvino"\nprecision = "fp16"\n')
    assert [b.variant.id for b in recipe.select(["openvino:fp16"])] == ["openvino:fp16"]
    with pytest.raises(Exception, match="--only tensorrt:fp16 is not a build"):
        recipe.select(["tensorrt:fp16"])
    with pytest.raises(RecipeError, match="listed twice"):
        parse(BASE + '[[build]]\ntarget = "onnxruntime"\n')


FOUR = """\
[source]
hub = "org/model"
revision = "0123abc"

[matrix]
tensorrt = "10.8"

[[build]]
target = "onnxruntime"

[[build]]
target = "openvino"
precision = "int8"

[[build]]
target = "tensorrt"
precision = "fp16"

[[build]]
target = "coreml"
precision = "fp16"
"""


def test_github_matrix_for_four_targets(tmp_path, capsys):
    path = tmp_path / "four.toml"
    path.write_text(FOUR)
    assert main(["plan", str(path), "--matrix", "github"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_build = {j["build"]: j for j in doc["include"]}
    assert list(by_build) == ["onnxruntime:fp32", "openvino:int8", "tensorrt:fp16", "coreml:fp16"]
    assert by_build["onnxruntime:fp32"]["runs-on"] == ["ubuntu-latest"]
    assert by_build["openvino:int8"]["runs-on"] == ["ubuntu-latest"] and not by_build["openvino:int8"]["gpu"]
    trt = by_build["tensorrt:fp16"]
    assert trt["gpu"] and trt["tensorrt"] == "10.8"
    assert trt["runs-on"] == ["self-hosted", "linux", "x64", "gpu", "tensorrt-10.8"]
    assert by_build["coreml:fp16"]["runs-on"] == ["macos-14"]
    assert {j["name"] for j in doc["include"]} == {"onnxruntime-fp32", "openvino-int8", "tensorrt-fp16", "coreml-fp16"}


def test_gitlab_matrix_and_runner_override():
    recipe = parse(FOUR.replace('precision = "int8"', 'precision = "int8"\nruns_on = ["self-hosted", "avx512"]'))
    gl = matrix.render(recipe, "gitlab")["parallel"]["matrix"]
    assert [e["BUILD"] for e in gl] == ["onnxruntime:fp32", "openvino:int8", "tensorrt:fp16", "coreml:fp16"]
    assert gl[2]["RUNNER"] == "gpu-tensorrt-10.8"
    assert matrix.jobs(recipe)[1]["runs-on"] == ["self-hosted", "avx512"]
    assert [j["build"] for j in matrix.jobs(recipe, ["coreml:fp16"])] == ["coreml:fp16"]


def test_plan_cli_rejects_bad_recipe(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(BASE + "\nbogus = 1\n")
    assert main(["--json", "plan", str(path)]) == EXIT_USAGE
    out = json.loads(capsys.readouterr().out)
    assert out["error"] == f"{path}:9: build.0.bogus: unknown key"


def test_flux_example_recipe_parses_with_a_t5_range():
    from pathlib import Path

    recipe = load(Path(__file__).parents[2] / "examples" / "tiny-flux.toml")
    assert recipe.source.preset == "tiny-flux"
    assert "transformer" in recipe.components
    assert recipe.shapes.request().t5_sequence == (64, 128, 128)


def test_flux_example_recipe_builds_and_passes_on_onnxruntime_and_openvino(tmp_path):
    """examples/tiny-flux.toml as shipped: export, ONNX Runtime and OpenVINO builds, per-component
    validation and the end-to-end image check with its prompt."""
    from pathlib import Path

    from diffprism.build import run_build

    recipe = load(Path(__file__).parents[2] / "examples" / "tiny-flux.toml")
    report = run_build(recipe, tmp_path / "tiny-flux")
    assert report.passed, report.verdicts
    assert set(report.verdicts) == {"onnxruntime-fp32", "openvino-fp32"}
    assert all(v["status"] == "passed" for v in report.verdicts.values())
    assert set(report.images) == set(report.verdicts)  # the prompt ran end to end on both


def test_dtype_and_memory_budget_reach_the_export_and_only_dtype_its_key():
    from diffprism.build import Keys

    plain = parse(BASE)
    assert plain.export_options() == {"dtype": "fp32"}
    half = parse('dtype = "bf16"\nmemory_budget = "20G"\n' + BASE)
    assert half.export_options() == {"dtype": "bf16", "memory_budget": "20G"}
    assert Keys(half).export != Keys(plain).export  # other weight bytes: another export
    budget_only = parse('memory_budget = "20G"\n' + BASE)
    assert Keys(budget_only).export == Keys(plain).export  # a machine limit, not content
    with pytest.raises(RecipeError, match=r"r.toml:1: dtype: Input should be 'fp32', 'fp16' or 'bf16'"):
        parse('dtype = "int8"\n' + BASE, "r.toml")
    with pytest.raises(RecipeError, match=r"cannot read memory size 'lots'"):
        parse('memory_budget = "lots"\n' + BASE, "r.toml")


def test_a_bf16_recipe_builds_bf16_weights_that_pass_and_a_budget_it_cannot_meet_stops_it_early(tmp_path):
    import onnx

    from diffprism.build import run_build
    from exporters.memory import MemoryBudgetError

    recipe = parse('dtype = "bf16"\n' + BASE)
    report = run_build(recipe, tmp_path / "bf16")
    assert report.passed, report.verdicts
    model = onnx.load(str(tmp_path / "bf16" / "onnx" / "text_encoder" / "model.onnx"), load_external_data=False)
    stored = {t.data_type for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert onnx.TensorProto.BFLOAT16 in stored and onnx.TensorProto.FLOAT not in stored
    with pytest.raises(MemoryBudgetError, match="memory-budget"):
        run_build(parse('memory_budget = "1M"\n' + BASE), tmp_path / "tight")
    assert not (tmp_path / "tight" / "onnx").exists()


def test_readme_release_example_parses():
    """The recipe README.md shows under 'Release example' is a valid recipe, every key documented there."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text.split("## Release example", 1)[1]
    example = re.search(r"```toml\n(.*?)```", section, re.S)[1]
    recipe = parse(example, "README.md")
    assert recipe.dtype == "fp32" and recipe.memory_budget == "20G" and recipe.reference_points == "opt"
    assert len(recipe.build) >= 4
