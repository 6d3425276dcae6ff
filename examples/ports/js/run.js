#!/usr/bin/env node
// The conformance loop of the JavaScript port (spec/vectors/README.md, file protocol):
//
//   node run.js VECTORS_DIR OUT_DIR [--precision float64|float32]
//
// For every VECTORS_DIR/<vector>.safetensors whose metadata `component` this port implements,
// compute the component from the vector's inputs (`in.*`) and scalar arguments (metadata `args`)
// and write OUT_DIR/<vector>.safetensors holding the result as the tensor `out`. Vectors of
// other components are not written (the kit counts them as skipped). Exit status: 0, 1 if a
// vector could not be read or computed, 2 (one line on stderr) for a usage error.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as deco from "./deco.js";
import { readSafetensors, writeSafetensors } from "./safetensors.js";

/** component -> (inputs, args) -> result {shape, data}; the argument names are the vectors'. */
export const COMPONENTS = {
  rgb_to_ycbcr: (inp) => deco.rgbToYcbcr(inp.x),
  block_dct: (inp) => deco.blockDct(inp.x),
  // One vector holds several (quality, gamma) pairs; the expected output stacks their tables.
  frequency_weights: (inp) => {
    const n = inp.quality.data.length;
    const data = new Float64Array(n * 192);
    for (let i = 0; i < n; i++) data.set(deco.frequencyWeights(inp.quality.data[i], inp.gamma.data[i]).data, i * 192);
    return { shape: [n, 3, 8, 8], data };
  },
  // A scalar, stored with shape (1,) like the vector's `expected` (safetensors has no 0-d tensor).
  frequency_aware_loss: (inp, args) => ({
    shape: [1],
    data: Float64Array.of(deco.frequencyAwareLoss(inp.pred, inp.target, args.quality, args.gamma)),
  }),
  timestep_features: (inp) => deco.timestepFeatures(inp.t),
  rope_angles: (_, args) => deco.ropeAngles(args.grid_h, args.grid_w, args.head_dim),
  dct_position_features: (_, args) => deco.dctPositionFeatures(args.patch_size),
  time_grid: (_, args) => deco.timeGrid(args.steps, args.timeshift),
};

class UsageError extends Error {}

function parseArgs(argv) {
  const positional = [];
  let precision = "float64";
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--precision") {
      precision = argv[++i];
      if (precision !== "float64" && precision !== "float32") {
        throw new UsageError(`--precision: expected float64 or float32, got ${precision}`);
      }
    } else if (argv[i].startsWith("--")) {
      throw new UsageError(`${argv[i]}: unknown option (usage: node run.js VECTORS_DIR OUT_DIR [--precision float64|float32])`);
    } else {
      positional.push(argv[i]);
    }
  }
  if (positional.length !== 2) {
    throw new UsageError("usage: node run.js VECTORS_DIR OUT_DIR [--precision float64|float32]");
  }
  const defect = process.env.DECO_JS_DEFECT;
  if (defect && !deco.DEFECTS.includes(defect)) {
    throw new UsageError(`DECO_JS_DEFECT: expected one of ${deco.DEFECTS.join(", ")}, got ${defect}`);
  }
  return { vectors: positional[0], out: positional[1], precision };
}

function vectorFiles(folder) {
  let names;
  try {
    names = fs.readdirSync(folder);
  } catch (err) {
    throw new UsageError(`VECTORS_DIR: cannot read folder ${folder} (${err.code ?? err.message})`);
  }
  const files = names.filter((n) => n.endsWith(".safetensors")).sort();
  if (files.length === 0) throw new UsageError(`VECTORS_DIR: no .safetensors vector files in ${folder}`);
  return files;
}

/**
 * Create OUT_DIR (and its parents) if needed. Not mkdirSync(out, {recursive: true}) alone: on a
 * file system that answers ENOENT for any new name (/proc) Node's recursive mkdir never returns.
 */
function makeFolder(out) {
  try {
    if (!fs.existsSync(out)) {
      fs.mkdirSync(path.dirname(path.resolve(out)), { recursive: true });
      fs.mkdirSync(out);
    }
    if (!fs.statSync(out).isDirectory()) throw Object.assign(new Error("not a folder"), { code: "ENOTDIR" });
  } catch (err) {
    throw new UsageError(`OUT_DIR: cannot create folder ${out} (${err.code ?? err.message})`);
  }
}

/** Run one vector file; returns "wrote", "skipped" or "error" and prints one line about it. */
function runVector(file, outDir, precision) {
  const name = path.basename(file, ".safetensors");
  try {
    const { metadata, tensors } = readSafetensors(file);
    const fn = COMPONENTS[metadata.component];
    if (!fn) {
      console.log(`skipped ${name} (${metadata.component}: not implemented)`);
      return "skipped";
    }
    const inputs = {};
    for (const [key, t] of Object.entries(tensors)) if (key.startsWith("in.")) inputs[key.slice(3)] = t;
    const result = fn(inputs, JSON.parse(metadata.args ?? "{}"));
    const dtype = precision === "float64" ? "F64" : "F32";
    writeSafetensors(path.join(outDir, `${name}.safetensors`), { out: { dtype, shape: result.shape, data: result.data } },
      { component: metadata.component, precision });
    console.log(`wrote   ${name} (${metadata.component}, shape ${result.shape.join("x")})`);
    return "wrote";
  } catch (err) {
    console.log(`ERROR   ${name}: ${err.message}`);
    return "error";
  }
}

export function main(argv) {
  try {
    const { vectors, out, precision } = parseArgs(argv);
    const files = vectorFiles(vectors);
    makeFolder(out);
    const counts = { wrote: 0, skipped: 0, error: 0 };
    for (const f of files) counts[runVector(path.join(vectors, f), out, precision)]++;
    console.log(`${counts.wrote} written, ${counts.skipped} skipped, ${counts.error} errors (${precision}) -> ${out}`);
    return counts.error ? 1 : 0;
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`run.js: ${err.message}`);
    return 2;
  }
}

if (process.argv[1] && fs.realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = main(process.argv.slice(2));
}
