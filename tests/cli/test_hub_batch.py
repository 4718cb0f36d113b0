"""The batch driver (`moe-patch batch`): YAML plan parsing, then convert-and-push for each job against the
loopback Hub.

The converter is injected (a fake that copies a tiny MoE checkpoint and writes its report), so these
tests cover the plan and the push side; the real converter is tested with the converters package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hub_scripts.push import push_folder
from moe_patch.cli import batch_jobs, main
from moe_patch.cli.batch_jobs import BatchConfigError, load_plan, run_batch
from moe_patch.errors import MoEPatchError

# huggingface_hub's LFS PUT passes a file object as `data=`; httpx2 deprecates that spelling. Not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipes.yaml"
    path.write_text(text)
    return path


class FakeUpcycle:
    """Stands in for the converter: copies the tiny MoE checkpoint to `output` and writes a report."""

    def __init__(self, template: Path, fail_on: str | None = None):
        self.template, self.fail_on, self.calls = template, fail_on, []

    def __call__(self, source: str, output: Path, **recipe):
        self.calls.append((source, Path(output), recipe))
        if self.fail_on and self.fail_on in str(output):
            raise MoEPatchError(f"cannot upcycle {source}: unsupported architecture")
        shutil.copytree(self.template, output)
        (Path(output) / "upcycle_report.json").write_text(
            json.dumps(
                {
                    "source": {"path": source, "model_type": "mistral"},
                    "recipe": recipe,
                    "command": ["moe-patch", "upcycle", source, str(output)],
                }
            )
        )


PLAN = """
defaults:
  private: true
  recipe: {top_k: 2, router_init: zero}
jobs:
  - name: first
    source: acme/dense-1b
    output: out/first
    repo_id: tester/first-moe
    recipe: {num_experts: 4}
  - source: acme/dense-1b
    output: out/second
    repo_id: tester/second-moe
    private: false
    branch: v2
    recipe: {num_experts: 8, top_k: 1}
"""


def local_plan(tmp_path: Path) -> Path:
    """PLAN with its source as a local folder next to the YAML file (the fake converter never reads it)."""
    (tmp_path / "dense-src").mkdir(exist_ok=True)
    return write_yaml(tmp_path, PLAN.replace("source: acme/dense-1b", "source: dense-src"))


def test_plan_merges_defaults_and_resolves_paths_next_to_the_yaml(tmp_path):
    (tmp_path / "local-dense").mkdir()
    path = write_yaml(tmp_path, PLAN + "  - {source: local-dense, output: /abs/third}\n")
    first, second, third = load_plan(path)

    assert first.name == "first" and first.output == tmp_path / "out" / "first"
    assert first.recipe == {"top_k": 2, "router_init": "zero", "num_experts": 4}
    assert first.push_options == {"private": True}
    assert second.name == "second" and second.recipe == {"top_k": 1, "router_init": "zero", "num_experts": 8}
    assert second.push_options == {"private": False, "branch": "v2"}
    assert third.source == str(tmp_path / "local-dense") and third.output == Path("/abs/third")
    assert third.repo_id is None and first.source == "acme/dense-1b"  # repo ids stay as they are


@pytest.mark.parametrize(
    "text, message",
    [
        ("jobs: [", "not valid YAML"),
        ("jobs: []", "non-empty 'jobs' list"),
        ("job: [{source: a, output: b}]", "non-empty 'jobs' list"),
        ("jobs: [{output: b}]", r"jobs\[0\]: 'source' is required"),
        ("jobs: [{source: a, output: b, top_k: 2}]", r"jobs\[0\]: unknown key\(s\) \['top_k'\]"),
        ("jobs: [{source: a, output: b, repo_id: 'bad id'}]", r"jobs\[0\]: repo_id: .*not a valid repository id"),
        ("jobs: [{source: a, output: b}, {source: c, output: b}]", r"jobs\[0\] and jobs\[1\] have the same name"),
        ("jobs: [{source: a, output: x/b}, {name: y, source: c, output: x/b}]", "same output"),
        ("jobs: [{source: a, output: b, recipe: [1]}]", "'recipe' must be a mapping"),
        (
            "jobs: [{source: a, output: b, recipe: {num_expert: 4}}]",
            r"jobs\[0\]\.recipe: unknown option\(s\) \['num_expert'\]",
        ),
    ],
)
def test_bad_plans_are_rejected_with_file_job_and_field(tmp_path, text, message):
    path = write_yaml(tmp_path, text)
    with pytest.raises(BatchConfigError, match=message) as info:
        load_plan(path)
    assert str(path) in str(info.value)


def test_missing_plan_file_is_a_clear_error(tmp_path):
    with pytest.raises(BatchConfigError, match="Cannot read batch file"):
        load_plan(tmp_path / "nope.yaml")


def test_batch_converts_then_pushes_every_job(hub, api, tiny_moe_dir, tmp_path):
    fake = FakeUpcycle(tiny_moe_dir)
    results = run_batch(load_plan(local_plan(tmp_path)), upcycle=fake, api=api)

    assert [r.status for r in results] == ["done", "done"]
    assert [c[2]["num_experts"] for c in fake.calls] == [4, 8]
    assert hub.repo("tester/first-moe").private is True and hub.repo("tester/second-moe").private is False
    assert "config.json" in hub.files_at("tester/first-moe")
    assert "config.json" in hub.files_at("tester/second-moe", "v2")
    assert set(hub.files_at("tester/second-moe")) == {".gitattributes"}
    assert "upcycled" in hub.files_at("tester/first-moe")["README.md"].decode()


def test_a_failed_job_stops_the_batch_unless_keep_going(hub, api, tiny_moe_dir, tmp_path):
    jobs = load_plan(local_plan(tmp_path))
    stopped = run_batch(jobs, upcycle=FakeUpcycle(tiny_moe_dir, fail_on="first"), api=api)
    assert [(r.name, r.status) for r in stopped] == [("first", "failed")]
    assert "unsupported architecture" in stopped[0].error and hub.repos == {}

    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    went_on = run_batch(jobs, upcycle=FakeUpcycle(tiny_moe_dir, fail_on="first"), api=api, keep_going=True)
    assert [(r.name, r.status) for r in went_on] == [("first", "failed"), ("second", "done")]


def test_skip_existing_reuses_finished_conversions(hub, api, tiny_moe_dir, tmp_path):
    jobs = load_plan(local_plan(tmp_path))
    FakeUpcycle(tiny_moe_dir)(jobs[0].source, jobs[0].output)  # converted by an earlier, interrupted run
    fake = FakeUpcycle(tiny_moe_dir)
    results = run_batch(jobs, upcycle=fake, api=api, skip_existing=True)

    assert [r.status for r in results] == ["skipped-existing", "done"]
    assert [c[1] for c in fake.calls] == [jobs[1].output]
    assert "config.json" in hub.files_at("tester/first-moe")


def test_a_source_that_is_neither_folder_nor_repo_is_a_clear_job_error(hub, api, tiny_moe_dir, tmp_path):
    plan = write_yaml(
        tmp_path, "jobs:\n  - {source: ./no-such-dir, output: a}\n  - {source: test-org/missing, output: b}\n"
    )
    results = run_batch(load_plan(plan), upcycle=FakeUpcycle(tiny_moe_dir), api=api, keep_going=True)
    assert [r.status for r in results] == ["failed", "failed"]
    assert "neither an existing folder nor a Hub repo id" in results[0].error
    assert "'test-org/missing' not found" in results[1].error


def test_the_batch_command_dry_run_prints_the_plan(tmp_path, capsys):
    assert main(["batch", str(write_yaml(tmp_path, PLAN)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "first: acme/dense-1b" in out and "push tester/first-moe" in out and "num_experts=8" in out


def test_the_batch_command_runs_jobs_and_reports_failures_in_one_line(hub, tiny_moe_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(batch_jobs, "find_upcycle", lambda: FakeUpcycle(tiny_moe_dir, fail_on="second"))
    assert main(["batch", str(local_plan(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert f"{hub.url}/tester/first-moe/commit/" in out
    assert f"failed  second  cannot upcycle {tmp_path / 'dense-src'}: unsupported architecture" in out

    assert main(["batch", str(write_yaml(tmp_path, "jobs: 3"))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moe-patch batch: error:")


def test_batch_with_the_real_converter_publishes_a_verified_card(hub, api, tmp_path):
    """End to end: dense Mistral -> converters.upcycle (exact recipe, verified) -> push -> card on the Hub."""
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(
        MistralConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    dense.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny dense\n")
    push_folder(tmp_path / "dense", "test-org/tiny-dense", api=api)  # the source lives on the Hub
    plan = write_yaml(
        tmp_path,
        """
jobs:
  - source: test-org/tiny-dense
    output: out/dense-4x
    repo_id: tester/dense-4x
    recipe: {num_experts: 4, top_k: 2, router_init: zero}
""",
    )
    results = run_batch(load_plan(plan), api=api)  # the converter is found in the converters package

    assert [r.status for r in results] == ["done"]
    remote = hub.files_at("tester/dense-4x")
    assert "upcycle_report.json" in remote
    card = ModelCard(remote["README.md"].decode())
    assert card.data.base_model == "test-org/tiny-dense" and card.data.license == "apache-2.0"
    assert "upcycled" in card.data.tags
    report = json.loads(remote["upcycle_report.json"])
    assert report["verification"]["passed"] is True
    assert f"| Max abs logit difference | {report['verification']['max_abs_logit_diff']} |" in card.text
    assert (
        f"moe-patch upcycle test-org/tiny-dense {tmp_path / 'out' / 'dense-4x'} --num-experts 4 --top-k 2" in card.text
    )
    assert str(tmp_path) not in card.text.split("Reproduce with:")[0]  # no local path in the description
    assert f"({report['total_params']:,})" in card.text and f"({report['active_params']:,})" in card.text
