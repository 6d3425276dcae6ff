"""Guard: `deco.reference` never imports torch (it must run where only NumPy and SciPy exist)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import deco.reference as R
    from deco.config import DeCoConfig, parameter_shapes

    rng = np.random.default_rng(0)
    for preset in ("DeCo-tiny/4", "DiT-tiny/4"):
        cfg = DeCoConfig.preset(preset)
        w = {k: 0.1 * rng.standard_normal(s) for k, s in parameter_shapes(cfg).items()}
        path = sys.argv[1] + "/m.safetensors"
        R.save_weights(path, cfg, w)
        model = R.load_model(path)
        x = rng.standard_normal((2, 3, 8, 8))
        v = model.forward(x, [0.2, 0.9], [1, cfg.num_classes])
        assert v.shape == x.shape and np.all(np.isfinite(v))
        out = R.sample(model, x, [0, 1], steps=2, guidance=2.0, solver="heun")
        assert out.shape == x.shape
    loss = R.frequency_aware_loss(v, x, quality=85) + R.flow_matching_loss(v, x)
    assert np.isfinite(loss) and loss > 0
    leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print("torch modules:", leaked)
    sys.exit(1 if leaked else 0)
    """
)


def test_reference_does_not_import_torch(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch modules: []" in proc.stdout


def test_importing_deco_imports_neither_numpy_nor_torch() -> None:
    code = "import sys, deco, deco.config; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
