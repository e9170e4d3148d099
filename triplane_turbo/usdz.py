"""USDZ for Apple's AR Quick Look (and any USD reader), written with Pixar's USD (``usd-core``).

One package: a binary layer (``model.usdc``) and its PNG textures, made by
``UsdUtils.CreateNewARKitUsdzPackage``. The stage is Y up with ``metersPerUnit = 1`` (the glTF
frame, so the same numbers as the GLB: ``export.encode_mesh`` hands both the same vertex array);
its default prim ``/Model`` holds one ``Mesh`` (triangles, no subdivision, smooth vertex normals) and
its material, a ``UsdPreviewSurface`` (non-metallic, roughness 0.9 like the GLB's):

* with a baked texture, ``diffuseColor`` reads the base colour (sRGB) through a ``UsdUVTexture``
  from the ``st`` primvar (the UVs, v up as USD has them), and ``normal`` reads the normal map
  (raw colour space, scale 2 and bias -1 as ``UsdPreviewSurface`` specifies) when there is one;
* with vertex colours, the mesh carries them as the ``displayColor`` primvar (linear light, as USD
  colours are) and ``diffuseColor`` reads it through a ``UsdPrimvarReader_float3``.

The result passes USD's ARKit compliance checker (``usdchecker --arkit``) with no errors and no failed
checks (``tests/test_usdz.py``). Tangents are not stored: USD has no such attribute, so a viewer derives
its own from the UVs for the normal map, as glTF viewers do for a file without TANGENT.
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np

#: Paths inside the package. The textures' start with "./": relative to the layer. (Without it USD
#: takes "textures/x.png" for a search path, and the packager files it under "0/" with a warning.)
LAYER, BASE_COLOR, NORMAL_MAP = "model.usdc", "./textures/base_color.png", "./textures/normal.png"


def usdz_bytes(positions: np.ndarray, faces: np.ndarray, *, normals: np.ndarray, uv: np.ndarray | None = None,
               colors: np.ndarray | None = None, base_color: bytes | None = None, normal_map: bytes | None = None,
               roughness: float = 0.9) -> bytes:
    """One mesh as a USDZ package.

    Args:
        positions: [V, 3] display-frame positions in metres (+Y up).
        faces: [F, 3] counter-clockwise (outward) vertex indices.
        normals: [V, 3] unit vertex normals.
        uv: [V, 2] texture coordinates, v up (needed with ``base_color``).
        colors: [V, 3] vertex colours in linear light, floats in [0, 1] (USD's ``displayColor``), used
            when there is no texture.
        base_color, normal_map: PNG bytes of the base colour (sRGB) and the tangent-space normal map.
        roughness: the material's roughness.

    Returns:
        The .usdz file's bytes.
    """
    from pxr import Kind, Sdf, Usd, UsdGeom, UsdShade, UsdUtils, Vt

    if base_color is not None and uv is None:
        raise ValueError("a base colour texture needs uv")
    with tempfile.TemporaryDirectory(prefix="triplane-usdz-") as folder:
        root = pathlib.Path(folder)
        stage = Usd.Stage.CreateNew(str(root / LAYER))
        UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
        UsdGeom.SetStageMetersPerUnit(stage, 1.0)
        model = UsdGeom.Xform.Define(stage, "/Model")
        stage.SetDefaultPrim(model.GetPrim())
        Usd.ModelAPI(model.GetPrim()).SetKind(Kind.Tokens.component)

        mesh = UsdGeom.Mesh.Define(stage, "/Model/Mesh")
        points = np.ascontiguousarray(positions, dtype=np.float32)
        faces = np.asarray(faces)
        mesh.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(points))
        mesh.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(np.full(len(faces), 3, np.int32)))
        mesh.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(np.ascontiguousarray(faces, np.int32).reshape(-1)))
        mesh.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)  # the default, Catmull-Clark, would round it off
        mesh.CreateOrientationAttr(UsdGeom.Tokens.rightHanded)
        mesh.CreateDoubleSidedAttr(False)
        mesh.CreateNormalsAttr(Vt.Vec3fArray.FromNumpy(np.ascontiguousarray(normals, np.float32)))
        mesh.SetNormalsInterpolation(UsdGeom.Tokens.vertex)
        mesh.CreateExtentAttr(Vt.Vec3fArray.FromNumpy(np.stack([points.min(0), points.max(0)])))

        material = UsdShade.Material.Define(stage, "/Model/Material")
        surface = _shader(stage, "/Model/Material/Surface", "UsdPreviewSurface")
        surface.CreateInput("metallic", Sdf.ValueTypeNames.Float).Set(0.0)
        surface.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(float(roughness))
        material.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")
        diffuse = surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f)

        if base_color is not None:
            UsdGeom.PrimvarsAPI(mesh).CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray, UsdGeom.Tokens.vertex) \
                .Set(Vt.Vec2fArray.FromNumpy(np.ascontiguousarray(uv, np.float32)))
            reader = _shader(stage, "/Model/Material/UV", "UsdPrimvarReader_float2")
            reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("st")
            reader.CreateOutput("result", Sdf.ValueTypeNames.Float2)
            _write(root / BASE_COLOR, base_color)
            albedo = _texture(stage, "/Model/Material/BaseColor", BASE_COLOR, reader, "sRGB")
            diffuse.ConnectToSource(albedo.CreateOutput("rgb", Sdf.ValueTypeNames.Float3))
            if normal_map is not None:
                _write(root / NORMAL_MAP, normal_map)
                bumps = _texture(stage, "/Model/Material/Normal", NORMAL_MAP, reader, "raw")
                bumps.CreateInput("scale", Sdf.ValueTypeNames.Float4).Set((2.0, 2.0, 2.0, 1.0))
                bumps.CreateInput("bias", Sdf.ValueTypeNames.Float4).Set((-1.0, -1.0, -1.0, 0.0))
                surface.CreateInput("normal", Sdf.ValueTypeNames.Normal3f).ConnectToSource(
                    bumps.CreateOutput("rgb", Sdf.ValueTypeNames.Float3))
        elif colors is not None:
            linear = np.ascontiguousarray(colors, np.float32)
            mesh.CreateDisplayColorPrimvar(UsdGeom.Tokens.vertex).Set(Vt.Vec3fArray.FromNumpy(linear))
            reader = _shader(stage, "/Model/Material/Colors", "UsdPrimvarReader_float3")
            reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("displayColor")
            reader.CreateInput("fallback", Sdf.ValueTypeNames.Float3).Set((0.5, 0.5, 0.5))
            diffuse.ConnectToSource(reader.CreateOutput("result", Sdf.ValueTypeNames.Float3))
        else:
            diffuse.Set((0.8, 0.8, 0.8))

        UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(material)
        stage.GetRootLayer().Save()
        package = root / "model.usdz"
        if not UsdUtils.CreateNewARKitUsdzPackage(Sdf.AssetPath(str(root / LAYER)), str(package)):
            raise RuntimeError("USD could not write the USDZ package")
        return package.read_bytes()


def _shader(stage, path: str, shader_id: str):
    from pxr import UsdShade

    shader = UsdShade.Shader.Define(stage, path)
    shader.CreateIdAttr(shader_id)
    return shader


def _texture(stage, path: str, file: str, reader, color_space: str):
    """A ``UsdUVTexture`` of ``file`` read through ``reader``'s UVs, clamped at the atlas's borders."""
    from pxr import Sdf

    texture = _shader(stage, path, "UsdUVTexture")
    texture.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(Sdf.AssetPath(file))
    texture.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(reader.GetOutput("result"))
    texture.CreateInput("wrapS", Sdf.ValueTypeNames.Token).Set("clamp")
    texture.CreateInput("wrapT", Sdf.ValueTypeNames.Token).Set("clamp")
    texture.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set(color_space)
    return texture


def _write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


__all__ = ["usdz_bytes"]
