// Runs the Khronos glTF validator (npm `gltf-validator`) on one file and prints its JSON report.
// Usage: node tests/gltf_validate.mjs FILE.glb   (the package installed under tests/.node: tests/node_packages.py)
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { createRequire } from "node:module";

const require = createRequire(new URL("./.node/node_modules/", import.meta.url));
const validator = require("gltf-validator");

const path = process.argv[2];
const report = await validator.validateBytes(new Uint8Array(readFileSync(path)), {
  uri: basename(path),
  maxIssues: 0, // report every issue
  writeTimestamp: false,
});
process.stdout.write(JSON.stringify(report));
