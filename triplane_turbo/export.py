"""Mesh export to GLB / OBJ / PLY / USDZ (display frame) and STL / 3MF (print frame).

Meshes come out of ``isosurface.marching_cubes`` in the MODEL frame. GLB, OBJ, PLY and USDZ use the
DISPLAY frame (``frames.to_display_frame``, the demo's reorientation ``(x, y, z) -> (y, z, x)``):
+Y is up and the object's front faces +Z, i.e. a viewer looking down -Z sees it (the glTF
convention); ``origin`` and ``scale`` (``frames.Placement``) then move the pivot and set the size.
STL and 3MF use the PRINT frame (``frames.to_print_frame``): +Z up, millimetres, the largest side
``print_size``, centred in x and y, on z = 0. Both maps are proper rotations times positive scales,
so triangle winding (outward normals) is kept. docs/FORMATS.md has the table for users.

With a baked ``texture.UVTexture``: GLB embeds it (PNG base colour, and the normal map if there is
one, with the MikkTSpace tangents it was baked against as TANGENT) in a non-metallic PBR material;
OBJ is written as ``name.obj`` + ``name.mtl`` + ``name.png``; USDZ (``usdz.py``) packs the same
images into a UsdPreviewSurface. PLY keeps vertex colours; STL is geometry only; 3MF
(``printing.py``) carries colours per triangle corner. Vertex colours in a GLB's COLOR_0 are
converted from the colour field's sRGB values to linear, as glTF defines that attribute, and come
with smooth vertex normals.

GLBs are written here (``glb_bytes``) rather than by trimesh, whose writer can put neither a
TANGENT attribute nor bufferView targets into a file; the result passes the Khronos glTF validator
with no errors, warnings or hints (``tests/test_gltf_validator.py``).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import struct
import zipfile
import zlib

import numpy as np
import trimesh
from trimesh.exchange.obj import export_obj
from trimesh.exchange.ply import export_ply

from .fileio import write_atomic
from .frames import DEFAULT_PRINT_SIZE, Placement, place, to_display_frame
from .texturing.bake import UVTexture, srgb_to_linear
from .texturing.texels import to_uint8

#: File formats ``export_mesh`` writes.
FORMATS = ("glb", "obj", "ply", "stl", "usdz", "3mf")
#: The formats in the display frame (placed by ``origin`` and ``scale``) and in the print frame.
DISPLAY_FORMATS, PRINT_FORMATS = ("glb", "obj", "ply", "usdz"), ("stl", "3mf")


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


#: zlib level of the PNG textures. Measured on a baked 1024² texture: level 1 writes 0.58 MB in 20 ms;
#: level 6 writes 0.44 MB in 150 ms (the gutters are flat and compress well either way).
PNG_COMPRESS_LEVEL = 1
#: The material's roughness (a matte, non-metallic surface: the colour field has the lighting baked in).
ROUGHNESS = 0.9

# glTF enums
_FLOAT, _UNSIGNED_BYTE, _UNSIGNED_SHORT, _UNSIGNED_INT = 5126, 5121, 5123, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071


def png_bytes(image: np.ndarray, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """[H, W, 3] uint8 RGB -> PNG file bytes (8 bits per channel, every row with the "Up" filter).

    Written by hand because Pillow's encoder takes 2.5x as long for the same size (50 ms for a 1024²
    texture at level 1: it picks a filter row by row); one filter for all rows and one zlib call
    take 20 ms. The "Up" filter (each byte minus the byte above) suits smooth textures with flat
    gutters best of the five (measured: 0.58 MB against 0.64 MB for "Sub" and 0.82 MB unfiltered).
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got {list(image.shape)}")
    height, width, _ = image.shape
    rows = image.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 2  # "Up"; the first row's prior row is zeros, so it is stored as is
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(filtered.tobytes(), level))
            + chunk(b"IEND", b""))


def glb_bytes(positions: np.ndarray, faces: np.ndarray, *, normals: np.ndarray | None = None,
              uv: np.ndarray | None = None, tangents: np.ndarray | None = None, colors: np.ndarray | None = None,
              base_color: bytes | None = None, normal_map: bytes | None = None,
              roughness: float = ROUGHNESS) -> bytes:
    """One mesh as a binary glTF 2.0 file: one node, one triangle primitive, one non-metallic material.

    Args:
        positions: [V, 3] display-frame positions.
        faces: [F, 3] counter-clockwise vertex indices.
        normals: [V, 3] unit vertex normals (NORMAL).
        uv: [V, 2] texture coordinates with v up (trimesh's convention; flipped into glTF's v down).
        tangents: [V, 4] unit tangents and bitangent signs (TANGENT; needs ``normals``).
        colors: [V, 4] uint8 RGBA in linear light (COLOR_0), multiplied into the base colour.
        base_color, normal_map: PNG bytes of the base colour (sRGB) and tangent-space normal map
            (both read through ``uv``).
        roughness: the material's roughness factor.
    Returns:
        The GLB file's bytes. Every accessor is tightly packed in its own 4-byte-aligned bufferView
        with its target set; images are embedded; the sampler clamps at the atlas's borders.
    """
    positions = np.asarray(positions, dtype=np.float32)
    faces = np.asarray(faces)
    views, accessors, chunks = [], [], []
    offset = 0

    def view(data: bytes, target: int | None = None) -> int:
        nonlocal offset
        entry = {"buffer": 0, "byteOffset": offset, "byteLength": len(data)}
        if target is not None:
            entry["target"] = target
        views.append(entry)
        padded = data + b"\0" * (-len(data) % 4)  # every view starts 4-byte aligned
        chunks.append(padded)
        offset += len(padded)
        return len(views) - 1

    def accessor(array: np.ndarray, kind: str, component: int, target: int, **extra) -> int:
        accessors.append({"bufferView": view(np.ascontiguousarray(array).tobytes(), target), "componentType": component,
                          "count": int(array.shape[0]), "type": kind, **extra})
        return len(accessors) - 1

    attributes = {"POSITION": accessor(positions, "VEC3", _FLOAT, _ARRAY_BUFFER,
                                       min=[float(x) for x in positions.min(0)],
                                       max=[float(x) for x in positions.max(0)])}
    if normals is not None:
        attributes["NORMAL"] = accessor(np.asarray(normals, np.float32), "VEC3", _FLOAT, _ARRAY_BUFFER)
    if tangents is not None:
        attributes["TANGENT"] = accessor(np.asarray(tangents, np.float32), "VEC4", _FLOAT, _ARRAY_BUFFER)
    if uv is not None:
        flipped = np.asarray(uv, np.float64).copy()
        flipped[:, 1] = 1 - flipped[:, 1]
        attributes["TEXCOORD_0"] = accessor(flipped.astype(np.float32), "VEC2", _FLOAT, _ARRAY_BUFFER)
    if colors is not None:
        attributes["COLOR_0"] = accessor(np.asarray(colors, np.uint8), "VEC4", _UNSIGNED_BYTE, _ARRAY_BUFFER,
                                         normalized=True)
    # 16-bit indices when they fit (the largest value of a type is reserved for primitive restart)
    index_type, component = (np.uint16, _UNSIGNED_SHORT) if len(positions) < 65535 else (np.uint32, _UNSIGNED_INT)
    indices = accessor(faces.reshape(-1).astype(index_type), "SCALAR", component, _ELEMENT_ARRAY_BUFFER)

    pbr = {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": float(roughness)}
    material = {"pbrMetallicRoughness": pbr, "doubleSided": False}
    tree = {"asset": {"version": "2.0", "generator": "TriplaneTurbo"}, "scene": 0, "scenes": [{"nodes": [0]}],
            "nodes": [{"mesh": 0}],
            "meshes": [{"primitives": [{"attributes": attributes, "indices": indices, "material": 0, "mode": 4}]}],
            "materials": [material]}
    images = [png for png in (base_color, normal_map) if png is not None]
    if images:
        tree["images"] = [{"bufferView": view(png), "mimeType": "image/png"} for png in images]
        tree["samplers"] = [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR,
                             "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}]
        tree["textures"] = [{"sampler": 0, "source": i} for i in range(len(images))]
        if base_color is not None:
            pbr["baseColorTexture"] = {"index": 0}
        if normal_map is not None:
            material["normalTexture"] = {"index": len(images) - 1}
    tree["accessors"], tree["bufferViews"] = accessors, views
    binary = b"".join(chunks)
    tree["buffers"] = [{"byteLength": len(binary)}]
    text = json.dumps(tree, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)  # the JSON chunk is padded with spaces, the binary one with zeros
    return b"".join([struct.pack("<4sII", b"glTF", 2, 12 + 8 + len(text) + 8 + len(binary)),
                     struct.pack("<I4s", len(text), b"JSON"), text, struct.pack("<I4s", len(binary), b"BIN\0"), binary])


def _surface(display: trimesh.Trimesh, positions: np.ndarray, texture: UVTexture | None) -> dict:
    """The arrays a GLB and a USDZ share, from a display-frame mesh and its placed positions.

    Without a texture: ``positions`` [V, 3], ``faces`` and smooth unit ``normals``. With one, the mesh
    split along the UV seams (``positions[vmapping]``, the texture's faces), ``uv`` and, with a
    normal map, the display-frame ``tangents`` it was baked against (placing moves and scales
    uniformly, which turns no normal or tangent).
    """
    if texture is None:
        normals = np.asarray(trimesh.Trimesh(display.vertices, display.faces, process=False).vertex_normals)
        return {"positions": positions, "faces": np.asarray(display.faces), "normals": _unit_normals(normals)}
    tangents = None
    normals = texture.vertex_normals(display)
    if texture.normal is not None and texture.tangents is not None:
        tangents = np.array(texture.tangents, dtype=np.float64)
        tangents[:, :3] = to_display_frame(tangents[:, :3])  # a rotation: the handedness w is kept
        tangents = _valid_tangents(tangents, normals)
    return {"positions": np.asarray(positions)[texture.vmapping], "faces": texture.faces,
            "normals": _unit_normals(normals), "uv": texture.uv, "tangents": tangents}


def _glb_file(surface: dict, colors: np.ndarray | None, texture: UVTexture | None) -> bytes:
    """A GLB whose material renders the texture or the vertex colours, not a dark metal.

    Without a material glTF's default one applies (metallicFactor = 1) and viewers show the object
    almost black: the white, non-metallic material multiplied by COLOR_0 shows the colours as they
    are; COLOR_0 holds them in linear light, as glTF defines it (the colour field gives display sRGB
    values). They are 8-bit, so the darkest tones band; the textured GLB has no such loss. Smooth
    vertex normals come with it: without NORMAL viewers shade every triangle flat.
    """
    if texture is None:
        return glb_bytes(surface["positions"], surface["faces"], normals=surface["normals"],
                         colors=linear_vertex_colors(colors) if colors is not None else None)
    return glb_bytes(surface["positions"], surface["faces"], normals=surface["normals"], uv=surface["uv"],
                     tangents=surface["tangents"], base_color=png_bytes(texture.base_color),
                     normal_map=png_bytes(texture.normal) if texture.normal is not None else None)


def _usdz_file(surface: dict, colors: np.ndarray | None, texture: UVTexture | None) -> bytes:
    """The USDZ of the same arrays as the GLB (vertex colours in linear light, as USD's are; not
    rounded to 8 bits as the GLB's COLOR_0 is)."""
    from .usdz import usdz_bytes

    if texture is None:
        linear = srgb_to_linear(colors[:, :3] / 255.0) if colors is not None else None
        return usdz_bytes(surface["positions"], surface["faces"], normals=surface["normals"], colors=linear,
                          roughness=ROUGHNESS)
    return usdz_bytes(surface["positions"], surface["faces"], normals=surface["normals"], uv=surface["uv"],
                      base_color=png_bytes(texture.base_color), roughness=ROUGHNESS,
                      normal_map=png_bytes(texture.normal) if texture.normal is not None else None)


def _unit_normals(normals: np.ndarray) -> np.ndarray:
    """[V, 3] float32 unit normals; a zero normal (a vertex of degenerate faces only) becomes +Y, as
    glTF requires unit length."""
    normals = np.asarray(normals, dtype=np.float64)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.where(length > 1e-12, normals / np.where(length > 0, length, 1), [0.0, 1.0, 0.0]).astype(np.float32)


def _valid_tangents(tangents: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """[V, 4] float32 tangents of unit length and w = ±1, as glTF requires: MikkTSpace leaves a zero
    tangent where a vertex has no texture area around it; any unit vector across its normal does."""
    xyz = tangents[:, :3]
    length = np.linalg.norm(xyz, axis=1, keepdims=True)
    normals = np.asarray(normals, dtype=np.float64)
    helper = np.where(np.abs(normals[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    fallback = np.cross(normals, helper)
    fallback /= np.maximum(np.linalg.norm(fallback, axis=1, keepdims=True), 1e-12)
    xyz = np.where(length > 1e-6, xyz / np.where(length > 0, length, 1), fallback)
    w = np.where(tangents[:, 3:] < 0, -1.0, 1.0)
    return np.concatenate([xyz, w], axis=1).astype(np.float32)


def _obj_files(mesh: trimesh.Trimesh, name: str, texture: UVTexture | None) -> dict[str, bytes]:
    """OBJ text, plus ``name.mtl`` and ``name.png`` when there is a texture.

    The side files' names have spaces replaced by underscores: OBJ and MTL readers split the
    ``mtllib`` and ``map_Kd`` lines on whitespace.
    """
    if texture is None:
        # Vertex colours go on the "v x y z r g b" lines; no .mtl is produced.
        text = export_obj(mesh, include_normals=False, include_color=True, include_texture=False, resolver=None)
        return {f"{name}.obj": text.encode("utf-8")}

    side = "_".join(name.split())
    textured = texture.textured_mesh(mesh)
    text = export_obj(textured, include_normals=False, include_color=False, include_texture=True,
                      return_texture=True, mtl_name=f"{side}.mtl")[0]
    png = png_bytes(texture.base_color)
    # Written here rather than taken from trimesh: its .mtl names the image "material_0.png" and
    # sets a grey ambient and a specular term that DCC tools then add to the texture.
    mtl = (f"# TriplaneTurbo: base colour baked from the colour field (sRGB)\nnewmtl material_0\n"
           f"Ka 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\nillum 1\nmap_Kd {side}.png\n")
    return {f"{name}.obj": text.encode("utf-8"), f"{side}.mtl": mtl.encode("utf-8"), f"{side}.png": png}


def encode_mesh(mesh: trimesh.Trimesh, file_format: str, name: str = "mesh", texture: UVTexture | None = None, *,
                origin: str | None = None, scale: float = 1.0,
                print_size: float = DEFAULT_PRINT_SIZE) -> dict[str, bytes]:
    """The files of ``mesh`` in ``file_format``, by file name: ``{name.<format>: bytes, ...}``.

    Args:
        mesh: [V, 3] vertices and [F, 3] faces in the MODEL frame, optionally with uint8 RGBA vertex
            colours; not modified.
        file_format: one of ``FORMATS``.
        name: file name without suffix (OBJ's ``.mtl`` and ``.png`` take the same name).
        texture: a baked texture of this mesh (used by GLB, OBJ, USDZ and 3MF).
        origin, scale: where the display formats' origin sits and their metres per model unit
            (``frames.Placement``; the defaults keep the model's origin and size).
        print_size: the print formats' largest side in millimetres.
    """
    if file_format not in FORMATS:
        raise ValueError(f"unknown mesh format {file_format!r}; allowed: {', '.join(FORMATS)}")
    placement = Placement(origin, scale, print_size)
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
    if file_format in PRINT_FORMATS:
        from .printing import print_file

        return {f"{name}.{file_format}": print_file(display.vertices, display.faces, file_format, name=name,
                                                    colors=colors, texture=texture, print_size=print_size)}
    positions = place(display.vertices, placement)
    if file_format in ("glb", "usdz"):
        encode = _glb_file if file_format == "glb" else _usdz_file
        return {f"{name}.{file_format}": encode(_surface(display, positions, texture), colors, texture)}
    placed = trimesh.Trimesh(positions, display.faces, vertex_colors=colors, process=False)
    if file_format == "obj":
        return _obj_files(placed, name, texture)
    return {f"{name}.ply": export_ply(placed, encoding="binary", vertex_normal=False)}


def zip_files(files: dict[str, bytes]) -> bytes:
    """Files by name -> one zip archive (an OBJ with its .mtl and .png, as one download).

    Text is deflated at level 1: a 40k-face OBJ packs in 0.03 s instead of 0.18 s at the default
    level, for a quarter more bytes (every result of the app pays this before it is shown). PNGs are
    already compressed and are stored as they are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, data in files.items():
            archive.writestr(name, data, compress_type=zipfile.ZIP_STORED if name.endswith(".png") else None)
    return buffer.getvalue()


def export_mesh(
    mesh: trimesh.Trimesh,
    path: str | os.PathLike,
    file_format: str | None = None,
    texture: UVTexture | None = None,
    *,
    origin: str | None = None,
    scale: float = 1.0,
    print_size: float = DEFAULT_PRINT_SIZE,
) -> pathlib.Path:
    """Writes a model-frame mesh to ``path``: GLB, OBJ, PLY, USDZ in the display frame, STL and 3MF
    in the print frame (see the module's docstring and docs/FORMATS.md).

    Args:
        mesh: [V, 3] vertices and [F, 3] outward faces in the model frame, optionally with uint8
            RGBA vertex colours in ``mesh.visual.vertex_colors``; not modified.
        path: destination file; its folder must exist.
        file_format: one of ``FORMATS``; taken from the path's suffix when None.
        texture: the mesh's baked texture (``TriplaneTurboOutput.textures``), for GLB, OBJ, USDZ, 3MF.
        origin: GLB, OBJ, PLY, USDZ: None keeps the model's origin (the centre of the generation
            volume); "center" puts the bounding box's centre at the origin; "bottom" the centre of
            its base (lowest y, centred in x and z).
        scale: GLB, OBJ, PLY, USDZ: metres (units) per model unit; 1 keeps the size, about 1 across.
        print_size: STL, 3MF: the largest side of the bounding box, in millimetres.

    Returns:
        The written path (an OBJ with a texture also writes ``.mtl`` and ``.png`` of the same name
        beside it).

    Without a texture, GLB, PLY (binary), OBJ, USDZ and 3MF keep the vertex colours (OBJ keeps RGB
    only, no alpha; USDZ and 3MF are opaque); STL holds geometry only.
    """
    path = pathlib.Path(path)
    fmt = (file_format if file_format is not None else path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(
            f"unknown mesh format {fmt!r} (from {path.name!r}); allowed: {', '.join(FORMATS)}"
        )
    files = encode_mesh(mesh, fmt, path.stem, texture, origin=origin, scale=scale, print_size=print_size)
    for name, data in files.items():
        target = path if name == f"{path.stem}.{fmt}" else path.with_name(name)
        write_atomic(target, data)
    return path
