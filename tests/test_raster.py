"""The torch rasteriser (raster) and flat-triangle coverage (coverage): nvdiffrast's conventions, pixel by pixel.

(The nvdiffrast back-end is compared with this one in tests/test_cuda.py, on a GPU.)
"""

import numpy as np
import pytest
import torch
import trimesh

from triplane_turbo.texturing.raster import interpolate, rasterize, resolve_backend


def clip(points_xy, z=0.0, w=1.0):
    """[V, 2] screen-space points in [-1, 1] -> clip coordinates with the given z/w and w."""
    p = torch.as_tensor(points_xy, dtype=torch.float32)
    z = torch.as_tensor(z, dtype=torch.float32).expand(len(p))
    w = torch.as_tensor(w, dtype=torch.float32).expand(len(p))
    return torch.stack([p[:, 0] * w, p[:, 1] * w, z * w, w], dim=1)


def pixel_centres(height, width):
    """Clip x, y of every pixel centre, [H, W] each (row 0 at clip y = -1)."""
    ys = (torch.arange(height) + 0.5) / height * 2 - 1
    xs = (torch.arange(width) + 0.5) / width * 2 - 1
    return torch.meshgrid(ys, xs, indexing="ij")[::-1]


def test_output_layout_and_barycentrics():
    # one triangle; the barycentric weights blend the vertices back into the pixel centre
    vertices = [[-0.9, -0.8], [0.7, -0.6], [0.1, 0.9]]
    faces = torch.tensor([[0, 1, 2]])
    rast = rasterize(clip(vertices, z=0.25), faces, (64, 48))
    assert rast.shape == (1, 64, 48, 4) and rast.dtype == torch.float32
    covered = rast[0, ..., 3] > 0
    assert 0.2 < covered.float().mean() < 0.6
    assert torch.all(rast[0, ..., 3][covered] == 1) and torch.all(rast[0][~covered] == 0)
    assert torch.allclose(rast[0, ..., 2][covered], torch.tensor(0.25))
    positions = torch.tensor(vertices + [[0, 0]])[:3]
    blended = interpolate(positions, rast, faces)[0]
    x, y = pixel_centres(64, 48)
    error = (blended[covered] - torch.stack([x, y], -1)[covered]).abs().max(-1).values
    # exact inside; at the rim, a sample the 1/16-pixel snapping lets in gets clamped weights
    assert error.median() < 1e-6 and error.max() < 2 / 48 / 16
    # u belongs to faces[:, 0], v to faces[:, 1]: the pixel nearest each vertex has weight ~1 there
    u, v = rast[0, ..., 0], rast[0, ..., 1]
    near_first = torch.argmin(((x - vertices[0][0]) ** 2 + (y - vertices[0][1]) ** 2 + 10 * ~covered).flatten())
    near_second = torch.argmin(((x - vertices[1][0]) ** 2 + (y - vertices[1][1]) ** 2 + 10 * ~covered).flatten())
    assert u.flatten()[near_first] > 0.9 and v.flatten()[near_second] > 0.9


def test_row_zero_is_the_bottom():
    lower_half = [[-1, -1], [1, -1], [-1, 0]]
    rast = rasterize(clip(lower_half), torch.tensor([[0, 1, 2]]), (8, 8))[0]
    rows = (rast[..., 3] > 0).any(dim=1)
    assert rows[:4].all() and not rows[4:].any()


def test_shared_edges_are_covered_exactly_once():
    """A fan of triangles whose edges run through pixel centres: every pixel centre inside the fan is
    drawn by exactly one triangle, none outside (no cracks, no double coverage)."""
    size = 16
    centre = [0.0, 0.0]
    ring = [[np.cos(a), np.sin(a)] for a in np.linspace(0, 2 * np.pi, 9)[:-1]]
    # snap the ring to pixel centres so that edges pass exactly through samples
    ring = [[(np.floor((x * 0.8 + 1) / 2 * size) + 0.5) / size * 2 - 1,
             (np.floor((y * 0.8 + 1) / 2 * size) + 0.5) / size * 2 - 1] for x, y in ring]
    vertices = torch.tensor([centre] + ring, dtype=torch.float32)
    faces = torch.tensor([[0, 1 + i, 1 + (i + 1) % 8] for i in range(8)])
    counts = sum((rasterize(clip(vertices), faces[i:i + 1], (size, size))[0, ..., 3] > 0).int() for i in range(8))
    together = rasterize(clip(vertices), faces, (size, size))[0, ..., 3] > 0
    assert counts.max() == 1  # no pixel drawn by two triangles
    assert torch.equal(counts.bool(), together)  # the union, nothing lost when drawn together
    # every pixel centre strictly inside a triangle is covered, none strictly outside all of them
    x, y = pixel_centres(size, size)
    samples = torch.stack([x, y], -1).double().reshape(-1, 1, 2)
    a, b, c = (vertices.double()[faces[:, k]][None] for k in range(3))

    def edge(p, q):
        return (q[..., 0] - p[..., 0]) * (samples[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (samples[..., 0] - p[..., 0])

    signs = torch.stack([edge(a, b), edge(b, c), edge(c, a)], -1)  # [pixels, triangles, 3], fan wound CCW
    strictly_inside = (signs > 1e-9).all(-1).any(-1).reshape(size, size)
    strictly_outside = (signs < -1e-9).any(-1).all(-1).reshape(size, size)
    assert torch.all(together[strictly_inside]) and not torch.any(together[strictly_outside])
    assert (~strictly_inside & ~strictly_outside).sum() > 4  # samples on shared edges were really tested


def test_the_nearest_fragment_wins_in_either_order():
    square = [[-1, -1], [1, -1], [1, 1], [-1, 1]]
    near = clip(square, z=-0.5)
    far = clip(square, z=0.5)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    for first, second, winner in ((near, far, {1, 2}), (far, near, {3, 4})):
        rast = rasterize(torch.cat([first, second]), faces, (8, 8))[0]
        assert set(rast[..., 3].unique().tolist()) == winner
        assert torch.allclose(rast[..., 2], torch.tensor(-0.5))


def test_fragments_outside_the_depth_range_are_discarded():
    rast = rasterize(clip([[-1, -1], [1, -1], [0, 1]], z=1.5), torch.tensor([[0, 1, 2]]), (8, 8))
    assert not (rast[..., 3] > 0).any()


def test_perspective_correct_interpolation():
    """A plane tilted in depth under a perspective camera: interpolating its 3D points gives, at each
    pixel, the point where that pixel's ray meets the plane."""
    world = torch.tensor([[-1.0, -1.0, 2.0], [1.0, -1.0, 2.0], [1.0, 1.0, 5.0], [-1.0, 1.0, 5.0]])
    focal = 1.5
    # camera at the origin looking down +z; clip = (f x, f y, z', z) with w = depth
    clip_positions = torch.stack([focal * world[:, 0], focal * world[:, 1], world[:, 2] * 0.1, world[:, 2]], 1)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast = rasterize(clip_positions, faces, (32, 32))
    points = interpolate(world, rast, faces)[0]
    covered = rast[0, ..., 3] > 0
    x, y = pixel_centres(32, 32)
    ray = torch.stack([x / focal, y / focal, torch.ones_like(x)], -1)  # direction with z = 1
    # the plane through the four points: y/… ; solve depth t along the ray: point = t * ray
    normal = torch.linalg.cross(world[1] - world[0], world[3] - world[0])
    t = (normal @ world[0]) / (ray @ normal)
    expected = ray * t[..., None]
    assert covered.float().mean() > 0.2
    assert torch.allclose(points[covered], expected[covered], atol=1e-4)
    # a screen-linear blend would be far off on this steep plane
    screen_linear = (rast[0, ..., :1] * world[faces[rast[0, ..., 3].long().clamp(min=1) - 1][..., 0]]).sum(-1)
    assert not torch.allclose(screen_linear[covered], expected[covered][..., 2], atol=1e-2)


def test_a_triangle_behind_the_camera_is_dropped():
    behind = clip([[-1, -1], [1, -1], [0, 1]], w=-1.0)
    assert not (rasterize(behind, torch.tensor([[0, 1, 2]]), (8, 8))[..., 3] > 0).any()


def test_batches_empty_meshes_and_bad_input():
    square = clip([[-1, -1], [1, -1], [1, 1], [-1, 1]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast = rasterize(torch.stack([square, square * torch.tensor([0.5, 0.5, 1, 1])]), faces, (8, 8))
    assert rast.shape == (2, 8, 8, 4) and (rast[0, ..., 3] > 0).all() and (rast[1, ..., 3] > 0).float().mean() == 0.25
    assert torch.equal(rasterize(square, faces[:0], (4, 4)), torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, V, 4\]"):
        rasterize(square[:, :3], faces, (4, 4))
    with pytest.raises(ValueError, match="resolution"):
        rasterize(square, faces, (0, 4))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="nvdiffrast"):
        resolve_backend("nvdiffrast", torch.device("cpu"))


def test_many_small_triangles_in_bounded_chunks(monkeypatch):
    """The candidate pairs are processed in chunks; a tiny chunk limit changes nothing."""
    from triplane_turbo.texturing import coverage

    sphere = trimesh.creation.icosphere(subdivisions=3)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32) * 0.9
    positions = torch.cat([vertices[:, :2], vertices[:, 2:] * 0.5, torch.ones(len(vertices), 1)], 1)
    faces = torch.tensor(sphere.faces)
    whole = rasterize(positions, faces, (96, 96))
    monkeypatch.setattr(coverage, "PAIRS_PER_CHUNK", 97)
    assert torch.equal(rasterize(positions, faces, (96, 96)), whole)
    # the front-most surface is drawn: z/w is the smaller of the two sphere depths
    covered = whole[0, ..., 3] > 0
    assert (whole[0, ..., 2][covered] <= 0.01).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_drawn_triangles_match_a_pixel_by_pixel_reference(seed):
    """Overlapping triangles at varied depths and w (a few behind the camera, a few reaching millions
    of pixels out, slivers, edges through pixel centres): at every pixel, the drawn triangle is the
    one a per-pixel evaluation in int64 picks (vertices snapped to 1/16 pixel, top-left rule,
    screen-linear z/w in [-1, 1], the nearest as float32, ties to the lower id)."""
    rng = np.random.default_rng(seed)
    height, width, scale = 30, 40, 16
    # vertices on half pixels (many pixel centres fall exactly on edges: the top-left rule decides)
    pixels = np.stack([rng.integers(-10, 2 * 45, 70) / 2, rng.integers(-10, 2 * 35, 70) / 2], 1)
    ndc = pixels / (width, height) * 2 - 1
    ndc[60:64] *= 3e5  # millions of pixels out (a vertex near the camera plane): tested in int64, not in spans
    w = rng.uniform(0.5, 3.0, 70).astype(np.float32)
    w[:3] = -1.0  # behind the camera
    z = rng.uniform(-1.3, 1.3, 70).astype(np.float32)
    positions = clip(ndc, z=z, w=w)
    faces = rng.integers(0, 70, (60, 3))
    faces[5:8, 2] = faces[5:8, 1]  # degenerate
    drawn = rasterize(positions, torch.tensor(faces), (height, width))[0, ..., 3].long().numpy() - 1

    p = positions.numpy()
    safe_w = np.where(p[:, 3] > 0, p[:, 3], np.float32(1))
    sx_v = np.round(((p[:, 0] / safe_w + 1) * 0.5 * width * scale)).astype(np.int64)  # float32, as the GPU
    sy_v = np.round(((p[:, 1] / safe_w + 1) * 0.5 * height * scale)).astype(np.int64)
    z_ndc = (p[:, 2] / safe_w).astype(np.float64)
    rows, cols = np.indices((height, width))
    sx, sy = scale * cols + scale // 2, scale * rows + scale // 2
    best_depth = np.full((height, width), np.inf, np.float32)
    expected = np.full((height, width), -1)
    for f, (a, b, c) in enumerate(faces):  # ascending ids: a later triangle wins only if strictly nearer
        if (p[[a, b, c], 3] <= 0).any():
            continue
        x, y = sx_v[[a, b, c]], sy_v[[a, b, c]]
        area = (x[1] - x[0]) * (y[2] - y[0]) - (y[1] - y[0]) * (x[2] - x[0])
        if area == 0:
            continue
        inside, edges = np.ones((height, width), bool), []
        for k in range(3):
            ax, ay, bx, by = x[(k + 1) % 3], y[(k + 1) % 3], x[(k + 2) % 3], y[(k + 2) % 3]
            edge = (bx - ax) * (sy - ay) - (by - ay) * (sx - ax)
            dx, dy = (bx - ax) * np.sign(area), (by - ay) * np.sign(area)
            inside &= (edge * np.sign(area) > 0) | ((edge == 0) & ((dy < 0) | ((dy == 0) & (dx > 0))))
            edges.append(edge)
        depth = sum(e / area * z_ndc[v] for e, v in zip(edges, (a, b, c)))
        nearer = inside & (depth >= -1) & (depth <= 1) & (depth.astype(np.float32) < best_depth)
        best_depth[nearer], expected[nearer] = depth[nearer].astype(np.float32), f
    assert (expected >= 0).mean() > 0.5 and len(np.unique(expected)) > 20
    assert np.array_equal(drawn, expected)


# -------------------------------------------------------------------------------------------------
# rasterize_coverage: flat triangles in pixel units, as UV atlases are rasterised for baking
# -------------------------------------------------------------------------------------------------
def pixel_xy(clip_xy, size):
    """Clip coordinates [V, 2] -> the pixel frame rasterize_coverage reads (same float32 arithmetic)."""
    return (torch.as_tensor(clip_xy, dtype=torch.float32) + 1) * 0.5 * size


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coverage_owner_and_count_match_rasterize(seed, monkeypatch):
    """Random overlapping triangles (and slivers) at one depth: the owner is the lowest id that
    ``rasterize`` draws, and the count is how many triangles cover each pixel, drawn one by one."""
    from triplane_turbo.texturing import coverage
    from triplane_turbo.texturing.coverage import rasterize_coverage

    rng = np.random.default_rng(seed)
    points = rng.uniform(-1.1, 1.1, (60, 2))
    points[50:53] = points[40:43] + rng.normal(0, 1e-3, (3, 2))  # near-degenerate triangles too
    faces = torch.tensor(rng.integers(0, 60, (40, 3)))
    size = (37, 53)
    clip_xy = torch.tensor(points, dtype=torch.float32)
    xy = torch.stack([(clip_xy[:, 0] + 1) * 0.5 * size[1], (clip_xy[:, 1] + 1) * 0.5 * size[0]], 1)
    owner, count = rasterize_coverage(xy, faces, size)
    expected = rasterize(clip(clip_xy), faces, size)[0, ..., 3].long() - 1
    assert torch.equal(owner, expected)
    one_by_one = sum((rasterize(clip(clip_xy), faces[i:i + 1], size)[0, ..., 3] > 0).int() for i in range(len(faces)))
    assert torch.equal(count, one_by_one) and int(count.max()) >= 3
    monkeypatch.setattr(coverage, "PAIRS_PER_CHUNK", 5)  # chunking changes nothing
    assert all(torch.equal(a, b) for a, b in zip(rasterize_coverage(xy, faces, size), (owner, count)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("far", [False, True], ids=["wide-image", "near-the-bound"])
def test_coverage_is_exact_at_the_largest_coordinates(seed, far):
    """At the finest snapping (1/1024 pixel), with edges through pixel centres (the top-left rule
    decides): a 4096-wide image, and vertices up to 30,000 pixels outside a small one, where the
    edge functions reach 2^51 (the refusal starts near 32,700 pixels): the coverage equals each
    pixel's edge functions evaluated one by one in int64. Coordinates beyond the exact range, or not
    finite, are refused; a vertex no face uses does not count."""
    from triplane_turbo.texturing.coverage import rasterize_coverage

    rng = np.random.default_rng(seed)
    height, bits = 24, 10
    scale = 1 << bits
    # vertices on a half-pixel grid (many centres fall exactly on edges)
    if far:  # half of them near the image, half up to 30,000 pixels away: long edges cross it
        width = 64
        near = np.stack([rng.integers(-20, 2 * 80, 24) / 2, rng.integers(-20, 2 * 30, 24) / 2], 1)
        xy = torch.tensor(np.concatenate([near, rng.integers(-60000, 60000, (21, 2)) / 2]))
    else:  # some far right of a wide image
        width = 4096
        xy = torch.tensor(np.stack([rng.integers(-100, 2 * 4200, 45) / 2, rng.integers(-6, 2 * 28, 45) / 2], 1))
    faces = torch.tensor(rng.integers(0, 45, (30, 3)))
    owner, count = rasterize_coverage(xy, faces, (height, width), subpixel_bits=bits)

    x, y = (np.round(xy.numpy() * scale).astype(np.int64)[faces.numpy()][..., k] for k in (0, 1))  # [F, 3]
    rows, cols = np.indices((height, width))
    sx, sy = scale * cols + scale // 2, scale * rows + scale // 2
    expected_owner = np.full((height, width), -1)
    expected_count = np.zeros((height, width), np.int64)
    for f in reversed(range(len(faces))):
        area = (x[f, 1] - x[f, 0]) * (y[f, 2] - y[f, 0]) - (y[f, 1] - y[f, 0]) * (x[f, 2] - x[f, 0])
        if area == 0:
            continue
        inside = np.ones((height, width), bool)
        for k in range(3):
            ax, ay, bx, by = x[f, (k + 1) % 3], y[f, (k + 1) % 3], x[f, (k + 2) % 3], y[f, (k + 2) % 3]
            dx, dy = (bx - ax) * np.sign(area), (by - ay) * np.sign(area)
            edge = dx * (sy - ay) - dy * (sx - ax)
            inside &= (edge > 0) | ((edge == 0) & ((dy < 0) | ((dy == 0) & (dx > 0))))
        expected_owner[inside] = f
        expected_count += inside
    # overlaps; near the bound the huge triangles' edges cross the small image (the counts vary)
    varied = len(np.unique(expected_count)) > 3 if far else (expected_count == 1).sum() > 1000
    assert (expected_count > 1).any() and varied
    assert np.array_equal(owner.numpy(), expected_owner) and np.array_equal(count.numpy(), expected_count)
    with pytest.raises(ValueError, match="too far outside"):
        rasterize_coverage(torch.cat([xy, torch.tensor([[34000.0, 0.0]])]),
                           torch.cat([faces, torch.tensor([[0, 1, 45]])]), (height, 64), subpixel_bits=bits)
    with pytest.raises(ValueError, match="not finite"):
        rasterize_coverage(torch.cat([xy, torch.tensor([[float("nan"), 0.0]])]),
                           torch.cat([faces, torch.tensor([[0, 1, 45]])]), (height, width), subpixel_bits=bits)
    unused = rasterize_coverage(torch.cat([xy, torch.tensor([[1e12, 0.0]])]), faces, (height, width),
                                subpixel_bits=bits)
    assert torch.equal(unused[0], owner)


def test_coverage_of_a_closed_fan_is_exactly_one():
    from triplane_turbo.texturing.coverage import rasterize_coverage

    size = 32
    ring = np.stack([np.cos(np.linspace(0, 2 * np.pi, 13)[:-1]), np.sin(np.linspace(0, 2 * np.pi, 13)[:-1])], 1)
    xy = torch.tensor(np.concatenate([[[16.0, 16.0]], 16 + 12 * ring]))
    faces = torch.tensor([[0, 1 + i, 1 + (i + 1) % 12] for i in range(12)])
    owner, count = rasterize_coverage(xy, faces, (size, size))
    assert int(count.max()) == 1 and int((count == 1).sum()) > 300
    assert torch.equal(owner >= 0, count == 1)


def test_coverage_snapping_and_winding():
    """Two vertices a twentieth of a pixel apart: on the 1/16 grid the sliver between them flips and
    its neighbours overlap by a pixel; on the 1/256 grid nothing does."""
    from triplane_turbo.texturing.coverage import rasterize_coverage, triangles_covering

    # three triangles of a marching-cubes mesh in a box-projected atlas (texels 80-96, 220-236 of 1024²)
    xy = torch.tensor([[8.5561676, 6.92593384], [9.39015961, 4.84587097], [12.41894531, 12.01960754],
                       [12.46572113, 12.0383606], [14.52418518, 6.90432739]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2], [1, 4, 3]])  # all counter-clockwise, the middle one a sliver
    owner, coarse = rasterize_coverage(xy, faces, (16, 16))
    _, ccw = rasterize_coverage(xy, faces, (16, 16), counted="ccw")
    _, fine = rasterize_coverage(xy, faces, (16, 16), subpixel_bits=8)
    # snapped, the sliver turns clockwise over one pixel centre, and its neighbours overlap there
    assert int(coarse.max()) == 3 and int((coarse > 1).sum()) == 1
    assert triangles_covering(xy, faces, coarse > 1).tolist() == [0, 1, 2] and int(owner[coarse > 1]) == 0
    assert int(ccw.max()) == 2 and torch.equal(ccw > 1, coarse > 1)  # the clockwise sliver not counted
    assert int(fine.max()) == 1 and torch.equal(fine > 0, coarse > 0)
    with pytest.raises(ValueError, match="counted"):
        rasterize_coverage(xy, faces, (8, 8), counted="cw")
    with pytest.raises(ValueError, match="subpixel_bits"):
        rasterize_coverage(xy, faces, (8, 8), subpixel_bits=0)
