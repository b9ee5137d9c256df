"""Only the CLI configures output: library import chatter is hidden unless -vv asks for it."""
import logging

import pytest

from diffprism.cli import _configure_logging


@pytest.fixture
def restore_levels():
    names = ("torchao", "diffusers.quantizers.torchao", "torch.onnx")
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


def test_import_warnings_of_optional_libraries_are_hidden_by_default(restore_levels):
    _configure_logging(0)
    # torchao warns on import about CUDA kernels; diffusers' torchao quantizer about its tensor classes.
    assert not logging.getLogger("torchao.kernel.intmm").isEnabledFor(logging.WARNING)
    assert not logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").isEnabledFor(logging.WARNING)
    assert logging.getLogger("diffprism.jobs").isEnabledFor(logging.WARNING)  # our own warnings still show


def test_vv_shows_them(restore_levels):
    for n in ("torchao", "diffusers.quantizers.torchao"):
        logging.getLogger(n).setLevel(logging.NOTSET)
    _configure_logging(2)
    assert logging.getLogger("torchao.kernel.intmm").isEnabledFor(logging.WARNING)
