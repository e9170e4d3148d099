"""Mesh export to GLB / OBJ / PLY / STL, all in one display orientation.

Meshes come out of ``isosurface.marching_cubes`` in the MODEL frame. Every exported file uses the
demo's reorientation ``(x, y, z) -> (y, z, x)``: +Y is up and the object's front faces +Z, i.e. a
viewer looking down -Z sees it (the glTF convention). The map is a cyclic permutation of the axes,
a proper rotation, so triangle winding (outward normals) is kept.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np
import trimesh
from trimesh.exchange.gltf import export_glb
from trimesh.exchange.obj import export_obj
from trimesh.exchange.ply import export_ply
from trimesh.exchange.stl import export_stl

#: File formats ``export_mesh`` writes.
FORMATS = ("glb", "obj", "ply", "stl")


def to_display_frame(vertices: np.ndarray) -> np.ndarray:
    """Maps model-frame points to the display frame: ``(x, y, z) -> (y, z, x)``.

    Args:
        vertices: [V, 3] model-frame coordinates.

    Returns:
        [V, 3] display-frame coordinates (new_x = old_y, new_y = old_z, new_z = old_x).
    """
    vertices = np.asarray(vertices)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape [V, 3], got {list(vertices.shape)}")
    return vertices[:, [1, 2, 0]]


def _vertex_colors(mesh: trimesh.Trimesh) -> np.ndarray | None:
    """Returns the mesh's [V, 4] uint8 RGBA vertex colours, or None when it has none."""
    # Untextured, uncoloured meshes still report a default grey; only trust explicit colours.
    if mesh.visual.kind != "vertex":
        return None
    return np.asarray(mesh.visual.vertex_colors, dtype=np.uint8)


def _glb_bytes(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None) -> bytes:
    """Encodes a GLB whose material renders the vertex colours unlit-looking, not dark.

    A ColorVisuals mesh is written without a material, so glTF's default one applies
    (metallicFactor = 1) and viewers show the object almost black. A white, non-metallic PBR
    material multiplied by COLOR_0 shows the colours as they are. The colours stay the sRGB bytes
    the renderer produced (viewers treat COLOR_0 as linear, so they look slightly lighter than in
    the renders; we keep the bytes rather than guess a conversion).
    """
    material = trimesh.visual.material.PBRMaterial(
        baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0,
        roughnessFactor=0.9,
        doubleSided=False,
    )
    visual = trimesh.visual.TextureVisuals(material=material)
    if colors is not None:
        # trimesh's glTF exporter writes vertex_attributes["color"] as COLOR_0 next to the
        # material of a TextureVisuals mesh.
        visual.vertex_attributes["color"] = colors
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)
    return export_glb(mesh, include_normals=False)


def _encode(mesh: trimesh.Trimesh, file_format: str) -> bytes:
    """Encodes a display-frame mesh (vertex colours in ``visual``, if any) in ``file_format``."""
    if file_format == "glb":
        return _glb_bytes(mesh.vertices, mesh.faces, _vertex_colors(mesh))
    if file_format == "obj":
        # Vertex colours go on the "v x y z r g b" lines; without textures no .mtl is produced,
        # and no resolver is passed, so nothing could be written beside the file anyway.
        text = export_obj(
            mesh, include_normals=False, include_color=True, include_texture=False, resolver=None
        )
        return text.encode("utf-8")
    if file_format == "ply":
        return export_ply(mesh, encoding="binary", vertex_normal=False)
    if file_format == "stl":
        return export_stl(mesh)
    raise AssertionError(file_format)  # unreachable: callers validate against FORMATS


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers never see a partly written file."""
    # The temporary file lives in the same folder so os.replace is a same-filesystem rename.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file readable by its owner only; exported meshes are served files.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def export_mesh(
    mesh: trimesh.Trimesh,
    path: str | os.PathLike,
    file_format: str | None = None,
) -> pathlib.Path:
    """Writes a model-frame mesh to ``path`` in the display frame.

    Args:
        mesh: [V, 3] vertices and [F, 3] outward faces in the model frame, optionally with uint8
            RGBA vertex colours in ``mesh.visual.vertex_colors``; not modified.
        path: destination file; its folder must exist.
        file_format: one of ``FORMATS``; taken from the path's suffix when None.

    Returns:
        The written path.

    GLB and PLY (binary) and OBJ keep the vertex colours (OBJ keeps RGB only, no alpha);
    STL holds geometry only.
    """
    path = pathlib.Path(path)
    fmt = (file_format if file_format is not None else path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(
            f"unknown mesh format {fmt!r} (from {path.name!r}); allowed: {', '.join(FORMATS)}"
        )
    if len(mesh.vertices) == 0 or len(mesh.faces) == 0:
        raise ValueError("cannot export an empty mesh")

    # Build a fresh mesh so the caller's mesh (and its caches) stay untouched.
    colors = _vertex_colors(mesh)
    display = trimesh.Trimesh(
        vertices=to_display_frame(np.asarray(mesh.vertices, dtype=np.float64)),
        faces=np.asarray(mesh.faces, dtype=np.int64),
        vertex_colors=colors,
        process=False,
    )
    _write_atomic(path, _encode(display, fmt))
    return path
