// The digits demo: pick a digit, press Generate, and the generator graph turns noise and the
// label into an image in ONE session.run call; the image is drawn on the canvas.
//
// URL parameters: model (default model.onnx beside this page) and size (H or HxW, for a graph
// exported with a dynamic image size; default: the graph's fixed size, else 32, the digits').
// The noise is N(0, 1) from a seeded generator, unless window.decoNoise holds B*3*H*W numbers
// (the tests put Python's noise there, to compare the pixels with Python's for the same noise).
import { checkFeeds, InputError } from '../common/deco.mjs';
import { loadModel, ort } from './ort.mjs';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
window.decoRuns = 0; // session.run calls, for the tests: one per image

function status(text, kind = 'info') {
  $('status').textContent = text;
  $('status').dataset.kind = kind;
}

function state(name) {
  document.body.dataset.state = name;
}

/** mulberry32 uniforms through Box-Muller: reproducible N(0, 1) noise from an integer seed. */
function gaussianNoise(count, seed) {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 4294967296; // in (0, 1): log is finite
  };
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const r = Math.sqrt(-2 * Math.log(uniform()));
    const phi = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(phi);
    if (i + 1 < count) out[i + 1] = r * Math.sin(phi);
  }
  return out;
}

/** The image size: ?size=, else the graph's fixed noise size, else the recorded resolution, else 32. */
function imageSize(session, metadata) {
  const asked = params.get('size');
  if (asked) {
    const [h, w = h] = asked.split('x').map(Number);
    return [h, w];
  }
  const meta = session.inputMetadata.find((m) => m.name === 'noise');
  const [, , h, w] = meta?.shape ?? [];
  if (typeof h === 'number' && typeof w === 'number') return [h, w];
  const recorded = /^(\d+)x(\d+)$/.exec(metadata.deco_resolution ?? '');
  return recorded ? [Number(recorded[1]), Number(recorded[2])] : [32, 32];
}

/** (1, H, W, 3) uint8 from the graph's `image` output, else from its `sample` in [-1, 1]. */
function rgbOf(results, h, w) {
  if (results.image) return results.image.data;
  const x = results.sample.data; // (1, 3, H, W)
  const rgb = new Uint8Array(h * w * 3);
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < h * w; i++) {
      const v = Math.min(1, Math.max(-1, x[c * h * w + i]));
      rgb[i * 3 + c] = Math.round((v + 1) * 127.5);
    }
  }
  return rgb;
}

function draw(rgb, h, w) {
  const canvas = $('image');
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext('2d');
  const pixels = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    pixels.data.set(rgb.subarray(i * 3, i * 3 + 3), i * 4);
    pixels.data[i * 4 + 3] = 255; // opaque: the canvas then keeps the exact RGB values
  }
  ctx.putImageData(pixels, 0, 0);
}

async function main() {
  state('loading');
  const modelUrl = params.get('model') ?? 'model.onnx';
  const { session, metadata, config } = await loadModel(modelUrl);
  const names = session.inputNames;
  if (!names.includes('noise') || !names.includes('labels')) {
    const graph = metadata.deco_graph ?? 'unknown';
    throw new InputError(`model: ${modelUrl} is a ${graph} graph with inputs ${names.join(', ')}; ` +
      'this page needs the generator of a class model (deco export-onnx CKPT OUT.onnx --generator)');
  }
  const classes = config?.num_classes ?? 10;
  for (let d = 0; d < classes; d++) {
    $('digits').insertAdjacentHTML('beforeend', `<label><input type="radio" name="digit" ` +
      `value="${d}"${d === 0 ? ' checked' : ''}> ${d}</label>`);
  }
  if (names.includes('guidance')) {
    $('guidance-label').hidden = false;
    if (metadata.deco_guidance) $('guidance').value = metadata.deco_guidance; // the export's default
  }
  const [h, w] = imageSize(session, metadata);
  $('generate').disabled = false;
  const sampler = metadata.deco_solver ? ` (${metadata.deco_solver}, ${metadata.deco_steps} steps)` : '';
  status(`Ready: ${modelUrl}${sampler}, ${h}x${w}. Pick a digit and press Generate.`);
  state('ready');
  $('controls').addEventListener('submit', (event) => {
    event.preventDefault();
    generate(session, config, h, w).catch(fail);
  });
}

async function generate(session, config, h, w) {
  state('busy');
  $('generate').disabled = true;
  const digit = Number(document.querySelector('input[name="digit"]:checked').value);
  const count = 3 * h * w;
  const noise = window.decoNoise ? Float32Array.from(window.decoNoise) : gaussianNoise(count, Number($('seed').value));
  const feeds = {
    noise: new ort.Tensor('float32', noise, [1, 3, h, w]),
    labels: new ort.Tensor('int64', BigInt64Array.from([BigInt(digit)]), [1]),
  };
  if (session.inputNames.includes('guidance')) {
    feeds.guidance = new ort.Tensor('float32', Float32Array.from([Number($('guidance').value)]), []);
  }
  checkFeeds(session, feeds, config);
  const started = performance.now();
  window.decoRuns += 1;
  const results = await session.run(feeds);
  const seconds = (performance.now() - started) / 1000;
  draw(rgbOf(results, h, w), h, w);
  window.decoResult = { digit, sample: results.sample ? Array.from(results.sample.data) : null };
  status(`Digit ${digit}: generated in ${seconds.toFixed(2)} s.`);
  $('generate').disabled = false;
  state('done');
}

function fail(err) {
  const known = err instanceof InputError;
  status(known ? err.message : `Error: ${String(err?.message ?? err).split('\n')[0]}`, 'error');
  state('error');
}

main().catch(fail);
