import numpy as np
import pytest

from exporters.errors import ShapeError, UsageError
from exporters.spec import Axis, ComponentSpec, Dim, ShapeRequest, TensorSpec, iter_points, select_points


def unet_like() -> ComponentSpec:
    b, h, w = Axis("batch"), Axis("height"), Axis("width")
    return ComponentSpec(
        "unet",
        (TensorSpec("sample", "float32", (b, 4, h, w)), TensorSpec("timestep", "float32", (b,), (0, 1000))),
        (TensorSpec("out_sample", "float32", (b, 4, h, w)),),
        (Dim("batch", 1, 2, 4), Dim("height", 16, 32, 64, 8), Dim("width", 16, 32, 64, 8)),
    )


def test_dim_rejects_bad_ranges():
    with pytest.raises(ShapeError, match="min <= opt <= max"):
        Dim("height", 64, 32, 128)
    with pytest.raises(ShapeError, match="multiple of 8"):
        Dim("height", 12, 32, 64, multiple_of=8)


def test_check_feed_accepts_a_valid_feed_and_returns_dims():
    spec = unet_like()
    feed = {"sample": np.zeros((3, 4, 24, 40), np.float32), "timestep": np.zeros(3, np.float32)}
    assert spec.check_feed(feed) == {"batch": 3, "height": 24, "width": 40}


@pytest.mark.parametrize(
    "feed, message",
    [
        ({"sample": np.zeros((1, 4, 16, 16), np.float32)}, "missing"),
        ({"sample": np.zeros((1, 4, 16, 16), np.float64), "timestep": np.zeros(1, np.float32)}, "dtype"),
        ({"sample": np.zeros((1, 4, 16), np.float32), "timestep": np.zeros(1, np.float32)}, "rank"),
        ({"sample": np.zeros((1, 3, 16, 16), np.float32), "timestep": np.zeros(1, np.float32)}, "must be 4"),
        ({"sample": np.zeros((1, 4, 20, 16), np.float32), "timestep": np.zeros(1, np.float32)}, "multiple of 8"),
        ({"sample": np.zeros((1, 4, 128, 16), np.float32), "timestep": np.zeros(1, np.float32)}, "outside"),
        ({"sample": np.zeros((2, 4, 16, 16), np.float32), "timestep": np.zeros(1, np.float32)}, "another input"),
    ],
)
def test_check_feed_names_the_problem(feed, message):
    with pytest.raises(ShapeError, match=message):
        unet_like().check_feed(feed)


def test_profile_and_shapes_follow_the_dims():
    spec = unet_like()
    prof = spec.profile()
    assert prof["sample"] == {"min": (1, 4, 16, 16), "opt": (2, 4, 32, 32), "max": (4, 4, 64, 64)}
    assert prof["timestep"]["max"] == (4,)


def test_scaled_axes_and_json_round_trip():
    spec = ComponentSpec(
        "vae_decoder",
        (TensorSpec("latent_sample", "float32", (Axis("batch"), 4, Axis("height"), Axis("width"))),),
        (TensorSpec("sample", "float32", (Axis("batch"), 3, Axis("height", 8), Axis("width", 8))),),
        (Dim("batch", 1, 1, 2), Dim("height", 8, 64, 128, 8), Dim("width", 8, 64, 128, 8)),
    )
    assert spec.output_shapes("max")["sample"] == (2, 3, 1024, 1024)
    assert ComponentSpec.from_json(spec.to_json()) == spec


def test_points_cover_min_opt_max_nonsquare_and_batch():
    points = dict(iter_points(unet_like()))
    assert set(points) == {"min", "opt", "max", "nonsquare", "batch"}
    assert points["nonsquare"]["height"] != points["nonsquare"]["width"]
    assert points["batch"]["batch"] > 1


def test_select_points_all_or_opt_only():
    spec = unet_like()
    assert select_points(spec, "all") == list(iter_points(spec))
    assert select_points(spec, "opt") == [("opt", spec.dim_values("opt"))]
    with pytest.raises(UsageError, match="unknown reference points"):
        select_points(spec, "max")


def test_restrict_stays_inside_the_spec():
    spec = unet_like()
    assert spec.restrict(height=(16, 16, 32)).dim("height").max == 32
    with pytest.raises(ShapeError, match="outside"):
        spec.restrict(height=(16, 32, 128))


@pytest.mark.parametrize("text, expected", [("512", (512, 512, 512)), ("256:512:768", (256, 512, 768))])
def test_parse_range(text, expected):
    assert ShapeRequest.parse_range(text, "size") == expected


@pytest.mark.parametrize("text", ["a", "1:2", "768:512:1024", "0"])
def test_parse_range_rejects(text):
    with pytest.raises(ShapeError):
        ShapeRequest.parse_range(text, "size")


def test_trace_values_never_put_a_multiple_symbol_at_one():
    """torch.export specialises a symbol traced at 1: a latent of 8 in multiples of 8 (tiny-shapes'
    default) is traced at 16, a batch of 1 at 2, and opt stays where it is already >= 2 multiples."""
    from exporters.inputs import trace_values

    b, h, w = Axis("batch"), Axis("height"), Axis("width")
    spec = ComponentSpec("unet", (TensorSpec("sample", "float32", (b, 4, h, w)),),
                         (TensorSpec("out_sample", "float32", (b, 4, h, w)),),
                         (Dim("batch", 1, 1, 4), Dim("height", 8, 8, 16, 8), Dim("width", 16, 32, 64, 8)))
    assert trace_values(spec) == {"batch": 2, "height": 16, "width": 32}
