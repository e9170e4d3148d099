#!/usr/bin/env python
"""Benchmark of UV texturing: unwrap + bake (+ normal map) + GLB export, per unwrapper and mesh size.

The fields are the published heads' sizes (32-channel 256² planes, MLPs 64-64) with random weights
and a random triplane, scaled so the SDF is a smooth blob like a real object's; the mesh is its
marching-cubes isosurface at R = 160 (0 faces = unsimplified, the pipeline's default), or that
simplified to each ``--faces`` count. What is timed is ``texture.bake_texture`` — what the pipeline
runs per object for ``texture="uv"`` — with its stages, then ``export.encode_mesh`` to GLB; the
colour error is measured through the exported file: the GLB read back by trimesh, its texture
looked up bilinearly at random surface points, against the colour field there.

    python bench/texture.py                                   # CPU: the R = 160 mesh, 1024², fast and xatlas
    python bench/texture.py --faces 0 20000 --normal-map --json tex.json --record BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.tables import add_rows, commit, machine  # noqa: E402

SECTION = "## UV texturing: unwrap, bake, export"
TABLE = """| date | commit | machine | device | threads | faces | texture | normal map | unwrap | unwrap s | bake s (unwrap included) | export s | total s | colour error (GLB) | charts | texels baked | stages s (raster/colour/normal/image) |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""
INTRO = """Measured by `bench/texture.py`: `texture.bake_texture` (unwrap, rasterisation in UV space, the colour
field at every baked texel, gutter fill; with the normal map also the SDF gradient and MikkTSpace
tangents) and `export.encode_mesh(..., "glb")`, on the published heads' sizes with random weights
shaped into a smooth blob, its R = 160 isosurface (60500 faces: the pipeline's default mesh, not
simplified) or that simplified to the listed face count; median of the runs. *total* = bake + export;
*colour error* = mean |texture − field| over 100k random surface points, read through the exported GLB.
Timings on these shared 2-core machines move by ±10 % between runs."""
def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/texture.py", description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, nargs="+", default=[0],
                        help="target face counts (0: the unsimplified isosurface, the default mesh)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024], help="texture sides")
    parser.add_argument("--unwraps", nargs="+", default=["fast", "xatlas"], choices=("fast", "xatlas"),
                        help="UV unwrappers to compare")
    parser.add_argument("--normal-map", action="store_true", help="also bake (and time) the normal map")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--error-samples", type=int, default=100_000, help="surface points for the colour error")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--record", type=Path, metavar="BENCHMARKS.md", help="add the rows to this file")
    return parser.parse_args(argv)


def build(device: str):
    """Published-size heads with random weights, a random triplane, and its R = 160 isosurface."""
    import torch
    import trimesh

    from triplane_turbo.isosurface import extract_surface, grid_to_world
    from triplane_turbo.triplane import TriplaneFields

    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fields = TriplaneFields(32, (64, 64))
    with torch.no_grad():
        fields.sdf_network.layers[-1].weight.mul_(0.02)  # the sphere prior dominates: a smooth blob
        fields.deformation_network.layers[-1].weight.mul_(0.05)
    fields = fields.to(device).eval().requires_grad_(False)
    triplane = torch.randn((1, 6, 32, 256, 256), generator=generator).to(device)
    triplane = torch.nn.functional.avg_pool2d(triplane.flatten(0, 1), 5, 1, 2).reshape(1, 6, 32, 256, 256) * 3
    with torch.inference_mode():
        sdf = fields.grid_sdf(triplane, 160)[0]
        surface = extract_surface(sdf)
        vertices = grid_to_world(surface.vertices(torch.zeros(len(surface.corners), 3, device=surface.t.device)),
                                 160, fields.bbox)
    return fields, triplane, trimesh.Trimesh(vertices, surface.faces.cpu().numpy(), process=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from triplane_turbo import export
    from triplane_turbo.texturing import bake as texture, texels
    from triplane_turbo.isosurface import simplify

    if args.threads:
        torch.set_num_threads(args.threads)
    fields, triplane, full = build(args.device)
    print(f"isosurface: {len(full.vertices)} vertices, {len(full.faces)} faces", file=sys.stderr)
    rows = []
    for faces in args.faces:
        mesh = simplify(full, faces) if faces else full
        for size in args.sizes:
            for method in args.unwraps:
                runs = []
                for _ in range(args.runs):
                    stages: dict = {}
                    start = time.perf_counter()
                    baked = texture.bake_texture(fields, triplane, mesh, size, normal_map=args.normal_map,
                                                 unwrap=method, timings=stages)
                    middle = time.perf_counter()
                    glb = export.encode_mesh(mesh, "glb", "bench", texture=baked)["bench.glb"]
                    runs.append(dict(stages, bake_s=middle - start, export_s=time.perf_counter() - middle))
                median = {key: statistics.median(run.get(key, 0.0) for run in runs) for key in runs[0]}
                mask, _, _ = texels.texel_samples(torch.from_numpy(baked.uv).to(args.device),
                                                   torch.from_numpy(baked.faces).to(args.device), size)
                row = dict(faces=len(mesh.faces), size=size, normal_map=args.normal_map, unwrap=method,
                           unwrap_s=median["unwrap"], bake_s=median["bake_s"], export_s=median["export_s"],
                           total_s=statistics.median(run["bake_s"] + run["export_s"] for run in runs),
                           stages={key: median.get(key, 0.0) for key in ("rasterize", "color", "normal", "image")},
                           color_error=glb_color_error(glb, fields, triplane, args.error_samples),
                           charts=_chart_count(baked), texels=int(mask.sum()))
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    result = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), commit=commit(),
                  machine=machine(args.device), device=args.device, threads=torch.get_num_threads(),
                  runs=args.runs, rows=rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.record:
        record(args.record, result)
    return 0


def glb_color_error(glb: bytes, fields, triplane, samples: int) -> float:
    """Mean |texture - colour field| at random surface points of a textured GLB, read back as a viewer
    would: trimesh's mesh and UVs, the image looked up bilinearly (v up -> top-down rows)."""
    import numpy as np
    import torch
    import trimesh

    (loaded,) = trimesh.load_scene(io.BytesIO(glb), file_type="glb", process=False).geometry.values()
    image = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"), dtype=np.float64) / 255
    points, face = trimesh.sample.sample_surface(loaded, samples, seed=0)
    bary = trimesh.triangles.points_to_barycentric(loaded.vertices[loaded.faces[face]], points)
    uv = (loaded.visual.uv[loaded.faces[face]] * bary[..., None]).sum(1)
    height, width = image.shape[:2]
    x, y = uv[:, 0] * width - 0.5, (1 - uv[:, 1]) * height - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    texel = lambda r, c: image[np.clip(r, 0, height - 1), np.clip(c, 0, width - 1)]  # noqa: E731
    looked_up = (texel(y0, x0) * (1 - fx) * (1 - fy) + texel(y0, x0 + 1) * fx * (1 - fy)
                 + texel(y0 + 1, x0) * (1 - fx) * fy + texel(y0 + 1, x0 + 1) * fx * fy)
    model = torch.tensor(points[:, [2, 0, 1]], dtype=torch.float32, device=fields.bbox.device)  # display -> model frame
    with torch.inference_mode():
        field = fields.color(triplane, model[None])[0].clamp(0, 1).cpu().numpy()
    return float(np.abs(looked_up - field).mean())


def _chart_count(baked) -> int:
    """Charts = connected groups of faces in UV space (faces sharing a UV vertex)."""
    import numpy as np
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components

    faces = baked.faces
    rows = np.repeat(np.arange(len(faces)), 3)
    graph = scipy.sparse.coo_matrix((np.ones(rows.size), (rows, faces.ravel())),
                                    shape=(len(faces), len(baked.uv))).tocsr()
    return int(connected_components(graph @ graph.T, directed=False)[0])


def record(path: Path, result: dict) -> None:
    """Rows go at the end of the UV texturing table (made, with its heading, if missing)."""
    rows = [[result["date"][:10], result["commit"] or "–", result["machine"], result["device"], str(result["threads"]),
             str(row["faces"]), f"{row['size']}²", "yes" if row["normal_map"] else "no", row["unwrap"],
             f"{row['unwrap_s']:.3f}", f"{row['bake_s']:.3f}", f"{row['export_s']:.3f}", f"{row['total_s']:.3f}",
             f"{row['color_error']:.3g}", str(row["charts"]), str(row["texels"]),
             "/".join(f"{row['stages'][key]:.3f}" for key in ("rasterize", "color", "normal", "image"))]
            for row in result["rows"]]
    add_rows(path, SECTION, INTRO, TABLE, rows)


if __name__ == "__main__":
    sys.exit(main())
