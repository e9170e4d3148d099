"""``origin`` and ``scale`` for the display formats (GLB, OBJ, PLY, USDZ), read back from the files:
the pivot at the model's origin, the bounding box's centre or the centre of its base, and the size in
metres per model unit; the print formats keep their own placement."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from triplane_turbo.export import DISPLAY_FORMATS, encode_mesh, export_mesh
from triplane_turbo.frames import Placement, place, to_display_frame
from triplane_turbo.texturing.bake import UVTexture

from .mesh_samples import asymmetric_mesh
from .test_export import glb_accessors


@pytest.fixture(scope="module")
def mesh() -> trimesh.Trimesh:
    return asymmetric_mesh()


@pytest.fixture(scope="module")
def texture(mesh) -> UVTexture:
    """A stand-in baked texture: one UV vertex per mesh vertex, a small random image."""
    rng = np.random.default_rng(2)
    return UVTexture(np.arange(len(mesh.vertices)), np.asarray(mesh.faces),
                     rng.uniform(0, 1, (len(mesh.vertices), 2)).astype(np.float32),
                     rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


def read_positions(path, file_format: str) -> np.ndarray:
    """[V, 3] float64 vertex positions of a written file, in the file's own order."""
    if file_format == "glb":
        return glb_accessors(path)["POSITION"].astype(np.float64)
    if file_format == "usdz":
        from pxr import Usd, UsdGeom

        stage = Usd.Stage.Open(str(path))
        (points,) = [UsdGeom.Mesh(p).GetPointsAttr().Get() for p in stage.Traverse() if p.IsA(UsdGeom.Mesh)]
        return np.array(points, np.float64)
    return np.asarray(trimesh.load(path, force="mesh", process=False).vertices, np.float64)


@pytest.mark.parametrize("file_format", DISPLAY_FORMATS)
@pytest.mark.parametrize("origin", [None, "center", "bottom"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_origin_and_scale_place_the_display_formats(mesh, tmp_path, file_format, origin, scale):
    path = export_mesh(mesh, tmp_path / f"blob.{file_format}", origin=origin, scale=scale)
    points = read_positions(path, file_format)
    display = to_display_frame(mesh.vertices)
    np.testing.assert_allclose(points, place(display, Placement(origin, scale)), atol=1e-6)  # float32 files
    low, high = points.min(0), points.max(0)
    np.testing.assert_allclose(high - low, np.ptp(display, axis=0) * scale, rtol=1e-6)  # metres per unit
    if origin is None:  # the model's own origin: the display frame, scaled about it
        np.testing.assert_allclose(points, display * scale, atol=1e-6)
    elif origin == "center":
        np.testing.assert_allclose((low + high) / 2, 0.0, atol=1e-6)
    else:  # the base's centre: nothing below y = 0, centred in x and z
        assert abs(low[1]) <= 1e-7
        np.testing.assert_allclose((low[[0, 2]] + high[[0, 2]]) / 2, 0.0, atol=1e-6)
        # the top stays the top: the model's highest point (largest z) is the file's highest
        assert points[np.argmax(mesh.vertices[:, 2]), 1] == high[1]


@pytest.mark.parametrize("file_format", ["glb", "obj", "usdz"])
def test_a_textured_mesh_is_placed_the_same(mesh, texture, tmp_path, file_format):
    path = export_mesh(mesh, tmp_path / f"textured.{file_format}", texture=texture, origin="bottom", scale=0.25)
    points = read_positions(path, file_format)
    expected = place(to_display_frame(mesh.vertices), Placement("bottom", 0.25))[texture.vmapping]
    np.testing.assert_allclose(points, expected, atol=1e-6)


def test_the_print_formats_keep_their_own_placement(mesh):
    for file_format in ("stl", "3mf"):
        assert encode_mesh(mesh, file_format, origin="bottom", scale=3.0) == encode_mesh(mesh, file_format)
        assert encode_mesh(mesh, file_format, print_size=50.0) != encode_mesh(mesh, file_format)
    assert encode_mesh(mesh, "glb", print_size=50.0) == encode_mesh(mesh, "glb")


@pytest.mark.parametrize("kwargs, message", [
    ({"origin": "top"}, "origin must be one of center, bottom"),
    ({"scale": 0.0}, "scale must be a number from"),
    ({"scale": -1.0}, "scale must be a number from"),
    ({"scale": float("nan")}, "scale must be a number from"),
    ({"print_size": 0.5}, "print size must be a number from 1 to 10000"),
    ({"print_size": "100"}, "print size must be a number"),
])
def test_bad_placements_are_refused(mesh, kwargs, message):
    with pytest.raises(ValueError, match=message):
        encode_mesh(mesh, "glb", **kwargs)
