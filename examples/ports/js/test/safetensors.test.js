// node --test: the hand-written safetensors reader and writer.
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { encodeSafetensors, readSafetensors, SafetensorsError, writeSafetensors } from "../safetensors.js";

const folder = fs.mkdtempSync(path.join(os.tmpdir(), "deco-js-"));
after(() => fs.rmSync(folder, { recursive: true, force: true }));

function tmpFile(name) {
  return path.join(folder, name);
}

test("round trip of float64, float32 and int64 tensors with metadata", () => {
  const file = tmpFile("a.safetensors");
  const tensors = {
    x: { dtype: "F64", shape: [2, 3], data: Float64Array.of(0, -1.5, Math.PI, 1e-300, -0, 7) },
    w: { dtype: "F32", shape: [3], data: Float64Array.of(0.1, 2, -3) },
    y: { dtype: "I64", shape: [2], data: Float64Array.of(-4, 2 ** 40) },
  };
  writeSafetensors(file, tensors, { component: "demo", args: '{"a": 1}' });
  const { metadata, tensors: back } = readSafetensors(file);
  assert.deepEqual(metadata, { component: "demo", args: '{"a": 1}' });
  assert.deepEqual(back.x.shape, [2, 3]);
  assert.deepEqual(Array.from(back.x.data), Array.from(tensors.x.data));
  // float32 storage rounds to the nearest float32, which Math.fround computes independently
  assert.deepEqual(Array.from(back.w.data), [Math.fround(0.1), 2, -3]);
  assert.deepEqual(Array.from(back.y.data), [-4, 2 ** 40]);
  assert.equal(back.y.dtype, "I64");
});

test("layout: 8-byte little-endian header length, data 8-byte aligned, raw little-endian values", () => {
  const bytes = encodeSafetensors({ v: { dtype: "F64", shape: [1], data: Float64Array.of(1) } });
  const n = Number(bytes.readBigUInt64LE(0));
  assert.equal((8 + n) % 8, 0);
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString());
  assert.deepEqual(header.v, { dtype: "F64", shape: [1], data_offsets: [0, 8] });
  // 1.0 as an IEEE-754 double, little-endian: 00 .. 00 f0 3f
  assert.deepEqual(Array.from(bytes.subarray(8 + n)), [0, 0, 0, 0, 0, 0, 0xf0, 0x3f]);
});

test("a corrupt file is a SafetensorsError naming the file", () => {
  const file = tmpFile("bad.safetensors");
  fs.writeFileSync(file, Buffer.from([255, 0, 0, 0, 0, 0, 0, 0, 123]));
  assert.throws(() => readSafetensors(file), (err) => err instanceof SafetensorsError && err.message.startsWith(file));
  const short = encodeSafetensors({ v: { dtype: "F64", shape: [2], data: Float64Array.of(1, 2) } });
  fs.writeFileSync(file, short.subarray(0, short.length - 1));
  assert.throws(() => readSafetensors(file), /data_offsets/);
});
