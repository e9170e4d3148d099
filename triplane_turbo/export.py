"""Mesh export to GLB / OBJ / PLY / STL, all in one display orientation.

Meshes come out of ``isosurface.marching_cubes`` in the MODEL frame. Every exported file uses the
demo's reorientation ``(x, y, z) -> (y, z, x)``: +Y is up and the object's front faces +Z, i.e. a
viewer looking down -Z sees it (the glTF convention). The map is a cyclic permutation of the axes,
a proper rotation, so triangle winding (outward normals) is kept.

With a baked ``texture.UVTexture``: GLB embeds it (PNG base colour, and the normal map if there is
one) in a non-metallic PBR material; OBJ is written as ``name.obj`` + ``name.mtl`` + ``name.png``.
PLY keeps vertex colours; STL is geometry only. Vertex colours in a GLB's COLOR_0 are converted
from the colour field's sRGB values to linear, as glTF defines that attribute.
"""

from __future__ import annotations

import io
import os
import pathlib
import tempfile
import zipfile

import numpy as np
import trimesh
from trimesh.exchange.gltf import export_glb
from trimesh.exchange.obj import export_obj
from trimesh.exchange.ply import export_ply
from trimesh.exchange.stl import export_stl

from .texture import UVTexture, srgb_to_linear, to_uint8

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


def linear_vertex_colors(colors: np.ndarray) -> np.ndarray:
    """sRGB uint8 RGBA [V, 4] -> the same colours in linear light (alpha unchanged), uint8."""
    linear = np.array(colors, dtype=np.uint8, copy=True)
    linear[:, :3] = to_uint8(srgb_to_linear(colors[:, :3] / 255.0))
    return linear


def _glb_bytes(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None) -> bytes:
    """Encodes a vertex-coloured GLB whose material renders the colours, not a dark metal.

    A ColorVisuals mesh is written without a material, so glTF's default one applies
    (metallicFactor = 1) and viewers show the object almost black. A white, non-metallic PBR
    material multiplied by COLOR_0 shows the colours as they are; COLOR_0 holds them in linear
    light, as glTF defines it (the colour field gives display sRGB values). They are 8-bit (trimesh
    writes colour attributes as bytes), so the darkest tones band; the textured GLB has no such loss.
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
        visual.vertex_attributes["color"] = linear_vertex_colors(colors)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)
    return export_glb(mesh, include_normals=False)


def _obj_files(mesh: trimesh.Trimesh, name: str, texture: UVTexture | None) -> dict[str, bytes]:
    """OBJ text, plus ``name.mtl`` and ``name.png`` when there is a texture.

    The side files' names have spaces replaced by underscores: OBJ and MTL readers split the
    ``mtllib`` and ``map_Kd`` lines on whitespace.
    """
    if texture is None:
        # Vertex colours go on the "v x y z r g b" lines; no .mtl is produced.
        text = export_obj(mesh, include_normals=False, include_color=True, include_texture=False, resolver=None)
        return {f"{name}.obj": text.encode("utf-8")}
    from PIL import Image

    side = "_".join(name.split())
    textured = texture.textured_mesh(mesh)
    text = export_obj(textured, include_normals=False, include_color=False, include_texture=True,
                      return_texture=True, mtl_name=f"{side}.mtl")[0]
    png = io.BytesIO()
    Image.fromarray(texture.base_color).save(png, format="PNG")
    # Written here rather than taken from trimesh: its .mtl names the image "material_0.png" and
    # sets a grey ambient and a specular term that DCC tools then add to the texture.
    mtl = (f"# TriplaneTurbo: base colour baked from the colour field (sRGB)\nnewmtl material_0\n"
           f"Ka 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\nillum 1\nmap_Kd {side}.png\n")
    return {f"{name}.obj": text.encode("utf-8"), f"{side}.mtl": mtl.encode("utf-8"), f"{side}.png": png.getvalue()}


def encode_mesh(mesh: trimesh.Trimesh, file_format: str, name: str = "mesh",
                texture: UVTexture | None = None) -> dict[str, bytes]:
    """The files of ``mesh`` in ``file_format``, by file name: ``{name.<format>: bytes, ...}``.

    Args:
        mesh: [V, 3] vertices and [F, 3] faces in the MODEL frame, optionally with uint8 RGBA vertex
            colours; not modified.
        file_format: one of ``FORMATS``.
        name: file name without suffix (OBJ's ``.mtl`` and ``.png`` take the same name).
        texture: a baked texture of this mesh (used by GLB and OBJ).
    """
    if file_format not in FORMATS:
        raise ValueError(f"unknown mesh format {file_format!r}; allowed: {', '.join(FORMATS)}")
    if len(mesh.vertices) == 0 or len(mesh.faces) == 0:
        raise ValueError("cannot export an empty mesh")
    if texture is not None and (len(texture.faces) != len(mesh.faces)
                                or not np.array_equal(texture.vmapping[texture.faces], mesh.faces)):
        raise ValueError("the texture was baked for another mesh (its faces do not match)")
    colors = _vertex_colors(mesh)
    display = trimesh.Trimesh(  # a fresh mesh so the caller's mesh (and its caches) stay untouched
        vertices=to_display_frame(np.asarray(mesh.vertices, dtype=np.float64)),
        faces=np.asarray(mesh.faces, dtype=np.int64),
        vertex_colors=colors,
        process=False,
    )
    if file_format == "glb":
        if texture is not None:
            return {f"{name}.glb": export_glb(texture.textured_mesh(display), include_normals=True)}
        return {f"{name}.glb": _glb_bytes(display.vertices, display.faces, colors)}
    if file_format == "obj":
        return _obj_files(display, name, texture)
    if file_format == "ply":
        return {f"{name}.ply": export_ply(display, encoding="binary", vertex_normal=False)}
    return {f"{name}.stl": export_stl(display)}


def zip_files(files: dict[str, bytes]) -> bytes:
    """Files by name -> one zip archive (an OBJ with its .mtl and .png, as one download)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


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
    texture: UVTexture | None = None,
) -> pathlib.Path:
    """Writes a model-frame mesh to ``path`` in the display frame.

    Args:
        mesh: [V, 3] vertices and [F, 3] outward faces in the model frame, optionally with uint8
            RGBA vertex colours in ``mesh.visual.vertex_colors``; not modified.
        path: destination file; its folder must exist.
        file_format: one of ``FORMATS``; taken from the path's suffix when None.
        texture: the mesh's baked texture (``TriplaneTurboOutput.textures``), for GLB and OBJ.

    Returns:
        The written path (an OBJ with a texture also writes ``.mtl`` and ``.png`` of the same name
        beside it).

    Without a texture, GLB and PLY (binary) and OBJ keep the vertex colours (OBJ keeps RGB only,
    no alpha); STL holds geometry only.
    """
    path = pathlib.Path(path)
    fmt = (file_format if file_format is not None else path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(
            f"unknown mesh format {fmt!r} (from {path.name!r}); allowed: {', '.join(FORMATS)}"
        )
    files = encode_mesh(mesh, fmt, path.stem, texture)
    for name, data in files.items():
        target = path if name == f"{path.stem}.{fmt}" else path.with_name(name)
        _write_atomic(target, data)
    return path
