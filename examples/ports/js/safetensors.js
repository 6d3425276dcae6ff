// Reading and writing safetensors files by hand, with Node's standard library only.
//
// Format (https://github.com/huggingface/safetensors): 8 bytes little-endian unsigned header
// length N, N bytes of JSON header, then the raw data. The header maps each tensor name to
// {dtype, shape, data_offsets: [begin, end]} (offsets relative to the start of the data) and may
// hold "__metadata__", a map of string to string. Values are little-endian, C order.

import fs from "node:fs";
import path from "node:path";

// dtype -> [bytes per element, DataView getter, DataView setter]
const DTYPES = {
  F64: [8, "getFloat64", "setFloat64"],
  F32: [4, "getFloat32", "setFloat32"],
  I64: [8, "getBigInt64", "setBigInt64"],
  I32: [4, "getInt32", "setInt32"],
};

/** Thrown for a file that is not a readable safetensors file; the message names the file. */
export class SafetensorsError extends Error {}

function product(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

function decodeTensor(file, name, entry, data) {
  const spec = DTYPES[entry.dtype];
  if (!spec) throw new SafetensorsError(`${file}: tensor ${name} has dtype ${entry.dtype}, expected one of ${Object.keys(DTYPES)}`);
  const [size, getter] = spec;
  const { shape, data_offsets: offsets } = entry;
  if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
    throw new SafetensorsError(`${file}: tensor ${name} has shape ${JSON.stringify(shape)}, expected a list of sizes`);
  }
  const count = product(shape);
  const [begin, end] = offsets ?? [];
  if (!Number.isInteger(begin) || end - begin !== count * size || begin < 0 || end > data.byteLength) {
    throw new SafetensorsError(`${file}: tensor ${name} has data_offsets ${JSON.stringify(offsets)}, expected ${count * size} bytes inside the ${data.byteLength} bytes of data`);
  }
  const view = new DataView(data.buffer, data.byteOffset + begin, end - begin);
  const values = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    const v = view[getter](i * size, true);
    if (typeof v === "bigint" && (v > BigInt(Number.MAX_SAFE_INTEGER) || v < -BigInt(Number.MAX_SAFE_INTEGER))) {
      throw new SafetensorsError(`${file}: tensor ${name} holds ${v}, beyond the integers a double holds exactly`);
    }
    values[i] = Number(v);
  }
  return { dtype: entry.dtype, shape: shape.slice(), data: values };
}

/**
 * Read a safetensors file. Returns {metadata, tensors}: metadata the "__metadata__" map (or {}),
 * tensors a map name -> {dtype, shape, data}, data a Float64Array (integers converted exactly).
 */
export function readSafetensors(file) {
  const bytes = fs.readFileSync(file);
  if (bytes.length < 8) throw new SafetensorsError(`${file}: ${bytes.length} bytes, too short for a safetensors file`);
  const headerLength = bytes.readBigUInt64LE(0);
  if (headerLength > BigInt(bytes.length - 8)) {
    throw new SafetensorsError(`${file}: header length ${headerLength} exceeds the file size ${bytes.length}`);
  }
  const n = Number(headerLength);
  let header;
  try {
    header = JSON.parse(bytes.subarray(8, 8 + n).toString("utf8"));
  } catch (err) {
    throw new SafetensorsError(`${file}: header is not JSON (${err.message})`);
  }
  if (header === null || typeof header !== "object" || Array.isArray(header)) {
    throw new SafetensorsError(`${file}: header is not a JSON object`);
  }
  const data = bytes.subarray(8 + n);
  const tensors = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name !== "__metadata__") tensors[name] = decodeTensor(file, name, entry, data);
  }
  return { metadata: header.__metadata__ ?? {}, tensors };
}

/** The bytes of a safetensors file holding `tensors` (name -> {dtype, shape, data}) and `metadata`. */
export function encodeSafetensors(tensors, metadata = {}) {
  const header = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  const parts = [];
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    const spec = DTYPES[t.dtype];
    if (!spec) throw new TypeError(`tensor ${name}: dtype ${t.dtype}, expected one of ${Object.keys(DTYPES)}`);
    const [size, , setter] = spec;
    const count = product(t.shape);
    if (t.data.length !== count) {
      throw new RangeError(`tensor ${name}: ${t.data.length} values for shape ${JSON.stringify(t.shape)}`);
    }
    const buf = Buffer.alloc(count * size);
    const view = new DataView(buf.buffer, buf.byteOffset, buf.length);
    const integer = t.dtype.startsWith("I");
    for (let i = 0; i < count; i++) view[setter](i * size, integer && size === 8 ? BigInt(t.data[i]) : t.data[i], true);
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + buf.length] };
    parts.push(buf);
    offset += buf.length;
  }
  // Pad the header with spaces so that the data starts on an 8-byte boundary, as the
  // reference writer does (readers may then map the values in place).
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  return Buffer.concat([prefix, Buffer.from(json, "utf8"), ...parts]);
}

/** Write a safetensors file atomically: a temporary file in the same folder, then a rename. */
export function writeSafetensors(file, tensors, metadata = {}) {
  const bytes = encodeSafetensors(tensors, metadata);
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  try {
    fs.writeFileSync(tmp, bytes);
    fs.renameSync(tmp, file);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
}
