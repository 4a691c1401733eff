"""The deployment side: session settings, the torch-free `session()` helper, and the glibc recipe that
keeps a long-lived process at its live memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tiny_graphs as tg

from ffmerge_onnx import runtime
from ffmerge_onnx.errors import InputError

PROBE = """
import ctypes, json, sys
import numpy as np
import onnxruntime as ort

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

mode, path = sys.argv[1], sys.argv[2]
x = np.random.default_rng(0).standard_normal((4, 1024)).astype(np.float32)
ctypes.CDLL("libc.so.6").malloc_trim(0)
start = rss()
if mode == "helper":
    from ffmerge_onnx.runtime import session
    s = session(path)
else:
    s = ort.InferenceSession(path)
s.run(None, {"x": x})
steady = rss()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"steady": steady - start, "trimmed": rss() - start, "torch": "torch" in sys.modules}))
"""


def _probe(mode: str, path, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(path)], capture_output=True, text=True, timeout=300,
                         check=False, env={**os.environ, **(env or {})})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")
def test_the_recipe_and_the_helper_keep_steady_rss_at_the_trimmed_figure(tmp_path):
    """Six FF blocks reading one shared 32 MB pair of weights, prepacking on: in a fresh process with
    MALLOC_TRIM_THRESHOLD_ (or through session(), which trims once), steady RSS is within 5 % of the
    malloc_trim figure; the helper imports no torch."""
    tg.shared_weight_model(tmp_path / "model.onnx")
    recipe = _probe("plain", tmp_path / "model.onnx", runtime.MALLOC_RECIPE)
    helper = _probe("helper", tmp_path / "model.onnx")
    held = _probe("plain", tmp_path / "model.onnx")  # what glibc keeps without either (reported)
    print(f"steady / trimmed MB: recipe {recipe['steady'] / 2**20:.1f} / {recipe['trimmed'] / 2**20:.1f}, helper "
          f"{helper['steady'] / 2**20:.1f} / {helper['trimmed'] / 2**20:.1f}, neither {held['steady'] / 2**20:.1f} / "
          f"{held['trimmed'] / 2**20:.1f}")  # fmt: skip
    for r in (recipe, helper):
        assert r["steady"] <= 1.05 * r["trimmed"]
        assert r["trimmed"] < 48 * 2**20  # the shared pair once (32 MB) plus activations, not six copies (192 MB)
    assert not helper["torch"]


def test_settings_keep_prepacking_on_unless_asked():
    fold = runtime.session_settings("fold")
    assert fold["session_config_entries"] == {} and fold["environment"] == runtime.MALLOC_RECIPE
    assert runtime.session_settings("gather")["session_config_entries"] == {}  # Gathers on activations only
    assert runtime.session_settings("fold", prepack=False)["session_config_entries"] == runtime.PREPACKING_OFF
    with pytest.raises(InputError, match="mode must be one of"):
        runtime.session_settings("zip")


def test_session_opens_a_folder_with_its_written_settings(tmp_path):
    tg.shared_weight_model(tmp_path / "model.onnx", d=16, d_ff=32, layers=2)
    runtime.write_settings(tmp_path, "gather")
    s = runtime.session(tmp_path)
    assert s.get_providers() == ["CPUExecutionProvider"]
    (tmp_path / runtime.SESSION_SETTINGS).write_text("[1, 2]")
    with pytest.raises(InputError, match="not valid"):
        runtime.session(tmp_path)
    with pytest.raises(InputError, match="give a folder written by"):
        runtime.session(tmp_path / "nothing")
    with pytest.raises(InputError, match="--providers takes"):
        runtime.session(tmp_path / "model.onnx", providers="tpu")


def test_an_old_onnxruntime_is_named_with_the_reason(monkeypatch):
    import onnxruntime as ort

    assert runtime.version_warning() is None  # this environment has >= 1.23
    monkeypatch.setattr(ort, "__version__", "1.19.2")
    warning = runtime.version_warning()
    assert "1.19.2 is older than 1.23" in warning and "--no-prepack" in warning
