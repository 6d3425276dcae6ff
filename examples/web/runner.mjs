// window.decoRun(modelUrl, feeds) runs one graph with onnxruntime-web: feeds and the result are
// {name: {type, dims, base64}} (base64 of the little-endian bytes, so float32 values travel
// exactly); a user error comes back as {error: message}.
import { checkFeeds, InputError } from '../common/deco.mjs';
import { loadModel, ort } from './ort.mjs';

const ARRAYS = { float32: Float32Array, int64: BigInt64Array, uint8: Uint8Array, float16: Uint16Array };

function decode({ type, dims, base64 }) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new ort.Tensor(type, new ARRAYS[type](bytes.buffer), dims);
}

function encode(tensor) {
  const d = tensor.data;
  const bytes = new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return { type: tensor.type, dims: Array.from(tensor.dims), base64: btoa(text) };
}

window.decoRun = async (modelUrl, feeds) => {
  try {
    const { session, config } = await loadModel(modelUrl);
    const tensors = Object.fromEntries(Object.entries(feeds).map(([k, v]) => [k, decode(v)]));
    checkFeeds(session, tensors, config);
    const results = await session.run(tensors);
    return Object.fromEntries(Object.entries(results).map(([k, v]) => [k, encode(v)]));
  } catch (err) {
    if (err instanceof InputError) return { error: err.message };
    throw err;
  }
};
document.body.dataset.state = 'ready';
