"""Streamed export (exporters.streaming): same bytes and outputs as the plain export, no weights held."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters import reference, streaming
from exporters.export import export_component, export_pipeline, plan_specs
from exporters.inputs import make_feed
from exporters.onnx_writer import DATA_NAME, ONNX_NAME


def _same_files(a, b) -> None:
    for name in (ONNX_NAME, DATA_NAME):
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{a.name}/{name} differs"


def _same_outputs(a, b, spec) -> None:
    feed = make_feed(spec, "opt", seed=7)
    out_a = ort.InferenceSession(str(a / ONNX_NAME), providers=["CPUExecutionProvider"]).run(None, feed)
    out_b = ort.InferenceSession(str(b / ONNX_NAME), providers=["CPUExecutionProvider"]).run(None, feed)
    for x, y in zip(out_a, out_b):
        assert np.array_equal(x, y)


def test_streamed_pipeline_is_byte_identical_to_plain(exported, pipeline, tmp_path):
    """tiny-sd's text encoder and VAE encoder, weights from the in-memory state dict: same files, outputs,
    references. The UNet and VAE decoder stream from a folder in the safetensors test below, and the
    in-memory UNet in the SDXL one."""
    plain = exported("tiny-sd")
    result = export_pipeline(pipeline("tiny-sd"), tmp_path, components=["text_encoder", "vae_encoder"], streaming=True)
    assert set(result.specs) == {"text_encoder", "vae_encoder"}
    for name, spec in result.specs.items():
        _same_files(plain / "onnx" / name, tmp_path / "onnx" / name)
        _same_outputs(plain / "onnx" / name, tmp_path / "onnx" / name, spec)
        assert (plain / "reference" / f"{name}.npz").read_bytes() == (tmp_path / "reference" / f"{name}.npz").read_bytes()


def test_streamed_unet_is_byte_identical_to_plain(exported, pipeline, tmp_path):
    """The UNet has the folded (transposed) weights; SDXL's adds linear projections (as SD2's) and text_time."""
    preset = "tiny-sdxl"
    pipe = pipeline(preset)
    _, specs = plan_specs(pipe, ["unet"])
    export_component(pipe, specs["unet"], tmp_path / "unet", 18, streaming=True)
    plain = exported(preset) / "onnx" / "unet"
    _same_files(plain, tmp_path / "unet")
    _same_outputs(plain, tmp_path / "unet", specs["unet"])


@pytest.fixture(scope="module")
def saved_tiny_sd(pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd-saved")
    pipeline("tiny-sd").save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_export_from_safetensors_never_materialises_weights(exported, saved_tiny_sd, tmp_path, monkeypatch):
    """From a saved folder the models are built on meta, traced on fake tensors, weights streamed."""
    pipe = streaming.empty_pipeline(saved_tiny_sd)
    assert streaming.has_no_storage(pipe.unet) and streaming.has_no_storage(pipe.vae)
    traced = []
    real_trace = streaming.trace

    def checked_trace(wrapper, spec, fake_mode=None):
        # Every parameter seen by the trace is a tensor without storage.
        assert fake_mode is not None and streaming.has_no_storage(wrapper)
        traced.append(spec.name)
        return real_trace(wrapper, spec, fake_mode=fake_mode)

    monkeypatch.setattr(streaming, "trace", checked_trace)
    result = export_pipeline(pipe, tmp_path, components=["unet", "vae_decoder"])
    assert traced == ["unet", "vae_decoder"]
    assert streaming.has_no_storage(pipe.unet) and streaming.has_no_storage(pipe.vae)
    plain = exported("tiny-sd")
    for name in ("unet", "vae_decoder"):
        _same_files(plain / "onnx" / name, tmp_path / "onnx" / name)
        # References ran PyTorch with weights read layer by layer: same values as the plain run.
        want = reference.load(plain / "reference" / f"{name}.npz")
        got = reference.load(tmp_path / "reference" / f"{name}.npz")
        for point, case in want.items():
            for out, arr in case["outputs"].items():
                np.testing.assert_array_equal(got[point]["outputs"][out], arr)
    assert set(result.specs) == {"unet", "vae_decoder"}


def test_streamed_export_is_the_default_for_a_folder(exported, saved_tiny_sd, tmp_path, monkeypatch):
    """export_job on a folder streams by default (same bytes as the plain export); when streaming is not
    possible it falls back to the plain export and records which one ran."""
    from diffprism import manifest
    from diffprism.jobs import export_job

    plain = exported("tiny-sd")
    export_job(str(saved_tiny_sd), tmp_path / "a", components=["text_encoder"])
    assert manifest.load(tmp_path / "a")["stages"]["export"]["streamed"] is True
    _same_files(plain / "onnx" / "text_encoder", tmp_path / "a" / "onnx" / "text_encoder")

    def unsupported(module, folder):
        raise streaming.StreamingUnsupported("planted", "export without --streaming")

    monkeypatch.setattr(streaming, "source_for", unsupported)
    export_job(str(saved_tiny_sd), tmp_path / "b", components=["text_encoder"])
    assert manifest.load(tmp_path / "b")["stages"]["export"]["streamed"] is False
    _same_files(plain / "onnx" / "text_encoder", tmp_path / "b" / "onnx" / "text_encoder")


def test_safetensors_source_reads_and_converts(saved_tiny_sd):
    source = streaming.SafetensorsSource.from_folder(saved_tiny_sd / "unet")
    key = "conv_in.weight"
    want = streaming.StateDictSource(
        streaming.empty_pipeline(saved_tiny_sd).unet.state_dict()).keys()  # same key set as the model
    assert set(source.keys()) == set(want)
    arr = source.read(key, np.dtype(np.float32))
    assert arr.flags.c_contiguous and arr.dtype == np.float32
    half = source.read(key, np.dtype(np.float16))
    np.testing.assert_array_equal(half, arr.astype(np.float16))


def test_stand_ins_cost_no_memory_and_views_map_back_to_them():
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    before = proc.memory_info().rss
    binder = streaming._Binder(None, {}, {})
    arrays = []
    for i in range(32):  # 32 x 16 MiB
        arr = streaming._stand_in((1024, 4096), np.dtype(np.float32))
        arr.reshape(-1)[0] = arr.reshape(-1)[-1] = 1  # what prepare writes
        binder._add_origin(streaming._Origin(f"w{i}", arr.dtype, arr))
        arrays.append(arr)
    grown = proc.memory_info().rss - before
    assert grown < 0.05 * 32 * 16 * 2**20, f"stand-ins took {grown / 2**20:.0f} MiB"
    assert not arrays[3][1:-1].any()  # zero-filled
    # The optimizer folds a Transpose of a weight as a view; bind finds the weight by address.
    view = arrays[5].T[1:]
    assert binder._origin_of(view).key == "w5"
    assert binder._origin_of(arrays[0]).key == "w0"
    assert binder._origin_of(np.zeros((1024, 4096), np.float32)) is None


def test_missing_weight_falls_back_to_plain_export(exported, pipeline, tmp_path, monkeypatch, caplog):
    pipe = pipeline("tiny-sd")
    _, specs = plan_specs(pipe, ["text_encoder"])

    def partial_source(module, folder):
        sd = dict(module.state_dict())
        sd.pop(next(iter(sd)))
        return streaming.StateDictSource(sd)

    monkeypatch.setattr(streaming, "source_for", partial_source)
    with caplog.at_level(logging.WARNING):
        export_component(pipe, specs["text_encoder"], tmp_path / "te", 18, streaming=True)
    assert "using the plain export" in caplog.text and "is not in the source" in caplog.text
    _same_files(exported("tiny-sd") / "onnx" / "text_encoder", tmp_path / "te")


def test_map_weights_to_float16_one_tensor_at_a_time(exported, tmp_path):
    src = exported("tiny-sd") / "onnx" / "unet"
    streaming.map_weights(src, tmp_path / "fp16", streaming.to_float16)
    before = onnx.load(str(src / ONNX_NAME))
    after = onnx.load(str(tmp_path / "fp16" / ONNX_NAME))
    b = {t.name: onnx.numpy_helper.to_array(t) for t in before.graph.initializer}
    a = {t.name: onnx.numpy_helper.to_array(t) for t in after.graph.initializer}
    assert a.keys() == b.keys()
    converted = [n for n in b if b[n].dtype == np.float32]
    assert converted
    for n in b:
        want = b[n].astype(np.float16) if b[n].dtype == np.float32 else b[n]
        assert a[n].dtype == want.dtype and np.array_equal(a[n], want)


@pytest.mark.parametrize("preset, component", [("tiny-sd3", "transformer"), ("tiny-flux", "transformer"),
                                               ("tiny-flux", "text_encoder_2")])
def test_streamed_transformer_and_t5_are_byte_identical_to_plain(exported, pipeline, tmp_path, preset, component):
    """SD3's MMDiT, Flux's transformer (rotary ids, guidance embedding) and the T5 encoder."""
    pipe = pipeline(preset)
    _, specs = plan_specs(pipe, [component])
    export_component(pipe, specs[component], tmp_path / component, 18, streaming=True)
    plain = exported(preset) / "onnx" / component
    _same_files(plain, tmp_path / component)
    _same_outputs(plain, tmp_path / component, specs[component])


def test_t5_from_safetensors_streams_its_tied_embedding(exported, pipeline, tmp_path):
    """T5 saves `shared` once for the tied `encoder.embed_tokens`: the meta copy stays tied, the stream finds it."""
    folder = tmp_path / "saved"
    pipeline("tiny-flux").save_pretrained(str(folder), safe_serialization=True)
    pipe = streaming.empty_pipeline(folder)
    export_pipeline(pipe, tmp_path / "out", components=["text_encoder_2"])
    plain = exported("tiny-flux")
    _same_files(plain / "onnx" / "text_encoder_2", tmp_path / "out" / "onnx" / "text_encoder_2")
    want = reference.load(plain / "reference" / "text_encoder_2.npz")
    got = reference.load(tmp_path / "out" / "reference" / "text_encoder_2.npz")
    for point, case in want.items():
        np.testing.assert_array_equal(got[point]["outputs"]["last_hidden_state"], case["outputs"]["last_hidden_state"])
