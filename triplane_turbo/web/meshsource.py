"""What a stored result keeps so that any download format can be written later, exactly as at once.

A result's files are the GLB the viewer shows, the preview, and this *source*: the model-frame mesh
(vertices, faces, vertex colours) and its baked texture (UV layout, tangents, the images as PNG), in
one ``.npz``. ``export.encode_mesh`` reads nothing else of a mesh, so encoding the source gives the
same bytes as encoding the mesh the pipeline returned (``tests/test_web.py`` compares them).

Measured on a 160-grid tiny-model result (31k vertices, 62k faces) with a 1024² texture, on a shared
2-core AMD EPYC: written in 0.25 s, read back in 0.08 s, 1.85 MB (the GLB: 2.0 MB).
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from ..export import encode_mesh, png_bytes, zip_files

#: Formats delivered as a zip of the files ``encode_mesh`` gives (an OBJ with its .mtl and .png),
#: even when there is only one (a vertex-coloured OBJ): a format's file name never depends on the mesh.
ARCHIVED = ("obj",)


def file_name(stem: str, file_format: str) -> str:
    """The download's file name: ``stem.<format>``, or ``stem-<format>.zip`` for ``ARCHIVED`` formats."""
    return f"{stem}-{file_format}.zip" if file_format in ARCHIVED else f"{stem}.{file_format}"


def encode_download(mesh, texture, file_format: str, stem: str) -> bytes:
    """The bytes of the download ``file_name(stem, file_format)`` of a model-frame mesh and its texture."""
    files = encode_mesh(mesh, file_format, stem, texture)
    if file_format in ARCHIVED:
        return zip_files(files)
    if list(files) != [f"{stem}.{file_format}"]:
        raise ValueError(f"{file_format} gives several files ({', '.join(files)}): add it to meshsource.ARCHIVED "
                         "to deliver it as a zip")
    return files[f"{stem}.{file_format}"]


def source_bytes(mesh, texture=None) -> bytes:
    """The source of ``mesh`` (trimesh, model frame, optional uint8 RGBA vertex colours) and its
    ``texture.UVTexture``: an npz archive of plain arrays, deflated at level 1 (images as PNG)."""
    arrays = {"vertices": np.asarray(mesh.vertices), "faces": np.asarray(mesh.faces)}
    if mesh.visual.kind == "vertex":  # only explicit colours, as export._vertex_colors
        arrays["colors"] = np.asarray(mesh.visual.vertex_colors, dtype=np.uint8)
    if texture is not None:
        arrays.update({"uv_vmapping": texture.vmapping, "uv_faces": texture.faces, "uv": texture.uv,
                       "uv_base_color_png": np.frombuffer(png_bytes(texture.base_color), np.uint8)})
        if texture.normal is not None:
            arrays["uv_normal_png"] = np.frombuffer(png_bytes(texture.normal), np.uint8)
        if texture.tangents is not None:
            arrays["uv_tangents"] = texture.tangents
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def read_source(path):
    """(mesh, texture or None) from a file ``source_bytes`` wrote."""
    import trimesh
    from PIL import Image

    from ..texturing.bake import UVTexture

    def image(data):
        with Image.open(io.BytesIO(data.tobytes())) as png:
            return np.asarray(png.convert("RGB"))

    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    mesh = trimesh.Trimesh(arrays["vertices"], arrays["faces"], vertex_colors=arrays.get("colors"), process=False)
    texture = None
    if "uv" in arrays:
        texture = UVTexture(arrays["uv_vmapping"], arrays["uv_faces"], arrays["uv"], image(arrays["uv_base_color_png"]),
                            image(arrays["uv_normal_png"]) if "uv_normal_png" in arrays else None,
                            arrays.get("uv_tangents"))
    return mesh, texture


__all__ = ["ARCHIVED", "encode_download", "file_name", "read_source", "source_bytes"]
