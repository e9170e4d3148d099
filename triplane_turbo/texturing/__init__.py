"""Texturing: from a mesh and the colour field to a baked image (and tangents), or vertex colours.

The chain, in the order a bake runs it (each module readable on its own):

1. ``uv``        a UV atlas: box-projected charts packed on shelves (xatlas' conformal charts as the
                 alternative, in ``bake.unwrap``);
2. ``coverage``  which pixel centres flat triangles cover, exactly (the atlas in UV space; also the
                 first step of the torch rasteriser);
3. ``texels``    every covered texel's triangle and barycentrics, the ring just outside each chart, and
                 the gutters that copy a nearby covered texel;
4. ``bake``      the colour field at those texels into an sRGB image (``bake_texture``), the normal map
                 from the SDF's gradient, vertex colours as the light fallback;
5. ``tangents``  MikkTSpace frames, so that every glTF viewer decodes the normal map alike.

Beside the chain, the screen-space rasteriser the previews, training and evaluation share:
``raster`` (nvdiffrast's semantics: torch everywhere, nvdiffrast on CUDA) and ``antialias``.
"""

from .bake import MAX_TEXTURE_SIZE, MIN_TEXTURE_SIZE, UVTexture, bake_texture, unwrap, validate_texture_size, vertex_colors

__all__ = ["MAX_TEXTURE_SIZE", "MIN_TEXTURE_SIZE", "UVTexture", "bake_texture", "unwrap", "validate_texture_size",
           "vertex_colors"]
