// MikkTSpace tangents from the reference implementation's WebAssembly build (npm `mikktspace`,
// what three.js and glTF-Transform use), for tests/test_tangents.py.
// Usage: node tests/mikktspace_reference.mjs IN.bin OUT.bin
//   IN.bin: uint32 corner count N, then float32 positions [N, 3], normals [N, 3], uvs [N, 2]
//           (unindexed triangles, three corners each; uvs with v up, MikkTSpace's own convention)
//   OUT.bin: float32 tangents [N, 4] (xyz, w = bitangent sign), as the library returns them
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(new URL("./.node/node_modules/", import.meta.url));
const { generateTangents } = require("mikktspace");

const [input, output] = process.argv.slice(2);
const bytes = readFileSync(input);
const count = bytes.readUInt32LE(0);
const floats = new Float32Array(bytes.buffer, bytes.byteOffset + 4, count * 8);
const positions = floats.slice(0, count * 3);
const normals = floats.slice(count * 3, count * 6);
const uvs = floats.slice(count * 6, count * 8);
const tangents = generateTangents(positions, normals, uvs);
writeFileSync(output, Buffer.from(tangents.buffer, tangents.byteOffset, tangents.byteLength));
