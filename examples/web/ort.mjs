// onnxruntime-web (WebAssembly) as the pages use it, loaded from the npm package beside this
// folder (examples/node_modules): serve examples/ and nothing is fetched from elsewhere.
import * as ort from '../node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';
import { decoConfig, InputError, onnxMetadata } from '../common/deco.mjs';

ort.env.wasm.wasmPaths = new URL('../node_modules/onnxruntime-web/dist/', import.meta.url).href;
// One thread: several need SharedArrayBuffer, i.e. a server sending cross-origin-isolation
// headers, which a plain static server does not; results are the same either way.
ort.env.wasm.numThreads = 1;

export { ort };

/**
 * Fetches and opens a graph: {session, metadata, config}. A missing file (or any HTTP error)
 * is an InputError whose message says what to do.
 */
export async function loadModel(url) {
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    throw new InputError(`model: could not fetch ${url} (${err.message})`);
  }
  if (!response.ok) {
    throw new InputError(`model: ${url} not found (HTTP ${response.status}). Export one with ` +
      '`deco export-onnx runs/RUN/checkpoint.safetensors examples/web/model.onnx --generator`');
  }
  const bytes = new Uint8Array(await response.arrayBuffer());
  const metadata = onnxMetadata(bytes);
  let session;
  try {
    // Errors only: a float16 graph makes the CPU kernels warn once per node they cannot constant-fold.
    session = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'], logSeverityLevel: 3 });
  } catch (err) {
    throw new InputError(`model: ${url} is not a loadable ONNX model (${String(err.message).split('\n')[0]})`);
  }
  return { session, metadata, config: decoConfig(metadata) };
}
