"""Automatic windows and merge method: `--reduction F` with `--layers auto`, and `--method auto`.

Windows: the fewest FF sublayers whose removal takes away at least F of the parameters are merged
away (per stack for seq2seq models). Sets of one to MAX_WINDOWS non-overlapping windows that do it
are ranked by their alignment score (mean matched neuron correlation of each merged layer to its
window's anchor, one calibration pass that also aligns every candidate). The best set for each number
of windows, then the next best, SCREEN sets in all, and single windows at up to SCREEN evenly spaced
depths (alignment favours the late layers, which are not always the cheapest to merge) are screened:
merged by plain averaging with those alignments and scored on a quarter of the validation data. The
`top` best of the screen are merged with a fitted method and scored on all of it. Method: each window
of the best set is merged alone with every candidate method and scored on validation; the best per
window wins, unless the uniform merge scores better. Only calibration and validation data are read
here: held-out evaluation data never enters a choice."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import cache

import numpy as np
from torch import nn

from ..errors import InputError, WindowError
from ..families import adapter_for
from ..merging import Calibration, MergeResult, Window, ff_param_count, merge
from ..merging.align import Match
from ..progress import track
from .search import default_score, pair_matches, window_pairs

AUTO = "auto"
CANDIDATE_METHODS = ("average", "regmean", "refit", "sequential")  # delta changes the accounting: not tried
PROBE_METHOD = "regmean"  # merges the candidate window sets when the method is auto too
SCREEN_METHOD = "average"  # the quick screen: no fitting, alignments from the ranking pass
SCREEN = 12  # window sets screened on a quarter of the validation data
MAX_WINDOWS = 3
Span = tuple[int, int]


@dataclass
class Trial:
    stage: str  # "windows": a candidate set, one method; "method": one window alone; "final"
    windows: list[Span]
    methods: list[str]
    score: float
    align_score: float | None = None


@dataclass
class Plan:
    windows: list[Span]  # in every stack given
    methods: list[str]  # one per window
    stacks: list[str]
    score_name: str
    higher_is_better: bool
    removed_fraction: float  # parameters the windows remove, over the original's
    params: dict = field(default_factory=dict)  # a given method's parameters (auto: each method's defaults)
    score: float = math.nan  # the chosen merge on validation
    original_score: float = math.nan
    trials: list[Trial] = field(default_factory=list)
    # alignments on the unchanged model, for `apply`'s first merge (not recorded)
    aligned: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = {
            f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in ("aligned", "trials")
        }
        return {**out, "trials": [asdict(t) for t in self.trials]}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """A plan as a report recorded it (report.json "plan")."""
        fields = {**data, "windows": [tuple(w) for w in data["windows"]]}
        fields["trials"] = [Trial(**{**t, "windows": [tuple(w) for w in t["windows"]]}) for t in data["trials"]]
        return cls(**fields)


def lines(plan: dict) -> list[str]:
    """The report's section from a plan's dict: what was tried on validation data, and what won."""
    chosen = ", ".join(f"{a}-{b} ({m})" for (a, b), m in zip(plan["windows"], plan["methods"]))
    name = plan["score_name"]
    out = [
        (
            f"Chosen on validation data ({name}; original {plan['original_score']:.4f}): {chosen}, {plan['score']:.4f}; "
            f"{plan['removed_fraction']:.2%} of the parameters removed."
        ),
        "",
        f"| stage | windows | methods | alignment | {name} (validation) |",
        "|---|---|---|---|---|",
    ]
    for t in plan["trials"]:
        spans = ", ".join(f"{a}-{b}" for a, b in t["windows"])
        align = f"{t['align_score']:.4f}" if t["align_score"] is not None else "-"
        out.append(f"| {t['stage']} | {spans} | {', '.join(t['methods'])} | {align} | {t['score']:.4f} |")
    return out


def layers_needed(model: nn.Module, reduction: float, stacks: list[str], kept: float = 0.0) -> int:
    """The fewest FF sublayers (per stack) whose merging away removes at least `reduction` of the parameters,
    when a fraction `kept` of each merged-away FF stays as per-layer corrections (method delta's budget).
    The one rule for --reduction (convert, merge, search: a window of k layers merges k - 1 away)."""
    if not 0 < reduction < 1:
        raise WindowError(f"--reduction is a fraction of the parameters in (0, 1), e.g. 0.1; got {reduction}.")
    per_layer = sum(ff_param_count(model, s) for s in stacks) * (1 - kept)
    m = max(1, math.ceil(reduction * model.num_parameters() / per_layer - 1e-9))
    n = min(adapter_for(model).num_layers(model, s) for s in stacks)
    if m > n - 1:
        share = (n - 1) * per_layer / model.num_parameters()
        raise WindowError(
            f"Removing {reduction:.0%} of the parameters needs merging away {m} FF sublayers per stack; the model "
            f"has {n}, so at most {n - 1} can go ({share:.1%}). Ask for less."
        )
    return m


def removed_fraction(model: nn.Module, windows: list[Span], stacks: list[str]) -> float:
    per_layer = sum(ff_param_count(model, s) for s in stacks)
    return sum(b - a for a, b in windows) * per_layer / model.num_parameters()


def window_sets(
    n: int, m: int, score: Callable[[Span], float], max_windows: int = MAX_WINDOWS, keep: int = 8
) -> list[tuple]:
    """Sets of 1..max_windows disjoint windows in layers 0..n-1 merging away m layers in all, as (alignment,
    windows) with the alignment the mean of `score(window)` (a window's summed pair scores) over the m merged
    layers, best first: the `keep` best placements of each ordered split of m into window sizes."""
    out = []
    for sizes in _compositions(m, max_windows):

        @cache
        def best(j: int, pos: int, sizes=tuple(sizes)) -> list[tuple]:
            if j == len(sizes):
                return [(0.0, ())]
            rows, need = [], sum(s + 1 for s in sizes[j:])  # layers the remaining windows take
            for a in range(pos, n - need + 1):
                w = (a, a + sizes[j])
                rows += [(score(w) + total, (w, *rest)) for total, rest in best(j + 1, w[1] + 1)]
            return sorted(rows, key=lambda r: (-r[0], r[1]))[:keep]

        out += best(0, 0)
    ranked = {ws: total / m for total, ws in out}
    return [(value, ws) for ws, value in sorted(ranked.items(), key=lambda r: (-r[1], r[0]))]


def _compositions(m: int, most: int) -> list[list[int]]:
    """Ordered ways to write m as a sum of 1..most positive parts."""
    if m == 0:
        return [[]]
    if most == 0:
        return []
    return [[first, *rest] for first in range(1, m + 1) for rest in _compositions(m - first, most - 1)]


def shortlist(ranked: list[tuple], top: int) -> list[tuple]:
    """The best set for each number of windows, then the next best overall, `top` in all."""
    picked = []
    for count in sorted({len(ws) for _, ws in ranked}):
        picked.append(next(r for r in ranked if len(r[1]) == count))
    picked = sorted(picked, key=lambda r: -r[0])[:top]
    for r in ranked:
        if len(picked) >= top:
            break
        if r not in picked:
            picked.append(r)
    return picked


def spread(n: int, m: int, score: Callable[[Span], float], count: int) -> list[tuple]:
    """Single windows merging away m of n layers at up to `count` evenly spaced starts, as (alignment, windows)
    like window_sets' rows."""
    starts = sorted({int(x + 0.5) for x in np.linspace(0, n - m - 1, min(count, n - m))})
    return [(score((a, a + m)) / m, ((a, a + m),)) for a in starts]


def choose(
    start: nn.Module | MergeResult,
    calibration: Calibration,
    validation: list[dict],
    *,
    stacks: list[str],
    reduction: float | None = None,
    windows: list[Span] | None = None,
    method: str = AUTO,
    params: dict | None = None,
    anchor: str = "first",
    align: str = "correlation",
    top: int = 3,
    methods: tuple[str, ...] = CANDIDATE_METHODS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Plan:
    """Windows (given, or found for `reduction`) and a method per window (given, or the best on validation),
    for a model or (given windows only) a merged one. `start` is not changed."""
    model = start.model if isinstance(start, MergeResult) else start
    if windows is None and reduction is None:
        raise InputError("Automatic windows need --reduction F (the fraction of the parameters to remove).")
    if top < 1:
        raise InputError(f"--top must be 1 or more; got {top}.")
    if windows is None and method == "delta":
        raise InputError(
            "--reduction picks windows for the plain merge methods; --method delta keeps part of each merged FF as "
            "corrections: give its windows with --layers A-B (`search --reduction F --method delta` finds them)."
        )
    params = dict(params or {}) if method != AUTO else {}
    score, higher, name = default_score(model, validation)
    quick_score = default_score(model, validation[: max(1, len(validation) // 4)])[0]
    better = max if higher else min
    plan = Plan([], [], stacks, name, higher, 0.0, params, original_score=float(score(model)))

    aligned = plan.aligned  # alignments on the unchanged model: every trial's first merge reuses them

    def trial(spans: list[Span], chosen: list[str], together: bool = False) -> nn.Module:
        """A copy with the windows merged one after the other (each aligned on the model the previous ones
        left, as `apply` does), or `together` in one merge aligned on the unchanged model (the screen)."""
        copied = copy.deepcopy(start)
        result = copied if isinstance(copied, MergeResult) else None
        trial_model = result.model if result else copied
        groups = [(spans, chosen[0])] if together else [([span], m) for span, m in zip(spans, chosen)]
        for i, (group, m) in enumerate(groups):
            ws = [Window(s, *span) for span in group for s in stacks]
            result = merge(result or trial_model, ws, anchor=anchor, align=align, calibration=calibration,
                           method=m, params=params, progress=False, alignments=aligned if i == 0 else None)  # fmt: skip
        return trial_model

    def scored(spans: list[Span], chosen: list[str]) -> float:
        value = float(score(trial(spans, chosen)))
        return value if math.isfinite(value) else (-math.inf if higher else math.inf)

    if windows is None:
        if isinstance(start, MergeResult):
            raise InputError("Automatic windows start from an original model, not a merged one.")
        m = layers_needed(model, reduction, stacks)
        n = min(adapter_for(model).num_layers(model, s) for s in stacks)
        pairs = {p for a in range(n) for b in range(a + 1, min(n, a + m + 1)) for p in window_pairs(a, b, anchor)}
        log(f"windows: merging away {m} FF sublayer(s) per stack; ranking window sets by neuron alignment")
        found = pair_matches(model, calibration, stacks[-1], pairs, progress)
        set_score = lambda w: sum(found[p].score for p in window_pairs(*w, anchor))
        candidates = shortlist(window_sets(n, m, set_score), max(SCREEN, top))
        candidates += [c for c in spread(n, m, set_score, SCREEN) if c[1] not in {ws for _, ws in candidates}]
        if len(stacks) == 1:  # the ranking pass aligned every candidate window already: the trials reuse it
            for _, spans in candidates:
                for a, b in spans:
                    d = adapter_for(model).ff_dim(adapter_for(model).layers(model, stacks[0])[a])
                    key = (Window(stacks[0], a, b), anchor, align)
                    aligned[key] = {
                        i: Match(np.arange(d), 1.0) if i == c else found[(c, i)] for c, i in _anchored(a, b, anchor)
                    }
        screened = []
        for align_score, spans in track(candidates, "screening", enabled=progress):
            value = float(quick_score(trial(list(spans), [SCREEN_METHOD] * len(spans), together=True)))
            screened.append(Trial("screen", list(spans), [SCREEN_METHOD] * len(spans), value, align_score))
        plan.trials += screened
        probe = PROBE_METHOD if method == AUTO else method
        for t in sorted(screened, key=lambda t: -t.score if higher else t.score)[:top]:
            value = scored(t.windows, [probe] * len(t.windows))
            plan.trials.append(Trial("windows", t.windows, [probe] * len(t.windows), value, t.align_score))
        best = better([t for t in plan.trials if t.stage == "windows"], key=lambda t: t.score)
        windows = best.windows
    windows = sorted(windows)
    if method != AUTO:
        plan.windows, plan.methods = windows, [method] * len(windows)
    else:
        chosen = []
        for span in windows:
            rows = []
            for m in track(methods, f"methods for {span[0]}-{span[1]}", enabled=progress):
                rows.append(Trial("method", [span], [m], scored([span], [m])))
            plan.trials.extend(rows)
            chosen.append(better(rows, key=lambda t: t.score).methods[0])
        plan.windows, plan.methods = windows, chosen
        if len(windows) > 1:  # windows interact: keep the per-window choice only if it beats a uniform one
            combined = scored(windows, chosen)
            plan.trials.append(Trial("final", windows, chosen, combined))
            uniform = [t for t in plan.trials if t.stage == "windows" and t.windows == windows]
            if uniform and better(uniform[0].score, combined) != combined:
                plan.methods = uniform[0].methods
    final = [t for t in plan.trials if t.windows == plan.windows and t.methods == plan.methods]
    if not final:  # given windows and method: scored once, for the report
        final = [Trial("final", plan.windows, plan.methods, scored(plan.windows, plan.methods))]
        plan.trials += final
    plan.score = final[-1].score
    plan.removed_fraction = removed_fraction(model, plan.windows, stacks)
    return plan


def methods_tried(plan: dict | None) -> bool:
    """Whether a recorded plan tried every method on its windows (`--method auto`)."""
    return bool(plan) and any(t["stage"] == "method" for t in plan["trials"])


def _anchored(a: int, b: int, anchor: str) -> list[tuple[int, int]]:
    """(anchor, layer) for every layer of the window, the anchor with itself included."""
    c = window_pairs(a, b, anchor)[0][0]
    return [(c, i) for i in range(a, b + 1)]


def apply(
    model: nn.Module | MergeResult,
    plan: Plan,
    calibration: Calibration | None,
    *,
    source: str = "",
    anchor: str = "first",
    align: str = "correlation",
) -> MergeResult:
    """Merge the plan's windows into `model` (in place; a merged model gets them added), each with its method.
    The first window reuses the alignment `choose` made on this same, unchanged model."""
    result = model if isinstance(model, MergeResult) else None
    for i, (span, m) in enumerate(zip(plan.windows, plan.methods)):
        ws = [Window(s, *span) for s in plan.stacks]
        result = merge(result or model, ws, anchor=anchor, align=align, calibration=calibration, source=source,
                       method=m, params=plan.params, progress=False,
                       alignments=plan.aligned if i == 0 else None)  # fmt: skip
    result.plan = plan.to_dict()
    return result
