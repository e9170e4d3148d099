#!/usr/bin/env python
"""Benchmark of UV texture baking: unwrap + rasterise + colour field (+ normal map), per mesh size.

The fields are the published heads' sizes (32-channel 256² planes, MLPs 64-64) with random weights
and a random triplane, scaled so the SDF is a smooth blob like a real object's; the mesh is its
marching-cubes isosurface at R = 160, simplified to each ``--faces`` count. What is timed is
``texture.bake_texture`` — what the pipeline runs per object for ``texture="uv"`` — split into its
parts (the unwrap timed on its own as well).

    python bench/texture.py                                   # CPU: 5k and 20k faces at 1024²
    python bench/texture.py --faces 5000 20000 0 --sizes 1024 2048 --normal-map --json tex.json \\
        --record BENCHMARKS.md                                # 0 = the unsimplified isosurface
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.tables import add_rows, commit, machine  # noqa: E402

SECTION = "## Texture baking"
TABLE = """| date | commit | machine | device | threads | faces | texture | normal map | unwrap s | bake s (unwrap included) | charts | texels baked |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/texture.py", description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, nargs="+", default=[5000, 20000],
                        help="target face counts (0: the unsimplified isosurface)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024], help="texture sides")
    parser.add_argument("--normal-map", action="store_true", help="also bake (and time) the normal map")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
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

    from triplane_turbo import texture
    from triplane_turbo.isosurface import simplify

    if args.threads:
        torch.set_num_threads(args.threads)
    fields, triplane, full = build(args.device)
    print(f"isosurface: {len(full.vertices)} vertices, {len(full.faces)} faces", file=sys.stderr)
    rows = []
    for faces in args.faces:
        mesh = simplify(full, faces) if faces else full
        for size in args.sizes:
            unwrap_s, bake_s = [], []
            for _ in range(args.runs):
                start = time.perf_counter()
                vmapping, uv_faces, uv = texture.unwrap(mesh.vertices, mesh.faces, size)
                unwrap_s.append(time.perf_counter() - start)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                baked = texture.bake_texture(fields, triplane, mesh, size, normal_map=args.normal_map)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                bake_s.append(time.perf_counter() - start)
            mask, _, _ = texture.texel_samples(torch.from_numpy(uv).to(args.device),
                                               torch.from_numpy(uv_faces).to(args.device), size)
            charts = _chart_count(baked)
            row = dict(faces=len(mesh.faces), size=size, normal_map=args.normal_map,
                       unwrap_s=statistics.median(unwrap_s), bake_s=statistics.median(bake_s),
                       charts=charts, texels=int(mask.sum()))
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
    """Rows go at the end of the texture table (made, with its heading, if missing)."""
    rows = [[result["date"][:10], result["commit"] or "–", result["machine"], result["device"], str(result["threads"]),
             str(row["faces"]), f"{row['size']}²", "yes" if row["normal_map"] else "no", f"{row['unwrap_s']:.2f}",
             f"{row['bake_s']:.2f}", str(row["charts"]), str(row["texels"])] for row in result["rows"]]
    add_rows(path, SECTION, "Measured by `bench/texture.py`.", TABLE, rows)


if __name__ == "__main__":
    sys.exit(main())
