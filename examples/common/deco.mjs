// Shared by the Node runner (../node/run.mjs) and the web pages (../web/): reading a DeCo graph's
// metadata, checking a feed against the graph's declared inputs, and the safetensors format.
// Plain ES module, no dependencies, so that it runs in Node and in the browser alike.

/** An error in what the user gave (model file, inputs): the programs print it as one line. */
export class InputError extends Error {}

// ------------------------------------------------------------------------------ ONNX metadata
// `deco export-onnx` records its settings in the ModelProto's metadata_props (field 14, entries
// {key = 1, value = 2}). onnxruntime's JavaScript API does not expose them, so we walk the
// top level of the protobuf ourselves: every other field is skipped by its length, the graph
// included, so this costs nothing even for a large model.

function varint(bytes, pos) {
  let value = 0;
  let scale = 1;
  for (;;) {
    if (pos >= bytes.length) throw new InputError('model: truncated ONNX file');
    const b = bytes[pos++];
    value += (b & 0x7f) * scale; // multiplication, not shifts: lengths may exceed 2^31
    scale *= 128;
    if (b < 0x80) return [value, pos];
  }
}

/** Calls fn(field, bytes) for each length-delimited field of one protobuf message. */
function eachField(bytes, fn) {
  let pos = 0;
  while (pos < bytes.length) {
    let tag;
    [tag, pos] = varint(bytes, pos);
    const field = Math.floor(tag / 8);
    const wire = tag % 8;
    if (wire === 0) [, pos] = varint(bytes, pos);
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      let length;
      [length, pos] = varint(bytes, pos);
      if (pos + length > bytes.length) throw new InputError('model: truncated ONNX file');
      fn(field, bytes.subarray(pos, pos + length));
      pos += length;
    } else throw new InputError(`model: not an ONNX file (protobuf wire type ${wire})`);
  }
}

/** The metadata_props of an ONNX model given as bytes, as a plain object of strings. */
export function onnxMetadata(bytes) {
  const utf8 = new TextDecoder();
  const props = {};
  eachField(bytes, (field, entry) => {
    if (field !== 14) return;
    let key = '';
    let value = '';
    eachField(entry, (f, b) => {
      if (f === 1) key = utf8.decode(b);
      if (f === 2) value = utf8.decode(b);
    });
    props[key] = value;
  });
  return props;
}

/** The DeCo config recorded by the export (an object), or null when there is none. */
export function decoConfig(metadata) {
  try {
    return metadata.config ? JSON.parse(metadata.config) : null;
  } catch {
    return null;
  }
}

// ------------------------------------------------------------------------------- feed checks
const shapeText = (shape) => `(${shape.join(', ')})`;

/**
 * Checks `feeds` ({name: ort.Tensor}) against the graph's declared inputs (session.inputNames
 * and session.inputMetadata) before running it, so that a wrong input gives one clear line
 * instead of a kernel's error deep inside the graph: every input present and no other, the
 * element type, the rank, every fixed dimension, each named dimension ("batch", "height", ...)
 * the same wherever it appears, and, when the graph records a DeCo config, an image size that
 * is a multiple of the patch size. Throws InputError.
 */
export function checkFeeds(session, feeds, config = null) {
  const declared = session.inputNames;
  const missing = declared.filter((n) => !(n in feeds));
  const extra = Object.keys(feeds).filter((n) => !declared.includes(n));
  if (missing.length || extra.length) {
    const parts = [];
    if (missing.length) parts.push(`missing ${missing.join(', ')}`);
    if (extra.length) parts.push(`unexpected ${extra.join(', ')}`);
    throw new InputError(`inputs: ${parts.join('; ')} (the graph takes ${declared.join(', ')})`);
  }
  const named = {};
  const metadata = session.inputMetadata ?? [];
  for (const meta of metadata) {
    if (!meta.isTensor) continue;
    const tensor = feeds[meta.name];
    if (tensor.type !== meta.type) {
      throw new InputError(`${meta.name}: expected ${meta.type}, got ${tensor.type}`);
    }
    const dims = tensor.dims;
    const wrong = () => new InputError(
      `${meta.name}: expected shape ${shapeText(meta.shape)}, got ${shapeText(dims)}`);
    if (dims.length !== meta.shape.length) throw wrong();
    meta.shape.forEach((d, i) => {
      if (typeof d === 'number' && d >= 0 && dims[i] !== d) throw wrong();
      if (typeof d === 'string' && d !== '') {
        if (d in named && named[d][0] !== dims[i]) {
          throw new InputError(`${meta.name}: dimension ${d} is ${dims[i]} here but ` +
            `${named[d][0]} in ${named[d][1]}`);
        }
        named[d] = named[d] ?? [dims[i], meta.name];
      }
    });
  }
  const patch = config?.patch_size;
  for (const meta of metadata) {
    const dims = feeds[meta.name].dims;
    if (patch && meta.isTensor && dims.length === 4 && (dims[2] % patch || dims[3] % patch)) {
      throw new InputError(`${meta.name}: height and width must be multiples of the patch ` +
        `size ${patch}, got ${dims[2]}x${dims[3]}`);
    }
  }
}

// ------------------------------------------------------------------------------- safetensors
// The format: an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw
// little-endian bytes. Typed arrays use the platform's byte order, little-endian on every
// machine onnxruntime ships for (x86-64, arm64).
const SAFETENSORS_TYPES = {
  F32: ['float32', Float32Array], F64: ['float64', Float64Array], I64: ['int64', BigInt64Array],
  I32: ['int32', Int32Array], U8: ['uint8', Uint8Array], I8: ['int8', Int8Array],
  F16: ['float16', Uint16Array], BOOL: ['bool', Uint8Array],
};
const ORT_TO_SAFETENSORS = Object.fromEntries(
  Object.entries(SAFETENSORS_TYPES).map(([code, [type]]) => [type, code]));

/** The `__metadata__` of safetensors bytes (an object of strings; {} when there is none). */
export function safetensorsMetadata(bytes, what = 'inputs') {
  if (bytes.length < 8) throw new InputError(`${what}: not a safetensors file (too short)`);
  const length = Number(new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getBigUint64(0, true));
  if (8 + length > bytes.length) throw new InputError(`${what}: not a safetensors file (bad header)`);
  try {
    return JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + length))).__metadata__ ?? {};
  } catch {
    throw new InputError(`${what}: not a safetensors file (header is not JSON)`);
  }
}

/** Parses safetensors bytes into {name: {type, dims, data}} (type: onnxruntime's name). */
export function readSafetensors(bytes, what = 'inputs') {
  if (bytes.length < 8) throw new InputError(`${what}: not a safetensors file (too short)`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const length = Number(view.getBigUint64(0, true));
  if (8 + length > bytes.length) throw new InputError(`${what}: not a safetensors file (bad header)`);
  let header;
  try {
    header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + length)));
  } catch {
    throw new InputError(`${what}: not a safetensors file (header is not JSON)`);
  }
  const out = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const known = SAFETENSORS_TYPES[entry.dtype];
    if (!known) throw new InputError(`${what}: ${name} has dtype ${entry.dtype}, not supported`);
    const [begin, end] = entry.data_offsets;
    // A copy: the slice then starts on a fresh, aligned buffer, as typed arrays need.
    const raw = bytes.slice(8 + length + begin, 8 + length + end);
    const [type, Array] = known;
    const count = entry.shape.reduce((a, b) => a * b, 1);
    if (raw.byteLength !== count * Array.BYTES_PER_ELEMENT) {
      throw new InputError(`${what}: ${name} holds ${raw.byteLength} bytes for shape ` +
        `${shapeText(entry.shape)}`);
    }
    out[name] = { type, dims: entry.shape, data: new Array(raw.buffer) };
  }
  return out;
}

/** safetensors bytes of {name: {type, dims, data}} (onnxruntime tensors qualify). */
export function writeSafetensors(tensors) {
  const header = {};
  const chunks = [];
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    const code = ORT_TO_SAFETENSORS[t.type];
    if (!code) throw new Error(`${name}: cannot store element type ${t.type} in safetensors`);
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    header[name] = { dtype: code, shape: Array.from(t.dims), data_offsets: [offset, offset + bytes.length] };
    chunks.push(bytes);
    offset += bytes.length;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  // Spaces align the data to 8 bytes, as the Python writer does.
  const head = new TextEncoder().encode(JSON.stringify(header) + ' '.repeat((8 - (json.length % 8)) % 8));
  const out = new Uint8Array(8 + head.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  let pos = 8 + head.length;
  for (const c of chunks) {
    out.set(c, pos);
    pos += c.length;
  }
  return out;
}
