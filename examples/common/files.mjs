// File helpers of the Node programs (../node/run.mjs, ../ports/onnx-node/run.mjs); kept apart from
// deco.mjs, which the web pages load too and so must not import node:fs.
import fs from 'node:fs';
import path from 'node:path';

/** Writes next to the target and renames, so that a reader never sees half a file. */
export function writeAtomically(file, bytes) {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  try {
    fs.writeFileSync(tmp, bytes);
    fs.renameSync(tmp, file);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
}
