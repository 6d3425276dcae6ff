#!/usr/bin/env node
// Drives the pages of this folder in ONE headless Chromium (playwright-core), for the tests:
//
//   node drive.mjs JOBS.json RESULTS.json
//
// JOBS: {"base": "http://127.0.0.1:PORT", "chromium": "/usr/bin/chromium",
//        "runs":  [{"name", "model": URL path, "inputs": safetensors path, "out": safetensors path}],
//        "demos": [{"name", "url": page URL path, "digit": int or null, "noise": [numbers] or null,
//                   "screenshot": png path or null}]}
// Each run loads runner.html and calls window.decoRun on the inputs; each demo opens the digits
// page, waits until it is ready (or shows an error), picks the digit, sets window.decoNoise,
// presses Generate and reads the canvas back with getImageData. RESULTS gets, per run, its error
// (if any), and per demo, the page's state and status line, its session.run count, the canvas
// pixels (RGBA, row-major) and the float sample; plus the browser's version and console errors.
import fs from 'node:fs';
import { chromium } from 'playwright-core';
import { readSafetensors, writeSafetensors } from '../common/deco.mjs';

const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

const toBase64 = (t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength).toString('base64');

async function run(page, base, job) {
  const feeds = readSafetensors(new Uint8Array(fs.readFileSync(job.inputs)));
  const wire = Object.fromEntries(Object.entries(feeds).map(
    ([k, t]) => [k, { type: t.type, dims: t.dims, base64: toBase64(t) }]));
  await page.goto(`${base}/web/runner.html`);
  await page.waitForFunction(() => document.body.dataset.state === 'ready');
  const out = await page.evaluate(([url, f]) => window.decoRun(url, f), [job.model, wire]);
  if (out.error) return { error: out.error };
  const tensors = {};
  for (const [k, t] of Object.entries(out)) {
    const bytes = Buffer.from(t.base64, 'base64');
    const data = new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength).slice();
    tensors[k] = { type: t.type, dims: t.dims, data };
  }
  fs.writeFileSync(job.out, writeSafetensors(tensors));
  return {};
}

async function demo(page, base, job) {
  await page.goto(`${base}${job.url}`);
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null,
    { timeout: 60000 });
  const result = {};
  if (await page.evaluate(() => document.body.dataset.state) === 'ready' && job.digit !== null) {
    await page.check(`input[name="digit"][value="${job.digit}"]`);
    await page.evaluate((noise) => { window.decoNoise = noise; }, job.noise);
    await page.click('#generate');
    await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.state), null,
      { timeout: 60000 });
    Object.assign(result, await page.evaluate(() => {
      const canvas = document.getElementById('image');
      const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
      return { width: canvas.width, height: canvas.height, rgba: Array.from(pixels.data),
        sample: window.decoResult?.sample ?? null };
    }));
  }
  Object.assign(result, await page.evaluate(() => ({
    state: document.body.dataset.state, status: document.getElementById('status').textContent,
    runs: window.decoRuns })));
  if (job.screenshot) await page.screenshot({ path: job.screenshot, fullPage: true });
  return result;
}

async function main([jobsPath, resultsPath]) {
  const jobs = JSON.parse(fs.readFileSync(jobsPath, 'utf8'));
  const userDataDir = fs.mkdtempSync(`${jobs.tmp ?? '/tmp'}/deco-chromium-`);
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: jobs.chromium ?? '/usr/bin/chromium', headless: true, args: ARGS,
    viewport: { width: 800, height: 700 } });
  const results = { browser: context.browser()?.version() ?? null, console: [], runs: {}, demos: {} };
  try {
    const page = await context.newPage();
    page.on('console', (m) => { if (m.type() === 'error') results.console.push(m.text()); });
    page.on('pageerror', (e) => results.console.push(String(e)));
    for (const job of jobs.runs ?? []) results.runs[job.name] = await run(page, jobs.base, job);
    for (const job of jobs.demos ?? []) results.demos[job.name] = await demo(page, jobs.base, job);
    if (!results.browser) results.browser = await page.evaluate(() => navigator.userAgent);
  } finally {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
  fs.writeFileSync(resultsPath, JSON.stringify(results));
}

main(process.argv.slice(2)).catch((err) => {
  console.error(`drive.mjs: ${String(err?.stack ?? err)}`);
  process.exit(1);
});
