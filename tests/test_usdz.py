"""USDZ: USD's ARKit compliance checker (what ``usdchecker --arkit`` runs) and USD's validators find
nothing for a textured, a simplified-with-normal-map and a vertex-coloured mesh of the tiny model; the
stage is Y up in metres with the GLB's very vertices, faces, normals and UVs, and its material reads
the images and colours the GLB has."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import trimesh
from PIL import Image

from triplane_turbo.export import export_mesh, linear_vertex_colors
from triplane_turbo.isosurface import simplify
from triplane_turbo.texturing.bake import bake_texture, srgb_to_linear, vertex_colors

from .test_export import glb_accessors

pxr = pytest.importorskip("pxr", reason="pip install usd-core (in requirements.txt)")
from pxr import Usd, UsdGeom, UsdShade, UsdUtils, UsdValidation  # noqa: E402


@pytest.fixture(scope="module")
def cases(tiny_pipe):
    """{name: (mesh, texture)}: the tiny model's chair (R = 64) textured, simplified with a normal map,
    and with vertex colours."""
    out = tiny_pipe("a wooden chair", seed=3, mesh_resolution=64, texture="vertex")
    fields, triplane, mesh = tiny_pipe.fields, out.triplane, out.meshes[0]
    plain = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    simplified = simplify(plain, 1500)
    coloured = plain.copy()
    coloured.visual.vertex_colors = vertex_colors(fields, triplane, plain.vertices)
    return {"textured": (plain, bake_texture(fields, triplane, plain, 128)),
            "normal map": (simplified, bake_texture(fields, triplane, simplified, 128, normal_map=True)),
            "vertex colours": (coloured, None)}


@pytest.fixture(scope="module")
def files(cases, tmp_path_factory):
    """{name: (usdz path, glb path)} of each case."""
    folder = tmp_path_factory.mktemp("usdz")
    return {name: (export_mesh(mesh, folder / f"{i}.usdz", texture=texture),
                   export_mesh(mesh, folder / f"{i}.glb", texture=texture))
            for i, (name, (mesh, texture)) in enumerate(cases.items())}


def the_mesh(stage) -> UsdGeom.Mesh:
    (mesh,) = [UsdGeom.Mesh(p) for p in stage.Traverse() if p.IsA(UsdGeom.Mesh)]
    return mesh


def source_shader(shader_input) -> UsdShade.Shader:
    """The shader an input of a shader is connected to."""
    source, _, _ = shader_input.GetConnectedSource()
    return UsdShade.Shader(source.GetPrim())


@pytest.mark.parametrize("case", ["textured", "normal map", "vertex colours"])
def test_the_arkit_compliance_checker_and_usds_validators_find_nothing(files, case):
    usdz, _ = files[case]
    checker = UsdUtils.ComplianceChecker(arkit=True)
    checker.CheckCompliance(str(usdz))
    assert (checker.GetErrors(), checker.GetFailedChecks(), checker.GetWarnings()) == ([], [], [])
    validators = UsdValidation.ValidationRegistry().GetOrLoadAllValidators()
    errors = UsdValidation.ValidationContext(validators).Validate(Usd.Stage.Open(str(usdz)))
    assert [error.GetMessage() for error in errors] == []


@pytest.mark.parametrize("case", ["textured", "normal map", "vertex colours"])
def test_the_stage_is_y_up_in_metres_with_the_glbs_vertices(files, case):
    usdz, glb = files[case]
    stage = Usd.Stage.Open(str(usdz))
    assert UsdGeom.GetStageUpAxis(stage) == UsdGeom.Tokens.y and UsdGeom.GetStageMetersPerUnit(stage) == 1.0
    assert stage.GetDefaultPrim().GetPath() == "/Model"
    mesh = the_mesh(stage)
    assert mesh.GetSubdivisionSchemeAttr().Get() == UsdGeom.Tokens.none
    accessors = glb_accessors(glb)
    points = np.array(mesh.GetPointsAttr().Get(), np.float32)
    np.testing.assert_array_equal(points, accessors["POSITION"])  # exactly: the same float32 values
    assert set(mesh.GetFaceVertexCountsAttr().Get()) == {3}
    np.testing.assert_array_equal(np.array(mesh.GetFaceVertexIndicesAttr().Get()), accessors["indices"][:, 0])
    np.testing.assert_array_equal(np.array(mesh.GetNormalsAttr().Get(), np.float32), accessors["NORMAL"])
    np.testing.assert_allclose(np.array(mesh.GetExtentAttr().Get()), [points.min(0), points.max(0)])
    if "TEXCOORD_0" in accessors:
        st = np.array(UsdGeom.PrimvarsAPI(mesh).GetPrimvar("st").Get(), np.float64)
        glb_uv = accessors["TEXCOORD_0"].astype(np.float64)
        # glTF's v runs down
        np.testing.assert_allclose(st, np.stack([glb_uv[:, 0], 1 - glb_uv[:, 1]], axis=1), atol=1e-7)


def package_image(usdz, shader: UsdShade.Shader) -> np.ndarray:
    """The image a UsdUVTexture reads, decoded from the package."""
    path = shader.GetInput("file").Get().path.removeprefix("./")
    with zipfile.ZipFile(usdz) as package:
        return np.asarray(Image.open(io.BytesIO(package.read(path))))


@pytest.mark.parametrize("case", ["textured", "normal map"])
def test_the_material_reads_the_baked_images(files, cases, case):
    usdz, _ = files[case]
    _, texture = cases[case]
    stage = Usd.Stage.Open(str(usdz))
    material, _ = UsdShade.MaterialBindingAPI(the_mesh(stage).GetPrim()).ComputeBoundMaterial()
    surface = material.ComputeSurfaceSource()[0]
    assert surface.GetShaderId() == "UsdPreviewSurface" and surface.GetInput("metallic").Get() == 0.0
    albedo = source_shader(surface.GetInput("diffuseColor"))
    assert albedo.GetShaderId() == "UsdUVTexture" and albedo.GetInput("sourceColorSpace").Get() == "sRGB"
    np.testing.assert_array_equal(package_image(usdz, albedo), texture.base_color)
    normal = surface.GetInput("normal")
    assert bool(normal) == (texture.normal is not None)  # the input exists only with a normal map
    if texture.normal is not None:
        assert normal.HasConnectedSource()
        bumps = source_shader(normal)
        assert bumps.GetInput("sourceColorSpace").Get() == "raw"
        assert tuple(bumps.GetInput("scale").Get()) == (2, 2, 2, 1)
        assert tuple(bumps.GetInput("bias").Get()) == (-1, -1, -1, 0)
        np.testing.assert_array_equal(package_image(usdz, bumps), texture.normal)


def test_vertex_colours_are_the_display_colour_in_linear_light(files, cases):
    usdz, glb = files["vertex colours"]
    mesh, _ = cases["vertex colours"]
    stage = Usd.Stage.Open(str(usdz))
    usd_mesh = the_mesh(stage)
    primvar = usd_mesh.GetDisplayColorPrimvar()
    assert primvar.GetInterpolation() == UsdGeom.Tokens.vertex
    srgb = np.asarray(mesh.visual.vertex_colors)[:, :3]
    display = np.array(primvar.Get(), np.float64)
    np.testing.assert_allclose(display, srgb_to_linear(srgb / 255.0), atol=1e-6)
    # the GLB's 8-bit COLOR_0 is the same linear colour, rounded
    np.testing.assert_allclose(display * 255, linear_vertex_colors(np.asarray(mesh.visual.vertex_colors))[:, :3],
                               atol=0.5 + 1e-6)
    material, _ = UsdShade.MaterialBindingAPI(usd_mesh.GetPrim()).ComputeBoundMaterial()
    reader = source_shader(material.ComputeSurfaceSource()[0].GetInput("diffuseColor"))
    assert reader.GetShaderId() == "UsdPrimvarReader_float3" and reader.GetInput("varname").Get() == "displayColor"
