"""transformers' own model tests, stock and under `patch_model`, per family: which tests a patch breaks.

    python bench/transformers_suite.py TRANSFORMERS_CHECKOUT [--families mixtral qwen3_moe ...]
        [-k test_eager_matches_batched_and_grouped_inference_0_fp16] [--out results.json]

For each family, pytest runs ``tests/models/FAMILY/test_modeling_FAMILY.py`` of the checkout twice in a subprocess:
once stock, once with this file loaded as a pytest plugin (``-p transformers_suite``), which patches every model
the tests build: ``PreTrainedModel.post_init`` (the last step of every transformers model's ``__init__``, also
inside ``from_pretrained``) is wrapped to call ``moe_patch.patch_model`` on the model just built (an inner model
patched a moment earlier, e.g. ``MixtralModel`` inside ``MixtralForCausalLM``, is unpatched first, so the outer
model holds the patch, as when a user patches what they loaded). The JUnit XML of both runs gives each test's
outcome; a regression is a test that passes stock and fails patched. Default: every family whose experts are
decorated (moe-patch's ``"moe_patch"`` implementation) and that has a test file in the checkout; default test
selection: the fp16 variant of ``test_eager_matches_batched_and_grouped_inference`` (``-k ""`` runs the whole file).

The checkout's tests need ``parameterized``, ``pytest-xdist`` (its conftest uses a hook of it) and ``httpx``.
Nothing of transformers is copied into this repository. Timing is not measured here: the runs only compare outcomes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

DEFAULT_SELECTION = "test_eager_matches_batched_and_grouped_inference_0_fp16"
PATCH_ENV = "MOE_PATCH_SUITE_COUNTS"  # set in the patched run: where the plugin writes how many models it patched


# -- the plugin (loaded by pytest in the patched run) --------------------------------------------------------------
def pytest_configure(config) -> None:  # noqa: ARG001 - pytest's hook signature
    import logging

    from transformers import PreTrainedModel

    from moe_patch import patch_model, unpatch_model
    from moe_patch.patch import STATE_ATTR

    logging.getLogger("moe_patch").setLevel(logging.ERROR)  # "no MoE block" for the dense sub-models of a test
    counts = {"models": 0, "patched": 0}
    real = PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        for inner in self.modules():
            if inner is not self and isinstance(inner, PreTrainedModel) and getattr(inner, STATE_ATTR, None):
                unpatch_model(inner)
        counts["models"] += 1
        counts["patched"] += bool(patch_model(self).patched)

    PreTrainedModel.post_init = post_init
    config._moe_patch_counts = counts


def pytest_unconfigure(config) -> None:
    counts = getattr(config, "_moe_patch_counts", None)
    if counts is not None and os.environ.get(PATCH_ENV):
        Path(os.environ[PATCH_ENV]).write_text(json.dumps(counts))


# -- the runner ----------------------------------------------------------------------------------------------------
def decorated_families(checkout: Path) -> list[str]:
    """Families whose experts carry transformers' experts decorator and that have a model test file."""
    from moe_patch.testing.discover import discover_moe_families, moe_family_info

    modules = sorted({moe_family_info(f).module for f in discover_moe_families() if moe_family_info(f).decorated})
    return [m for m in modules if _test_file(checkout, m).is_file()]


def _test_file(checkout: Path, family: str) -> Path:
    return checkout / "tests" / "models" / family / f"test_modeling_{family}.py"


def _outcomes(junit: Path) -> dict[str, str]:
    """test id -> passed | failed | skipped, from pytest's JUnit XML."""
    out: dict[str, str] = {}
    if not junit.is_file():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out[test_id] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return out


def run_family(
    checkout: Path, family: str, selection: str, patched: bool, workdir: Path, timeout: float
) -> tuple[dict[str, str], dict | None, str]:
    junit = workdir / f"{family}-{'patched' if patched else 'stock'}.xml"
    counts = workdir / f"{family}-counts.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(_test_file(checkout, family)),
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "-o",
        "junit_family=xunit1",
    ]
    if selection:
        cmd += ["-k", selection]
    if patched:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
        env[PATCH_ENV] = str(counts)
        cmd += ["-p", Path(__file__).stem]
    try:
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout)
        tail = proc.stdout[-2000:] + proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        tail = f"timed out after {timeout:.0f} s"
    return _outcomes(junit), json.loads(counts.read_text()) if patched and counts.is_file() else None, tail


def compare(stock: dict[str, str], patched: dict[str, str]) -> dict:
    def tally(outcomes: dict[str, str]) -> dict[str, int]:
        return {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}

    regressions = sorted(
        t for t, o in stock.items() if o == "passed" and patched.get(t) != "passed" and patched.get(t) != "skipped"
    )
    newly_skipped = sorted(t for t, o in stock.items() if o == "passed" and patched.get(t) == "skipped")
    fixed = sorted(t for t, o in stock.items() if o == "failed" and patched.get(t) == "passed")
    return {
        "tests": len(stock),
        "stock": tally(stock),
        "patched": tally(patched),
        "regressions": regressions,
        "passed_stock_skipped_patched": newly_skipped,
        "failed_stock_passed_patched": fixed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="a transformers source tree (its tests/ folder is what runs)")
    p.add_argument("--families", nargs="+", help="transformers model folders (default: every decorated family)")
    p.add_argument("-k", dest="selection", default=DEFAULT_SELECTION, help="pytest -k expression ('' for all)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run (default 3600)")
    p.add_argument("--out", type=Path, help="write the per-family results as JSON")
    args = p.parse_args(argv)
    checkout = args.checkout.resolve()
    families = args.families or decorated_families(checkout)
    results = {}
    with tempfile.TemporaryDirectory(prefix="transformers-suite-") as tmp:
        for family in families:
            stock, _, stock_tail = run_family(checkout, family, args.selection, False, Path(tmp), args.timeout)
            patched, counts, patched_tail = run_family(checkout, family, args.selection, True, Path(tmp), args.timeout)
            results[family] = {**compare(stock, patched), "models_built": counts}
            if not stock and not patched:
                results[family]["note"] = f"no test ran: {stock_tail[-300:]}"
            r = results[family]
            tally_s, tally_p = r["stock"], r["patched"]
            print(
                f"{family:24s} tests {r['tests']:4d}  stock {tally_s['passed']:4d} passed {tally_s['failed']:3d} "
                f"failed {tally_s['skipped']:4d} skipped | patched {tally_p['passed']:4d} passed "
                f"{tally_p['failed']:3d} failed {tally_p['skipped']:4d} skipped | regressions "
                f"{len(r['regressions'])}"
                + (f"  models patched {counts['patched']}/{counts['models']}" if counts else ""),
                flush=True,
            )
            for test in r["regressions"]:
                print(f"    regression: {test}", flush=True)
    total = {k: sum(len(r[k]) for r in results.values()) for k in ("regressions", "failed_stock_passed_patched")}
    print(
        f"{len(families)} families: {total['regressions']} regressions, "
        f"{total['failed_stock_passed_patched']} tests failing stock and passing patched"
    )
    if args.out:
        args.out.write_text(json.dumps({"selection": args.selection, "families": results}, indent=2) + "\n")
    return 1 if total["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
