"""Preview images: the mesh from a fixed three-quarter view, upright, coloured by its texture."""

import numpy as np
import trimesh

from triplane_turbo.preview import BACKGROUND, render_preview


def drawn(image: np.ndarray) -> np.ndarray:
    return np.abs(image.astype(int) - BACKGROUND).max(-1) > 12


def test_a_textured_preview_matches_the_vertex_coloured_one(tiny_pipe):
    out = tiny_pipe("a chair", seed=3, mesh_resolution=96, texture_size=512)
    mesh, texture = out.meshes[0], out.textures[0]
    textured, coloured = render_preview(mesh, texture), render_preview(mesh)
    assert textured.shape == (256, 256, 3) and textured.dtype == np.uint8
    assert 0.15 < drawn(textured).mean() < 0.9 and np.array_equal(drawn(textured), drawn(coloured))
    both = drawn(textured)
    assert np.abs(textured.astype(int) - coloured)[both].mean() < 6  # the same colours, through the texture
    assert textured[both].std(0).min() > 5  # shaded and coloured, not flat
    assert np.array_equal(render_preview(mesh, texture), textured)  # deterministic


def test_the_preview_is_upright_and_framed():
    # a tall box in the model frame: z is up there (the display frame's +Y)
    tall = trimesh.creation.box([0.3, 0.3, 1.5])
    image = drawn(render_preview(tall, size=128))
    rows, cols = np.nonzero(image)
    assert np.ptp(rows) > 1.8 * np.ptp(cols)  # taller than wide on screen
    assert rows.min() > 0 and rows.max() < 127 and cols.min() > 0 and cols.max() < 127  # all of it in frame
    wide = trimesh.creation.box([1.5, 0.3, 0.3])  # along the model's x: the display's depth axis
    rows, cols = np.nonzero(drawn(render_preview(wide, size=128)))
    assert np.ptp(cols) > np.ptp(rows)


def test_an_empty_mesh_gives_the_background():
    image = render_preview(trimesh.Trimesh(), size=32)
    assert (image == BACKGROUND).all()
