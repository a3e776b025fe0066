"""A fork adds an attribute in one place: mgiqa.py's tables, edited as a forker would,
and nothing else; the prompt, parsing, the reward, a manifest reader, the evaluation and the
--weights option then carry it.

The forked mgiqa is mgiqa.py's own source with four edits, run as a module that stands in for
mgiqa in sys.modules while the modules that bind its names at import (reward, data, report,
evaluate, grpo) are imported afresh; monkeypatch puts the originals back afterwards."""
import importlib
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import grpo  # noqa: F401  (it and its imports in sys.modules before a fork: put back after)
import mgiqa

NEW = "exposure"
DEFINITION = "how well the light is exposed; 5 means balanced, 1 means blown or crushed."
# (what the forker finds in mgiqa.py, what it becomes): the new attribute before overall, its
# definition, its example score and the distortion family that degrades it
EDITS = {
    "attribute": ('"composition", "overall")', f'"composition", "{NEW}", "overall")'),
    "definition": ("ATTRIBUTE_DEFINITIONS = {",
                   f'ATTRIBUTE_DEFINITIONS = {{"{NEW}": "{DEFINITION}",'),
    "example": ("EXAMPLE_SCORES = {", f'EXAMPLE_SCORES = {{"{NEW}": 3.60,'),
    "family": ("FAMILY_TO_ATTRIBUTE = {", f'FAMILY_TO_ATTRIBUTE = {{"{NEW}": "{NEW}",'),
}
REIMPORTED = ("reward", "data", "report", "evaluate", "grpo")


def forked_source(edits) -> str:
    source = Path(mgiqa.__file__).read_text()
    for name in edits:
        old, new = EDITS[name]
        assert source.count(old) == 1, f"edit {name!r}: {old!r} is not once in mgiqa.py"
        source = source.replace(old, new)
    return source


def install_fork(monkeypatch, edits=tuple(EDITS)) -> types.ModuleType:
    """The forked mgiqa in sys.modules, the modules that import it removed (to import afresh)."""
    module = types.ModuleType("mgiqa")
    module.__file__ = mgiqa.__file__
    monkeypatch.setitem(sys.modules, "mgiqa", module)
    for name in REIMPORTED:
        monkeypatch.delitem(sys.modules, name, raising=False)
    exec(compile(forked_source(edits), mgiqa.__file__, "exec"), module.__dict__)
    return module


@pytest.fixture
def fork(monkeypatch):
    forked = install_fork(monkeypatch)
    fresh = {name: importlib.import_module(name) for name in REIMPORTED}
    return types.SimpleNamespace(mgiqa=forked, **fresh)


def answer(scores: dict) -> str:
    body = ", ".join(f'"{a}": {v:.2f}' for a, v in scores.items())
    return "<think>ok</think><answer>{" + body + "}</answer>"


def test_the_fork_has_six_attributes_in_prompt_and_answer(fork):
    m = fork.mgiqa
    assert m.ATTRIBUTES == (*mgiqa.LABELLED, NEW, "overall") and m.LABELLED[-1] == NEW
    prompt = m.build_prompt()
    assert "Rate this picture on five attributes and overall." in prompt
    assert f"- {NEW}: {DEFINITION}" in prompt
    assert f'"composition": 3.20, "{NEW}": 3.60, "overall": 3.90}}</answer>' in prompt
    assert mgiqa.build_prompt() != prompt and NEW not in mgiqa.build_prompt()  # the original intact


def test_the_fork_parses_six_scores_strict_and_lenient(fork):
    m = fork.mgiqa
    six = dict(zip(m.ATTRIBUTES, (4.0, 3.0, 2.0, 1.5, 2.5, 3.5), strict=True))
    assert m.parse_answer(answer(six), strict=True) == pytest.approx(six)
    five = {a: v for a, v in six.items() if a != NEW}
    assert m.parse_answer(answer(five), strict=True) is None  # the old layout is now malformed
    lenient = m.parse_answer(answer(five))
    assert list(lenient) == list(m.ATTRIBUTES) and math.isnan(lenient[NEW])
    assert lenient["overall"] == pytest.approx(3.5)
    assert m.parse_answer(f"{NEW}: 7, overall = 2")[NEW] == pytest.approx(5.0)  # clipped


def test_the_fork_rewards_the_new_attribute(fork):
    m, reward, data = fork.mgiqa, fork.reward, fork.data
    # three images of one reference: exposure labels 5 > 3 > 1, the others tied
    recs = [data.Record(f"i{i}.png", "fork", "synthetic", mos=3.0,
                        attributes={**dict.fromkeys(mgiqa.LABELLED, 3.0), NEW: 5.0 - 2 * i})
            for i in range(3)]
    labels, P, M = reward.preferences(recs)
    e = m.ATTRIBUTES.index(NEW)
    assert labels.shape == (3, 6) and P.shape == M.shape == (6, 3, 3)
    assert labels[:, e].tolist() == [5.0, 3.0, 1.0] and labels[:, -1].tolist() == [3.0] * 3
    # two rollouts per image: the first ranks exposure as the labels do, the second reverses it
    rows = []
    for i in range(3):
        for exposure in (4.5 - i, 2.5 + i):
            rows.append(answer({a: 3.0 for a in mgiqa.LABELLED} | {NEW: exposure, "overall": 3.0}))
    weights = [0.0] * (len(m.ATTRIBUTES) - 2) + [1.0, 0.0]  # exposure alone
    out = reward.mg_reward(rows, P, M, weights=weights)
    assert out["scores"].shape == (3, 2, 6)
    assert out["scores"][:, :, e].tolist() == [[4.5, 2.5], [3.5, 3.5], [2.5, 4.5]]
    total = out["total"].tolist()
    assert total[0][0] > total[0][1] and total[2][0] > total[2][1], total
    assert total[1][0] == pytest.approx(total[1][1]), total  # same scores, same reward
    with pytest.raises(ValueError, match="weights"):
        reward.mg_reward(rows, P, M, weights=[1.0] * len(mgiqa.ATTRIBUTES))  # five: too few


def test_the_fork_reads_evaluates_and_takes_six_weights(fork, tmp_path):
    m, data, evaluate = fork.mgiqa, fork.data, fork.evaluate
    manifest = tmp_path / "manifest.csv"
    header = ["image", "mos", *m.LABELLED, "ref", "family", "level"]
    lines = [",".join(header)]
    for i in range(6):
        (tmp_path / f"i{i}.png").write_bytes(b"")
        family, level = (NEW, i) if i else ("", 0)
        lines.append(",".join([f"i{i}.png", f"{5 - 0.5 * i}", *["5"] * (len(m.LABELLED) - 1),
                               f"{5 - 0.8 * i:.1f}", "s0", family, str(level)]))
    manifest.write_text("\n".join(lines) + "\n")
    recs = data.load_dataset("manifest", str(manifest))
    assert [r.attributes[NEW] for r in recs] == pytest.approx([5 - 0.8 * i for i in range(6)])
    rows = [{"dataset": r.dataset, "image": r.image, "mos": r.mos, "labels": dict(r.attributes),
             **{a: 3.0 for a in m.ATTRIBUTES}, NEW: 4.9 - 0.7 * i, "overall": r.mos,
             "parsed": True, "strict": True, "completion": "<think>ok</think>"}
            for i, r in enumerate(recs)]
    summary = evaluate.summarize(rows, recs)
    entry = summary["datasets"][recs[0].dataset]
    assert entry["metrics"][NEW]["srcc"] == pytest.approx(1.0)
    assert entry["within_family"][NEW] == pytest.approx(1.0)
    assert summary["average"][NEW]["datasets"] == 1
    assert f"{NEW} SRCC" in evaluate.results_table(summary)
    pixels = {r.image: np.zeros((8, 8, 3), np.uint8) for r in recs}
    page = fork.report.html_report(rows, recs, summary, "fork", images=pixels)
    assert f"{NEW}: SRCC 1.000" in page
    assert page.count(f">{NEW}<") == page.count(">sharpness<") >= len(recs)  # a bar on every card
    parser = fork.grpo.build_parser()
    assert parser.parse_args(["--weights", *["0.5"] * 6]).weights == [0.5] * 6
    with pytest.raises(SystemExit):
        parser.parse_args(["--weights", *["0.5"] * 5, "photo.jpg"])
    assert f"weights of {' '.join(m.ATTRIBUTES)}" in " ".join(parser.format_help().split())


def test_a_fork_that_forgets_a_table_is_told_which(monkeypatch):
    with pytest.raises(ValueError, match=f"'{NEW}' has no entry in mgiqa.ATTRIBUTE_DEFINITIONS"):
        install_fork(monkeypatch, ("attribute",))
    with pytest.raises(ValueError, match=f"'{NEW}' has no entry in mgiqa.EXAMPLE_SCORES"):
        install_fork(monkeypatch, ("attribute", "definition"))
    with pytest.raises(ValueError, match=f"mgiqa.EXAMPLE_SCORES has '{NEW}'"):
        install_fork(monkeypatch, ("example",))


def test_the_originals_are_back():
    # after the fork tests (file order): the modules in sys.modules are the default ones again
    assert sys.modules["mgiqa"] is mgiqa and NEW not in sys.modules["reward"].ATTRIBUTES
    assert len(sys.modules["grpo"].Config().weights) == len(mgiqa.ATTRIBUTES)
