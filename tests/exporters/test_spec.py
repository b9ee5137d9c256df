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


def flux_like() -> ComponentSpec:
    """Flux's transformer: packed tokens = (height / 2) * (width / 2), T5 tokens their own dim."""
    from exporters.spec import derived

    b, p, t = Axis("batch"), Axis("packed"), Axis("t5_sequence")
    height, width = Dim("height", 16, 32, 64, 2), Dim("width", 16, 32, 64, 2)
    return ComponentSpec(
        "transformer",
        (TensorSpec("hidden_states", "float32", (b, p, 64)), TensorSpec("img_ids", "int64", (p, 3), (0, 64)),
         TensorSpec("encoder_hidden_states", "float32", (b, t, 32))),
        (TensorSpec("out_hidden_states", "float32", (b, p, 64)),),
        (Dim("batch", 1, 2, 4), height, width, derived("packed", (height, width), per=2), Dim("t5_sequence", 64, 256, 512)),
    )


def test_derived_dim_follows_its_sources_in_points_profiles_and_json():
    spec = flux_like()
    packed = spec.dim("packed")
    assert (packed.min, packed.opt, packed.max) == (64, 256, 1024)
    prof = spec.profile()
    assert prof["hidden_states"] == {"min": (1, 64, 64), "opt": (2, 256, 64), "max": (4, 1024, 64)}
    assert prof["encoder_hidden_states"]["max"] == (4, 512, 32)  # the T5 sequence ranges on its own
    points = dict(iter_points(spec))
    nonsquare = points["nonsquare"]
    assert nonsquare["packed"] == (nonsquare["height"] // 2) * (nonsquare["width"] // 2) == 8 * 32
    assert spec.dim_values({"height": 64, "width": 16})["packed"] == 32 * 8
    assert ComponentSpec.from_json(spec.to_json()) == spec
    static = spec.restrict(height=(32, 32, 32), width=(48, 48, 48))
    assert (static.dim("packed").min, static.dim("packed").max) == (16 * 24, 16 * 24)


def test_derived_dim_is_checked_in_feeds():
    spec = flux_like()
    feed = {"hidden_states": np.zeros((1, 256, 64), np.float32), "img_ids": np.zeros((256, 3), np.int64),
            "encoder_hidden_states": np.zeros((1, 64, 32), np.float32)}
    assert spec.check_feed(feed)["packed"] == 256
    feed["img_ids"] = np.zeros((128, 3), np.int64)
    with pytest.raises(ShapeError, match="another input"):
        spec.check_feed(feed)
    big = {"hidden_states": np.zeros((1, 2048, 64), np.float32), "img_ids": np.zeros((2048, 3), np.int64),
           "encoder_hidden_states": np.zeros((1, 64, 32), np.float32)}
    with pytest.raises(ShapeError, match="outside"):
        spec.check_feed(big)


def test_derived_dim_needs_sources_divisible_by_its_step():
    from exporters.spec import derived

    with pytest.raises(ShapeError, match="multiple of 2"):
        derived("packed", (Dim("height", 15, 31, 63), Dim("width", 16, 32, 64, 2)), per=2)
