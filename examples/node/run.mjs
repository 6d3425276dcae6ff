#!/usr/bin/env node
// Runs a graph written by `deco export-onnx` (velocity, cfg or generator) with onnxruntime-node
// on the CPU.
//
//   node run.mjs MODEL.onnx INPUTS.safetensors OUT.safetensors
//
// INPUTS holds one tensor per graph input, named as the graph names them (a velocity graph: x, t
// and y or text; a generator: noise, labels or text and null_text, guidance), e.g. written by
// Python's `safetensors.numpy.save_file`. OUT receives every output of the graph. A missing
// file or inputs that do not fit the graph give one line on stderr and exit status 2; a failure
// inside onnxruntime gives one line and exit status 1. OUT is written whole or not at all.
import fs from 'node:fs';
import path from 'node:path';
import * as ort from 'onnxruntime-node';
import { writeAtomically } from '../common/files.mjs';
import { checkFeeds, decoConfig, InputError, onnxMetadata, readSafetensors, writeSafetensors }
  from '../common/deco.mjs';

const USAGE = 'usage: node run.mjs MODEL.onnx INPUTS.safetensors OUT.safetensors';

function readFile(file, what) {
  if (!fs.existsSync(file) || !fs.statSync(file).isFile()) {
    throw new InputError(`${what}: no such file: ${file}`);
  }
  return new Uint8Array(fs.readFileSync(file));
}

async function main(argv) {
  if (argv.length !== 3) throw new InputError(USAGE);
  const [modelPath, inputsPath, outPath] = argv;
  const modelBytes = readFile(modelPath, 'model');
  const inputs = readSafetensors(readFile(inputsPath, 'inputs'), 'inputs');
  if (!fs.existsSync(path.dirname(path.resolve(outPath)))) {
    throw new InputError(`output: folder ${path.dirname(outPath)} does not exist`);
  }
  const config = decoConfig(onnxMetadata(modelBytes));
  let session;
  try {
    // From the path, not the bytes: onnxruntime then finds an external data file beside it.
    session = await ort.InferenceSession.create(modelPath, { executionProviders: ['cpu'] });
  } catch (err) {
    throw new InputError(`model: ${modelPath} is not a loadable ONNX model (${firstLine(err)})`);
  }
  const feeds = {};
  for (const [name, t] of Object.entries(inputs)) feeds[name] = new ort.Tensor(t.type, t.data, t.dims);
  checkFeeds(session, feeds, config);
  const results = await session.run(feeds);
  writeAtomically(outPath, writeSafetensors(results));
}

const firstLine = (err) => String(err?.message ?? err).split('\n')[0].slice(0, 300);

main(process.argv.slice(2)).catch((err) => {
  console.error(`run.mjs: ${err instanceof InputError ? 'error: ' : 'onnxruntime failed: '}${firstLine(err)}`);
  process.exit(err instanceof InputError ? 2 : 1);
});
