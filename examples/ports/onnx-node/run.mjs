#!/usr/bin/env node
// The forward vectors of spec/vectors through the file protocol, computed by onnxruntime-node
// from the ONNX graph of each vector's model: a check of the exported graphs in a runtime that is
// not Python (spec/vectors/README.md, "File protocol").
//
//   deco conformance --export-vector-model MODELS/deco.onnx --architecture deco      (and baseline, t2i)
//   node examples/ports/onnx-node/run.mjs VECTORS OUT MODELS
//   deco conformance --outputs OUT
//
// For every vector of component `forward` or `t2i_forward` in VECTORS, the graph is
// MODELS/<architecture>.onnx (the architecture of the vector's config). Its inputs are the
// vector's `in.*` tensors under the graph's names (x, t, y or text), float64 cast to float32 as
// the graph declares; its output `v` is written as `out` (float32) to OUT/<vector>.safetensors.
// A vector of another component, or whose graph file is absent or holds another config, is
// not written (the kit reports it skipped); each is one line on stdout. A missing folder, an
// unreadable file or a feed the graph does not take is one line on stderr and exit status 2;
// a failure inside onnxruntime is one line and exit status 1.
//
// DECO_ONNX_NODE_DEFECT=negate negates every output: a planted defect for the test-suite
// (tests/test_conformance_node.py), which checks that the kit then fails exactly these vectors.
import fs from 'node:fs';
import path from 'node:path';
import * as ort from 'onnxruntime-node';
import { writeAtomically } from '../../common/files.mjs';
import {
  checkFeeds, decoConfig, InputError, onnxMetadata, readSafetensors, safetensorsMetadata,
  writeSafetensors,
} from '../../common/deco.mjs';

const USAGE = 'usage: node run.mjs VECTORS_DIR OUT_DIR MODELS_DIR';
const FORWARD = new Set(['forward', 't2i_forward']);
const DEFECTS = new Set(['negate']);

function folder(dir, what) {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) {
    throw new InputError(`${what}: no such folder: ${dir}`);
  }
  return dir;
}


/** The key of `vectorConfig` whose value the graph's config does not share, or null. */
function configDifference(vectorConfig, graphConfig) {
  if (graphConfig === null) return 'config (the graph records none)';
  for (const [key, value] of Object.entries(vectorConfig)) {
    if (JSON.stringify(graphConfig[key]) !== JSON.stringify(value)) return key;
  }
  return null;
}

/** The graph's feed: each `in.<name>` under <name>, float64 narrowed to float32. */
function feedsFor(inputs) {
  const feeds = {};
  for (const [key, t] of Object.entries(inputs)) {
    if (!key.startsWith('in.')) continue;
    const name = key.slice(3);
    feeds[name] = t.type === 'float64'
      ? new ort.Tensor('float32', Float32Array.from(t.data), t.dims)
      : new ort.Tensor(t.type, t.data, t.dims);
  }
  return feeds;
}

class Graphs {
  constructor(dir) {
    this.dir = dir;
    this.loaded = new Map(); // architecture -> {session, config} or null when absent
  }

  async get(architecture) {
    if (!this.loaded.has(architecture)) this.loaded.set(architecture, await this.load(architecture));
    return this.loaded.get(architecture);
  }

  async load(architecture) {
    const file = path.join(this.dir, `${architecture}.onnx`);
    if (!fs.existsSync(file)) return null;
    const config = decoConfig(onnxMetadata(new Uint8Array(fs.readFileSync(file))));
    try {
      const session = await ort.InferenceSession.create(file, { executionProviders: ['cpu'] });
      return { file, session, config };
    } catch (err) {
      throw new InputError(`model: ${file} is not a loadable ONNX model (${firstLine(err)})`);
    }
  }
}

/** Runs one vector file; returns the line to print. */
async function runVector(file, outDir, graphs, defect) {
  const name = path.basename(file, '.safetensors');
  const bytes = new Uint8Array(fs.readFileSync(file));
  const meta = safetensorsMetadata(bytes, name);
  if (!FORWARD.has(meta.component)) return `skipped ${name}: component ${meta.component} is not a forward pass`;
  let config;
  try {
    config = JSON.parse(meta.config ?? '{}');
  } catch {
    throw new InputError(`${name}: the metadata config is not JSON`);
  }
  const graph = await graphs.get(config.architecture);
  if (graph === null) return `skipped ${name}: no graph ${path.join(graphs.dir, `${config.architecture}.onnx`)}`;
  const differs = configDifference(config, graph.config);
  if (differs !== null) return `skipped ${name}: ${graph.file} holds another config (${differs})`;
  const feeds = feedsFor(readSafetensors(bytes, name));
  try {
    checkFeeds(graph.session, feeds, graph.config);
  } catch (err) {
    throw new InputError(`${name}: ${err.message}`);
  }
  const { v } = await graph.session.run(feeds);
  const data = defect === 'negate' ? v.data.map((a) => -a) : v.data;
  writeAtomically(path.join(outDir, `${name}.safetensors`),
    writeSafetensors({ out: { type: 'float32', dims: v.dims, data } }));
  return `wrote ${name} (${graph.file})`;
}

async function main(argv) {
  if (argv.length !== 3) throw new InputError(USAGE);
  const [vectorsDir, outDir, modelsDir] = [folder(argv[0], 'vectors'), folder(argv[1], 'output'),
    folder(argv[2], 'models')];
  const defect = process.env.DECO_ONNX_NODE_DEFECT;
  if (defect && !DEFECTS.has(defect)) {
    throw new InputError(`DECO_ONNX_NODE_DEFECT: unknown defect ${defect} (known: ${[...DEFECTS]})`);
  }
  const files = fs.readdirSync(vectorsDir).filter((f) => f.endsWith('.safetensors')).sort();
  if (files.length === 0) throw new InputError(`vectors: no *.safetensors in ${vectorsDir}`);
  const graphs = new Graphs(modelsDir);
  for (const f of files) console.log(await runVector(path.join(vectorsDir, f), outDir, graphs, defect));
}

const firstLine = (err) => String(err?.message ?? err).split('\n')[0].slice(0, 300);

main(process.argv.slice(2)).catch((err) => {
  console.error(`run.mjs: ${err instanceof InputError ? 'error: ' : 'onnxruntime failed: '}${firstLine(err)}`);
  process.exit(err instanceof InputError ? 2 : 1);
});
