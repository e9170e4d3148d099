"""Hand-made meshes for the export tests: small, closed, and asymmetric, so that a swapped or flipped
axis shows."""

from __future__ import annotations

import numpy as np
import trimesh


def asymmetric_mesh(colored: bool = True) -> trimesh.Trimesh:
    """A closed, outward-wound blob in the MODEL frame with one extreme per direction that matters:
    a tall top towards model +z (display +Y, up), a nose towards model +x (display +Z, the front),
    different widths along x, y, z, and an offset from the origin. 642 vertices; random opaque
    colours (fixed seed) unless ``colored`` is False."""
    sphere = trimesh.creation.icosphere(subdivisions=3)
    v = np.array(sphere.vertices)
    v[:, 2] = np.where(v[:, 2] > 0, v[:, 2] * 1.6, v[:, 2] * 0.5)  # the top reaches z = 1.6, the base z = -0.5
    v[:, 0] = np.where(v[:, 0] > 0.6, v[:, 0] + (v[:, 0] - 0.6) * 2.0, v[:, 0])  # a nose towards +x
    v = v * [0.6, 0.9, 0.5] + [0.2, -0.1, 0.05]
    colors = None
    if colored:
        colors = np.random.default_rng(0).integers(0, 256, (len(v), 4), dtype=np.uint8)
        colors[:, 3] = 255
    mesh = trimesh.Trimesh(v, sphere.faces, vertex_colors=colors, process=False)
    assert mesh.is_watertight and mesh.volume > 0
    return mesh


def assert_same_vertex_set(actual: np.ndarray, expected: np.ndarray, atol: float) -> None:
    """Each expected point has its own actual point within ``atol`` (one to one), in whatever order a
    reader returns them."""
    from scipy.spatial import cKDTree

    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    distance, index = cKDTree(actual).query(expected)
    assert distance.max() <= atol, distance.max()
    assert len(np.unique(index)) == len(expected)
