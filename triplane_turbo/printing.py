"""The print formats: STL and 3MF, in the print frame (``frames.to_print_frame``: +Z up, millimetres,
the largest side ``print_size``, centred in x and y, resting on z = 0), as slicers (PrusaSlicer, Cura,
Bambu Studio) read them.

STL holds triangles only (trimesh's binary writer). The 3MF package is written here: lib3mf, the 3MF
Consortium's library, sets the whole process's C locale to "C" on every write (Python's default text
encoding then turns ASCII), and trimesh's writer drops colours. The model declares
``unit="millimeter"``, holds one mesh object (the same closed, consistently wound surface as the
other formats), and carries the colours as a materials-extension ``colorgroup`` with one colour per
triangle corner: the vertex colours, or the baked texture sampled at each corner's UV (bilinear; the
colours between corners are then interpolated, so detail finer than the triangles is lost). Both are
sRGB, as 3MF defines colours.
"""

from __future__ import annotations

import io
import zipfile
from xml.sax.saxutils import quoteattr

import numpy as np
import trimesh
from trimesh.exchange.stl import export_stl

from .frames import DEFAULT_PRINT_SIZE, to_print_frame


def print_file(vertices: np.ndarray, faces: np.ndarray, file_format: str, *, name: str = "mesh",
               colors: np.ndarray | None = None, texture=None, print_size: float = DEFAULT_PRINT_SIZE) -> bytes:
    """The STL or 3MF of a display-frame mesh, turned into the print frame.

    Args:
        vertices: [V, 3] display-frame positions (any size); faces: [F, 3] outward faces.
        file_format: "stl" or "3mf".
        name: the 3MF object's name.
        colors: [V, 4] uint8 sRGB vertex colours (3MF), or None.
        texture: a ``UVTexture`` of this mesh (3MF: its base colour sampled at each corner's UV; it
            wins over ``colors``).
        print_size: the largest side in millimetres.
    """
    printed = to_print_frame(vertices, print_size)
    if file_format == "stl":
        return stl_bytes(printed, faces)
    if file_format != "3mf":
        raise ValueError(f"not a print format: {file_format!r} (stl, 3mf)")
    if texture is not None:
        return threemf_bytes(printed, faces, name=name, colors=sample_texture(texture.base_color, texture.uv),
                             corners=texture.faces)
    return threemf_bytes(printed, faces, name=name, colors=colors)


def stl_bytes(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    """Binary STL of print-frame ``vertices`` [V, 3] (mm) and outward ``faces`` [F, 3]."""
    return export_stl(trimesh.Trimesh(vertices, faces, process=False))


def sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear samples of an [S, S, 3] uint8 image (row 0 at the top) at [N, 2] UVs (v up), clamped
    at the borders: [N, 3] uint8."""
    height, width = image.shape[:2]
    x = np.clip(np.asarray(uv[:, 0], np.float64) * width - 0.5, 0, width - 1)
    y = np.clip((1.0 - np.asarray(uv[:, 1], np.float64)) * height - 0.5, 0, height - 1)
    x0, y0 = np.minimum(x.astype(np.int64), width - 2), np.minimum(y.astype(np.int64), height - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    pixels = image.astype(np.float64)
    top = pixels[y0, x0] * (1 - fx) + pixels[y0, x0 + 1] * fx
    bottom = pixels[y0 + 1, x0] * (1 - fx) + pixels[y0 + 1, x0 + 1] * fx
    return np.clip(np.rint(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)


#: The 3MF package's fixed parts: its content types and the relationship naming the model part.
_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="model" ContentType="application/vnd.ms-package.3dmanufacturing-3dmodel+xml"/></Types>\n')
_RELATIONSHIPS = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Target="/3D/3dmodel.model" Id="rel0" '
    'Type="http://schemas.microsoft.com/3dmanufacturing/2013/01/3dmodel"/></Relationships>\n')
_CORE = "http://schemas.microsoft.com/3dmanufacturing/core/2015/02"
_MATERIALS = "http://schemas.microsoft.com/3dmanufacturing/material/2015/02"


def threemf_bytes(vertices: np.ndarray, faces: np.ndarray, *, name: str = "mesh", colors: np.ndarray | None = None,
                  corners: np.ndarray | None = None) -> bytes:
    """A 3MF package of one mesh object in millimetres (3MF core 1.3 and its materials extension).

    Args:
        vertices: [V, 3] print-frame positions (mm), written with 6 decimals.
        faces: [F, 3] outward (counter-clockwise seen from outside) vertex indices.
        name: the object's name.
        colors: [C, 3 or 4] uint8 sRGB colours (alpha ignored: the object is opaque), or None.
        corners: [F, 3] indices into ``colors`` of each triangle corner (default: ``faces``, i.e. one
            colour per vertex).

    Returns:
        The .3mf file's bytes: a zip of ``[Content_Types].xml``, ``_rels/.rels`` and
        ``3D/3dmodel.model``; the same mesh gives the same bytes.
    """
    vertices, faces = np.asarray(vertices, np.float64), np.asarray(faces, np.int64)
    parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<model unit="millimeter" xml:lang="en-US" '
             f'xmlns="{_CORE}" xmlns:m="{_MATERIALS}">\n'
             '<metadata name="Application">TriplaneTurbo</metadata>\n<resources>\n']
    object_properties, triangle = "", '<triangle v1="%d" v2="%d" v3="%d"/>'
    rows = faces
    if colors is not None:
        rgb = np.asarray(colors, np.uint8)[:, :3]
        parts.append('<m:colorgroup id="1">')
        parts.append(('<m:color color="#%02X%02X%02X"/>' * len(rgb)) % tuple(rgb.reshape(-1).tolist()))
        parts.append('</m:colorgroup>\n')
        corners = faces if corners is None else np.asarray(corners, np.int64)
        object_properties = f' pid="1" pindex="{int(corners[0, 0])}"'
        triangle = '<triangle v1="%d" v2="%d" v3="%d" pid="1" p1="%d" p2="%d" p3="%d"/>'
        rows = np.concatenate([faces, corners], axis=1)
    parts.append(f'<object id="2" type="model" name={quoteattr(name)}{object_properties}>\n<mesh>\n<vertices>')
    parts.append(('<vertex x="%.6f" y="%.6f" z="%.6f"/>' * len(vertices)) % tuple(vertices.reshape(-1).tolist()))
    parts.append('</vertices>\n<triangles>')
    parts.append((triangle * len(rows)) % tuple(rows.reshape(-1).tolist()))
    parts.append('</triangles>\n</mesh>\n</object>\n</resources>\n<build><item objectid="2"/></build>\n</model>\n')
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as package:
        for path, text in (("[Content_Types].xml", _CONTENT_TYPES), ("_rels/.rels", _RELATIONSHIPS),
                           ("3D/3dmodel.model", "".join(parts))):
            entry = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))  # no clock: same mesh, same bytes
            entry.compress_type = zipfile.ZIP_DEFLATED
            package.writestr(entry, text.encode("utf-8"))
    return buffer.getvalue()


__all__ = ["print_file", "sample_texture", "stl_bytes", "threemf_bytes"]
