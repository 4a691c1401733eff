"""Do optimum's ORTModel classes load what `convert --kv-cache` writes, and generate the same text?

optimum-onnx cannot be installed next to transformers 5, so this runs in two environments:

    .venv/bin/python tools/optimum_compat.py prepare DIR        # ours: convert tiny models, record tokens
    OPTENV/bin/python tools/optimum_compat.py check DIR          # optimum-onnx: load, generate, compare

`bash tools/optimum_compat.sh` does both (it creates the optimum environment in .optenv).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = 8
MODELS = {"gpt2": "ORTModelForCausalLM", "llama": "ORTModelForCausalLM", "marian": "ORTModelForSeq2SeqLM"}


def _prompt():
    import torch

    return torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(1))


def _generate(model, prompt):
    import torch

    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0].tolist()


def prepare(root: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_models as tm

    from ffmerge_onnx import Window, adapter_for, merge
    from ffmerge_onnx.pipeline import ExportOptions, export

    expected = {}
    for name in MODELS:
        model = tm.build(name)
        adapter = adapter_for(model)
        result = merge(
            model, [Window(s, 1, 3) for s in adapter.stack_names()], calibration=tm.calibration(model), progress=False
        )
        export(result, root / name, ExportOptions(kv_cache=True, compare=False), overwrite=True, log=lambda s: None)
        expected[name] = _generate(model, _prompt())
    (root / "expected.json").write_text(json.dumps(expected))
    print(f"prepared {', '.join(MODELS)} in {root}")


def check(root: Path) -> int:
    import optimum.onnxruntime as ortm

    expected = json.loads((root / "expected.json").read_text())
    failed = 0
    for name, cls in MODELS.items():
        model = getattr(ortm, cls).from_pretrained(root / name, use_cache=True)
        got = _generate(model, _prompt())
        ok = got == expected[name]
        failed += not ok
        print(f"{name}: {cls} loaded {root / name}; greedy tokens {'match' if ok else 'DIFFER'}: {got}")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "check"):
        sys.exit(__doc__)
    root = Path(sys.argv[2])
    if sys.argv[1] == "prepare":
        prepare(root)
    else:
        sys.exit(check(root))
