// node --test: the components against the worked examples printed in the spec (independent of
// the conformance vectors, which run.js and tests/test_js_port.py check).
import assert from "node:assert/strict";
import { test } from "node:test";
import * as deco from "../deco.js";

function close(got, expected, rtol, label) {
  const scale = Math.max(...expected.map(Math.abs)) || 1;
  const err = Math.max(...expected.map((e, i) => Math.abs(got[i] - e))) / scale;
  assert.ok(err <= rtol, `${label}: err ${err} > ${rtol} (got ${Array.from(got)})`);
}

const tensor = (shape, fn) => {
  const n = shape.reduce((a, b) => a * b, 1);
  return { shape, data: Float64Array.from({ length: n }, (_, i) => fn(i)) };
};

test("02 §2: DCT matrix rows k = 1 and k = 3, to 6 decimals", () => {
  const C = deco.dctMatrix(8);
  close(C[1], [0.490393, 0.415735, 0.277785, 0.097545, -0.097545, -0.277785, -0.415735, -0.490393], 2e-6, "k=1");
  close(C[3], [0.415735, -0.097545, -0.490393, -0.277785, 0.277785, 0.490393, 0.097545, -0.415735], 2e-6, "k=3");
});

test("02 §3: reflect padding of a row 0 1 2 3 4 gives 0 1 2 3 4 3 2 1", () => {
  // A 5×5 image whose value is its column index; undo the DCT of its one block (X = Cᵀ Y C).
  const Y = deco.blockDct(tensor([1, 1, 5, 5], (i) => i % 5)).data;
  const C = deco.dctMatrix(8);
  const row0 = [];
  for (let j = 0; j < 8; j++) {
    let s = 0;
    for (let u = 0; u < 8; u++) for (let v = 0; v < 8; v++) s += C[u][0] * Y[u * 8 + v] * C[v][j];
    row0.push(s);
  }
  close(row0, [0, 1, 2, 3, 4, 3, 2, 1], 1e-12, "padded row");
  assert.throws(() => deco.blockDct(tensor([1, 1, 4, 8], () => 0)), /^RangeError: x: /);
});

test("02 §4: quality 85 tables, first rows", () => {
  assert.deepEqual(deco.quantisationTable([16, 11, 10, 16, 24, 40, 51, 61], 85), [5, 3, 3, 5, 7, 12, 15, 18]);
  assert.deepEqual(deco.quantisationTable([17, 18, 24, 47, 99, 99, 99, 99], 85), [5, 5, 7, 14, 30, 30, 30, 30]);
  assert.throws(() => deco.qualityScale(101), /^RangeError: quality: /);
  assert.throws(() => deco.qualityScale(85.5), /^TypeError: quality: /);
});

test("02 §5: quality 85 weights, Y row 0 and Cb row 1", () => {
  const w = deco.frequencyWeights(85, 1).data;
  close(w.slice(0, 8), [2.013035, 3.355059, 3.355059, 2.013035, 1.437882, 0.838765, 0.671012, 0.559176], 1e-6, "Y");
  close(w.slice(72, 80), [3.874020, 3.228350, 2.421262, 0.968505, 0.645670, 0.645670, 0.645670, 0.645670], 1e-6, "Cb");
  assert.ok(deco.frequencyWeights(100, 3).data.every((v) => Math.abs(v - 1) < 1e-15));
});

test("02 §6: worked losses (impulse and padded ramp)", () => {
  const impulse = tensor([1, 3, 8, 8], (i) => (i === 0 ? 1 : 0));
  const zero = tensor([1, 3, 8, 8], () => 0);
  for (const [q, want] of [[100, 0.001916004363], [85, 0.002798788661], [50, 0.002790031775]]) {
    close([deco.frequencyAwareLoss(impulse, zero, q, 1)], [want], 1e-9, `impulse q${q}`);
  }
  const pred = tensor([2, 3, 10, 12], (i) => i / 100);
  const target = tensor([2, 3, 10, 12], (i) => Math.cos((3 * i) / 100));
  for (const [q, want] of [[50, 13.1845829425], [85, 12.8532071993], [100, 5.75558618068]]) {
    close([deco.frequencyAwareLoss(pred, target, q, 1)], [want], 1e-10, `ramp q${q}`);
  }
});

test("03 §2: timestep features at t = 0.5 and t = 0", () => {
  const f = deco.timestepFeatures({ shape: [2], data: Float64Array.of(0.5, 0) }).data;
  close([0, 1, 127, 128, 129, 255].map((k) => f[k]),
    [0.87758256, 0.88182126, 0.99870449, 0.47942554, 0.47158378, 0.05088560], 1e-8, "t=0.5");
  assert.ok(f.slice(256, 384).every((v) => v === 1) && f.slice(384).every((v) => v === 0));
});

test("03 §4: RoPE angles, d_h = 8, grids 2×2 and 1×3", () => {
  close(deco.ropeAngles(2, 2, 8).data, [0, 0, 0, 0, 16, 0, 0.16, 0, 0, 16, 0, 0.16, 16, 16, 0.16, 0.16], 1e-15, "2x2");
  close(deco.ropeAngles(1, 3, 8).data, [0, 0, 0, 0, 8, 0, 0.08, 0, 16, 0, 0.16, 0], 1e-15, "1x3");
});

test("03 §6: DCT position features, p = 2", () => {
  const f = deco.dctPositionFeatures(2).data;
  close([f[9], f[64 + 8]], [49 / 113, Math.cos((8 * Math.PI) / 7)], 1e-15, "p=2");
});

test("04 §1: time grids", () => {
  close(deco.timeGrid(4, 3).data, [0, 0.1, 0.25, 0.5, 1], 1e-15, "N=4 s=3");
  close(deco.timeGrid(5, 0.5).data, [0, 1 / 3, 4 / 7, 0.75, 8 / 9, 1], 1e-15, "N=5 s=0.5");
  assert.throws(() => deco.timeGrid(4, 0), /^RangeError: timeshift: /);
});
