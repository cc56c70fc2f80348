"""The README's command-line walkthrough, run line by line exactly as written, in a fresh
directory; and no other command in the README goes untested."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from factorize.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- walkthrough: tested by tests/test_readme_walkthrough.py -->"


def walkthrough_lines(text: str) -> list[str]:
    """The command lines of the fenced block right after the walkthrough marker."""
    after = text.split(MARKER, 1)[1]
    m = re.match(r"\s*```bash\n(.*?)```", after, flags=re.DOTALL)
    assert m, "the walkthrough marker must be followed by a ```bash block"
    return [ln for ln in m.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


LINES = walkthrough_lines(README.read_text())


def test_walkthrough_is_the_whole_walk():
    verbs = [shlex.split(ln)[1] for ln in LINES]
    assert verbs == ["train", "eval", "convert", "eval", "inspect", "export"]
    assert all(ln.startswith("factorize ") for ln in LINES)


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    """Run every line as written (shlex-split, `factorize` resolved to this checkout's
    ``factorize.cli.main``) in a fresh directory; each line's exit status (-1: skipped)."""
    work = tmp_path_factory.mktemp("walk")
    outputs: list[tuple[str, int]] = []
    import os

    cwd = os.getcwd()
    os.chdir(work)
    try:
        for line in LINES:
            argv = shlex.split(line)[1:]
            if argv[0] == "export" and not _has_torch():
                outputs.append((line, -1))  # export --to torch needs torch to be useful
                continue
            outputs.append((line, main(argv)))
    finally:
        os.chdir(cwd)
    return work, outputs


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_line_succeeds(walked):
    _, outputs = walked
    failed = [(line, rc) for line, rc in outputs if rc not in (0, -1)]
    assert not failed, f"walkthrough lines failed: {failed}"


def test_outputs_exist(walked):
    work, _ = walked
    assert (work / "runs/digits-cnn/checkpoint/factorize.json").is_file()
    assert (work / "runs/digits-cnn/metrics.jsonl").is_file()
    assert {p.name for p in (work / "runs/digits-dsc").iterdir()} >= {
        "checkpoint", "report.json", "report.md", "finetune.json"}
    report = json.loads((work / "runs/digits-dsc/report.json").read_text())
    assert report["totals"]["conv_mac_ratio"] <= 0.25 + 1e-9  # --macs 0.25 on every conv
    assert {r["family"] for r in report["layers"]} == {None, "dsc"}


def test_export_loads_in_torch_and_matches(walked):
    work, outputs = walked
    if dict(outputs)[LINES[-1]] == -1:
        pytest.skip("torch is not installed: the export line was skipped")
    import importlib.util

    import torch

    from factorize.data import load
    from factorize.training import restore

    out = work / "exports/digits-dsc"
    spec = importlib.util.spec_from_file_location("walkthrough_load", out / "load.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    torch_model = loader.load(str(out))
    x = load("digits").x_test[:16]
    with torch.no_grad():
        got = torch_model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    want = np.asarray(restore(work / "runs/digits-dsc")(x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_eval_json_after_walk(walked, capsys):
    """The converted run directory evaluates with --json to exactly one JSON object."""
    work, _ = walked
    capsys.readouterr()
    assert main(["eval", str(work / "runs/digits-dsc"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    finetuned = json.loads((work / "runs/digits-dsc/finetune.json").read_text())
    assert res["accuracy"] == pytest.approx(finetuned["accuracy_after"], abs=1e-6)


# Every other command in the README, and the test that runs it.
COVERED = {
    "bash scripts/main.sh": "tests/test_main_job.py",
    "bash scripts/test.sh": "scripts/test.sh is what CI runs (ruff, docs, the whole suite)",
    # the result tables' reproduction commands, run in their --quick form
    "python experiments/accuracy_vs_flops.py --dataset fashion_mnist --out results/fashion_mnist":
        "tests/test_accuracy_vs_flops.py",
    "python experiments/bench_latency.py --all-configs --repeats 5": "tests/test_benchmarks.py",
    "python experiments/bench_decompose.py": "tests/test_benchmarks.py",
    "python experiments/budget_allocation.py --stage fm-quarter":
        "tests/test_budget_allocation_experiment.py",
    # the same flags on a digits checkpoint; zoo: paths in tests/test_zoo.py
    "factorize convert zoo:fm-cnn-seed0 --budget 0.25 --families tucker2,cp3 --skip '^conv1$' "
    "--calibrate 512 --out runs/fm-budget": "tests/test_allocation.py",
    "bash scripts/docs.sh site": "scripts/test.sh (bash scripts/docs.sh)",
}


def readme_commands(text: str) -> list[str]:
    """Shell commands in the README: lines of ```bash blocks and `python|bash|factorize ...`
    inline code (joined across a line break)."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        cmds += [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    flat = re.sub(r"```.*?```", "", text, flags=re.DOTALL).replace("\n", " ")
    cmds += [c.strip() for c in re.findall(r"`((?:python|bash|factorize) [^`]+)`", flat)]
    return [" ".join(c.split()) for c in cmds]


def test_no_readme_command_is_untested():
    untested = [c for c in readme_commands(README.read_text())
                if c not in COVERED and c not in LINES]
    assert not untested, f"README commands no test runs: {untested}"
    for covering in COVERED.values():
        path = covering.split()[0]
        if path.startswith(("tests/", "scripts/")):
            assert (ROOT / path).exists(), path


@pytest.mark.slow  # ~18 s CPU: the quick start's CP-ALS and cp3 conversion compile once each
def test_readme_python_quick_start_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README's quick start is a ```python block"
    for code in blocks:
        exec(compile(code, "<README quick start>", "exec"), {})
