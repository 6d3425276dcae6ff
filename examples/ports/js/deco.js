// The DeCo components that need no model, ported to JavaScript from the specification (spec/)
// alone. Arrays are {shape, data}: `shape` a list of sizes, `data` a Float64Array in C order
// (00 §1). Errors follow 00 §4: a TypeError for the wrong kind of argument, a RangeError for the
// right kind with an invalid value (the spec's ValueError); the message starts with the
// argument's name and a colon.
//
// Planted defects, for the test-suite (one at a time, DECO_JS_DEFECT=NAME): transpose_dct makes
// block_dct store the coefficient [v, u] at [u, v] (02 §2: u is the vertical, v the horizontal
// frequency). The others are convention slips of the kit's catalogue (deco.conformance.differential),
// named as it names them, one per kind of slip: a border (pad_symmetric: the padding repeats the
// edge sample, 02 §3), one axis of a separable transform (dct_width_inverse: Y = C X C, 02 §2), a
// constant's arithmetic (quality_integer_division: 5000 // q, 02 §4), a frequency basis
// (time_max_period_10000, 03 §2), positions (rope_integer_positions: 0..n−1, 03 §4) and a formula
// inverted (timeshift_inverted: shift 1/s, 01 §3).

export const DEFECTS = ["transpose_dct", "pad_symmetric", "dct_width_inverse", "quality_integer_division",
  "time_max_period_10000", "rope_integer_positions", "timeshift_inverted"];
const DEFECT = process.env.DECO_JS_DEFECT;
const TRANSPOSE_DCT = DEFECT === "transpose_dct";

// ---------------------------------------------------------------------------------- helpers

function tensor(shape, data = null) {
  return { shape, data: data ?? new Float64Array(shape.reduce((a, b) => a * b, 1)) };
}

function checkTensor(name, x, rank) {
  if (!x || !Array.isArray(x.shape) || !(x.data instanceof Float64Array)) {
    throw new TypeError(`${name}: expected an array {shape, data: Float64Array}, got ${typeof x}`);
  }
  if (rank !== undefined && x.shape.length !== rank) {
    throw new RangeError(`${name}: expected ${rank} dimensions, got shape (${x.shape.join(", ")})`);
  }
  if (!x.data.every(Number.isFinite)) throw new RangeError(`${name}: expected finite values, got NaN or inf`);
}

function checkInt(name, v, low, high) {
  if (!Number.isInteger(v)) throw new TypeError(`${name}: expected an integer, got ${JSON.stringify(v)}`);
  if (v < low || v > high) throw new RangeError(`${name}: expected ${low}..${high}, got ${v}`);
}

function checkReal(name, v) {
  if (typeof v !== "number") throw new TypeError(`${name}: expected a real number, got ${JSON.stringify(v)}`);
  if (!Number.isFinite(v)) throw new RangeError(`${name}: expected a finite number, got ${v}`);
}

/** NumPy's linspace(start, stop, n): start + i·step with the last point exactly `stop`; n = 1 gives start. */
export function linspace(start, stop, n) {
  const out = new Float64Array(n);
  if (n === 1) out[0] = start;
  if (n < 2) return out;
  const step = (stop - start) / (n - 1);
  for (let i = 0; i < n; i++) out[i] = start + i * step;
  out[n - 1] = stop;
  return out;
}

// ------------------------------------------------------------------- 02 frequency-aware loss

/** 02 §1: full-range BT.601 RGB -> YCbCr without the +128 offsets; (B, 3, H, W) -> same shape. */
export function rgbToYcbcr(x) {
  checkTensor("x", x, 4);
  const [B, C, H, W] = x.shape;
  if (C !== 3) throw new RangeError(`x: expected 3 channels on axis 1, got shape (${x.shape.join(", ")})`);
  const M = [
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
  ];
  const out = tensor(x.shape.slice());
  const plane = H * W;
  for (let b = 0; b < B; b++) {
    const base = b * 3 * plane;
    for (let i = 0; i < 3; i++) {
      for (let k = 0; k < plane; k++) {
        out.data[base + i * plane + k] = M[i][0] * x.data[base + k] + M[i][1] * x.data[base + plane + k]
          + M[i][2] * x.data[base + 2 * plane + k];
      }
    }
  }
  return out;
}

/** 02 §2: the orthonormal DCT-II matrix C[k][i] = a_k cos(π (2i + 1) k / (2n)). */
export function dctMatrix(n = 8) {
  checkInt("n", n, 1, Number.MAX_SAFE_INTEGER);
  const C = [];
  for (let k = 0; k < n; k++) {
    const a = Math.sqrt((k === 0 ? 1 : 2) / n);
    C.push(Float64Array.from({ length: n }, (_, i) => a * Math.cos((Math.PI * (2 * i + 1) * k) / (2 * n))));
  }
  return C;
}

/** 02 §3: reflect index of row/column r of an axis of length n padded at the end (mirror about n − 1). */
function reflect(r, n) {
  if (DEFECT === "pad_symmetric") return r < n ? r : 2 * n - 1 - r;
  return r < n ? r : 2 * (n - 1) - r;
}

/**
 * 02 §2–3: (B, C, H, W) -> (B, C, Bh, Bw, 8, 8); reflect-padded at the bottom and right to
 * multiples of 8, each 8×8 block X transformed to Y = C X Cᵀ, Y[u, v] with u vertical.
 */
export function blockDct(x) {
  checkTensor("x", x, 4);
  const [B, Ch, H, W] = x.shape;
  const ph = (8 - (H % 8)) % 8;
  const pw = (8 - (W % 8)) % 8;
  if (ph >= H || pw >= W) {
    throw new RangeError(`x: expected H, W >= 5 to reflect-pad to a multiple of 8, got shape (${x.shape.join(", ")})`);
  }
  const Bh = (H + ph) / 8;
  const Bw = (W + pw) / 8;
  const C = dctMatrix(8);
  const out = tensor([B, Ch, Bh, Bw, 8, 8]);
  const X = new Float64Array(64);
  const T = new Float64Array(64);
  for (let bc = 0; bc < B * Ch; bc++) {
    const src = bc * H * W;
    for (let by = 0; by < Bh; by++) {
      for (let bx = 0; bx < Bw; bx++) {
        for (let i = 0; i < 8; i++) {
          const row = reflect(8 * by + i, H);
          for (let j = 0; j < 8; j++) X[i * 8 + j] = x.data[src + row * W + reflect(8 * bx + j, W)];
        }
        // T = C X, then Y = T Cᵀ: Y[u, v] = Σ_j T[u, j] C[v, j]
        for (let u = 0; u < 8; u++) {
          for (let j = 0; j < 8; j++) {
            let s = 0;
            for (let i = 0; i < 8; i++) s += C[u][i] * X[i * 8 + j];
            T[u * 8 + j] = s;
          }
        }
        const dst = ((bc * Bh + by) * Bw + bx) * 64;
        for (let u = 0; u < 8; u++) {
          for (let v = 0; v < 8; v++) {
            let s = 0;
            for (let j = 0; j < 8; j++) s += T[u * 8 + j] * (DEFECT === "dct_width_inverse" ? C[j][v] : C[v][j]);
            out.data[dst + (TRANSPOSE_DCT ? v * 8 + u : u * 8 + v)] = s;
          }
        }
      }
    }
  }
  return out;
}

// 02 §4: ITU-T T.81 Annex K tables K.1 (luminance) and K.2 (chrominance), indexed [u][v].
const LUMINANCE = [
  [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
  [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
  [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
  [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
].flat();
const CHROMINANCE = [
  [17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99],
  [24, 26, 56, 99, 99, 99, 99, 99], [47, 66, 99, 99, 99, 99, 99, 99],
  ...Array(4).fill(Array(8).fill(99)),
].flat();

/** 02 §4: IJG quality scale, with the real division 5000 / q below 50 (as the release). */
export function qualityScale(quality) {
  checkInt("quality", quality, 1, 100);
  if (DEFECT === "quality_integer_division" && quality < 50) return Math.floor(5000 / quality);
  return quality < 50 ? 5000 / quality : 200 - 2 * quality;
}

/** 02 §4: Q = clamp(floor((T · scale + 50) / 100), 1, 255) elementwise; 64 values, [u][v] flattened. */
export function quantisationTable(base, quality) {
  const scale = qualityScale(quality);
  return base.map((t) => Math.min(255, Math.max(1, Math.floor((t * scale + 50) / 100))));
}

/** 02 §5: (3, 8, 8) weights (Y, Cb, Cr): w̃ = (mean(Q) / Q)^γ, each channel normalised to mean 1. */
export function frequencyWeights(quality = 85, gamma = 1.0) {
  checkInt("quality", quality, 1, 100);
  checkReal("gamma", gamma);
  const out = tensor([3, 8, 8]);
  [LUMINANCE, CHROMINANCE, CHROMINANCE].forEach((base, c) => {
    const Q = quantisationTable(base, quality);
    const meanQ = Q.reduce((a, b) => a + b, 0) / 64;
    const raw = Q.map((q) => Math.pow(meanQ / q, gamma));
    const meanRaw = raw.reduce((a, b) => a + b, 0) / 64;
    raw.forEach((r, k) => { out.data[c * 64 + k] = r / meanRaw; });
  });
  return out;
}

/**
 * 02 §6: mean over (b, c, by, bx, u, v) of w[c, u, v] · (D(pred) − D(target))², D = block_dct ∘
 * rgb_to_ycbcr. Both are linear, so the difference is transformed once (02 §6 allows it).
 */
export function frequencyAwareLoss(pred, target, quality = 85, gamma = 1.0) {
  checkTensor("pred", pred, 4);
  checkTensor("target", target, 4);
  if (pred.shape.join() !== target.shape.join()) {
    throw new RangeError(`target: expected the shape of pred (${pred.shape.join(", ")}), got (${target.shape.join(", ")})`);
  }
  const w = frequencyWeights(quality, gamma);
  const diff = tensor(pred.shape.slice(), pred.data.map((p, i) => p - target.data[i]));
  const D = blockDct(rgbToYcbcr(diff));
  const perChannel = D.data.length / (D.shape[0] * 3); // Bh · Bw · 64 coefficients per (b, c)
  let sum = 0;
  for (let k = 0; k < D.data.length; k++) {
    const c = Math.floor(k / perChannel) % 3;
    sum += w.data[c * 64 + (k % 64)] * D.data[k] * D.data[k];
  }
  return sum / D.data.length;
}

// ---------------------------------------------------------------------------------- 03 model

/** 03 §2: (B,) -> (B, 256): cos(t f_k) for k < 128, then sin(t f_k); f_k = 10^(−k/128). */
export function timestepFeatures(t) {
  checkTensor("t", t, 1);
  const [B] = t.shape;
  const out = tensor([B, 256]);
  for (let b = 0; b < B; b++) {
    for (let k = 0; k < 128; k++) {
      const period = DEFECT === "time_max_period_10000" ? 10000 : 10;
      const a = t.data[b] * Math.exp((-Math.log(period) * k) / 128);
      out.data[b * 256 + k] = Math.cos(a);
      out.data[b * 256 + 128 + k] = Math.sin(a);
    }
  }
  return out;
}

/**
 * 03 §4 (2-D RoPE): (grid_h · grid_w, head_dim / 2) angles. Positions span [0, 16] on each
 * axis; pair k uses frequency θ^(−4 (k//2) / d_h), the x position for even k, y for odd k.
 */
export function ropeAngles(gridH, gridW, headDim) {
  checkInt("grid_h", gridH, 1, Number.MAX_SAFE_INTEGER);
  checkInt("grid_w", gridW, 1, Number.MAX_SAFE_INTEGER);
  checkInt("head_dim", headDim, 4, Number.MAX_SAFE_INTEGER);
  if (headDim % 4 !== 0) throw new RangeError(`head_dim: expected a multiple of 4, got ${headDim}`);
  const integer = DEFECT === "rope_integer_positions";
  const posX = integer ? linspace(0, gridW - 1, gridW) : linspace(0, 16, gridW);
  const posY = integer ? linspace(0, gridH - 1, gridH) : linspace(0, 16, gridH);
  const half = headDim / 2;
  const out = tensor([gridH * gridW, half]);
  for (let r = 0; r < gridH; r++) {
    for (let q = 0; q < gridW; q++) {
      for (let k = 0; k < half; k++) {
        const f = Math.pow(10000, (-4 * Math.floor(k / 2)) / headDim);
        out.data[(r * gridW + q) * half + k] = (k % 2 === 0 ? posX[q] : posY[r]) * f;
      }
    }
  }
  return out;
}

/**
 * 03 §6: (p², 64) features; feature[i·p + j, a·8 + b] = cos(π x_j f_a) cos(π y_i f_b) / (1 + f_a f_b),
 * f = linspace(0, 8, 8), x_j (column) and y_i (row) = linspace(0, 1, p).
 */
export function dctPositionFeatures(patchSize) {
  checkInt("patch_size", patchSize, 1, Number.MAX_SAFE_INTEGER);
  const p = patchSize;
  const f = linspace(0, 8, 8);
  const pos = linspace(0, 1, p);
  const out = tensor([p * p, 64]);
  for (let i = 0; i < p; i++) {
    for (let j = 0; j < p; j++) {
      for (let a = 0; a < 8; a++) {
        for (let b = 0; b < 8; b++) {
          out.data[(i * p + j) * 64 + a * 8 + b] = (Math.cos(Math.PI * pos[j] * f[a]) * Math.cos(Math.PI * pos[i] * f[b]))
            / (1 + f[a] * f[b]);
        }
      }
    }
  }
  return out;
}

// ------------------------------------------------------------------------------ 04 sampling

/** 04 §1: (steps + 1,) times shift_s(i / N), shift_s(t) = t / (t + (1 − t) s) (01 §3). */
export function timeGrid(steps, timeshift = 1.0) {
  checkInt("steps", steps, 1, Number.MAX_SAFE_INTEGER);
  checkReal("timeshift", timeshift);
  if (!(timeshift > 0)) throw new RangeError(`timeshift: expected > 0, got ${timeshift}`);
  const out = tensor([steps + 1]);
  const s = DEFECT === "timeshift_inverted" ? 1 / timeshift : timeshift;
  for (let i = 0; i <= steps; i++) {
    const t = i / steps;
    out.data[i] = t / (t + (1 - t) * s);
  }
  return out;
}
