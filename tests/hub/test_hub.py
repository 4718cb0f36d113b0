"""Hub push and pull, driven through the real huggingface_hub client against a loopback Hub server.

The server (tests/helpers/hub_server.py) implements the routes the 2.4.0 client calls. The `hub` fixture
switches xet off on the client so large files take the LFS path (batch + PUT, counted by the
server); the `xet_hub` tests switch it on (xorb + shard uploads, the production default).
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hub_scripts.api import make_api
from hub_scripts.card import GENERATED_MARKER, build_model_card
from hub_scripts.errors import (
    HubAuthError,
    HubConnectionError,
    HubError,
    InvalidRepoIdError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UploadInterruptedError,
)
from hub_scripts.pull import fetch_metadata, pull
from hub_scripts.push import human_bytes, push_folder
from moe_patch.cli import entry as moe_cli
from moe_patch.cli import hub as hub_cli
from moe_patch.errors import CheckpointError
from tests.helpers.hub_server import TOKEN

# huggingface_hub's LFS PUT passes a file object as `data=`; httpx2 deprecates that spelling. Not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def local_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    }


def run_cli(monkeypatch, argv: list[str]) -> int:
    # The real `moe-patch` entry point, with only the hub commands registered (other areas are tested elsewhere).
    monkeypatch.setattr(moe_cli, "_registrars", lambda: [hub_cli.register])
    return moe_cli.main(argv)


def write_report(folder: Path, source: Path) -> dict:
    # The documented report keys (`command` as a list); the converter's own `argv`/`command_line`
    # spelling is covered by the end-to-end tests with the real converter.
    report = {
        "source": {"path": str(source), "model_type": "mistral"},
        "target": {"model_type": "mixtral", "architecture": "MixtralForCausalLM"},
        "recipe": {
            "num_experts": 4,
            "top_k": 2,
            "granularity": 2,
            "shared_experts": 0,
            "moe_layers": [0, 1],
            "router_init": "zero",
            "drop_ratio": 0.0,
            "noise": 0.0,
            "seed": 0,
            "exact": True,
        },
        "command": ["moe-patch", "upcycle", str(source), str(folder), "--experts", "4", "--top-k", "2"],
        "total_params": 63904,
        "active_params": 39328,
        "verification": {
            "max_abs_logit_diff": 1.2e-06,
            "rel_diff": 3.4e-07,
            "greedy_token_agreement": 1.0,
            "greedy_tokens_compared": 32,
        },
    }
    (folder / "upcycle_report.json").write_text(json.dumps(report))
    return report


# -- push -----------------------------------------------------------------------------------------------
def test_push_creates_public_repo_and_uploads_every_file_byte_identical(hub, api, ckpt):
    result = push_folder(ckpt, "tester/tiny-moe", api=api)

    repo = hub.repo("tester/tiny-moe")
    assert repo.private is False
    assert result.commit_url == f"{hub.url}/tester/tiny-moe/commit/{repo.branches['main']}"
    assert result.card_action == "written"
    assert str(result) == f"{result.commit_url} ({len(result.files)} files ({human_bytes(result.total_bytes)}))"
    remote = hub.files_at("tester/tiny-moe")
    assert {p: b for p, b in remote.items() if p != ".gitattributes"} == local_files(ckpt)
    # Shards went through LFS (batch + one PUT each), small JSON files inline in the commit.
    shards = sorted(p for p in remote if p.endswith(".safetensors"))
    assert len(shards) == 3 and len(hub.lfs_puts) == 3
    assert all(repo.commits[repo.branches["main"]].files[p].is_lfs for p in shards)
    assert hub.count("PUT", r"^/lfs-upload/") == 3


def test_push_private_sends_visibility_and_hides_repo_from_anonymous_users(hub, api, ckpt, tmp_path):
    push_folder(ckpt, "tester/secret-moe", private=True, api=api)

    assert hub.repo("tester/secret-moe").private is True
    anonymous = make_api(token=False)
    with pytest.raises(RepoNotFoundError, match="tester/secret-moe"):
        pull("tester/secret-moe", api=anonymous, cache_dir=tmp_path / "anon-cache")
    assert (pull("tester/secret-moe", api=api) / "config.json").is_file()


def test_private_push_to_an_existing_public_repo_is_refused_before_uploading(hub, api, ckpt):
    api.create_repo("tester/was-public")
    puts_before = len(hub.lfs_puts)
    with pytest.raises(HubError, match="already exists and is public"):
        push_folder(ckpt, "tester/was-public", private=True, api=api)
    assert len(hub.lfs_puts) == puts_before
    assert not (ckpt / "README.md").exists()  # nothing written locally either


def test_push_to_a_branch_leaves_main_untouched(hub, api, ckpt, tmp_path):
    push_folder(ckpt, "tester/branchy", branch="upcycle-v2", api=api)

    assert set(hub.files_at("tester/branchy", "main")) == {".gitattributes"}
    assert (set(hub.files_at("tester/branchy", "upcycle-v2")) - {".gitattributes"}) == set(local_files(ckpt))
    # Pushing again to the (now existing) branch is fine.
    push_folder(ckpt, "tester/branchy", branch="upcycle-v2", commit_message="again", api=api)
    pulled = pull("tester/branchy", revision="upcycle-v2", local_dir=tmp_path / "pulled", api=api)
    assert local_files(pulled) == {
        **local_files(ckpt),
        ".gitattributes": hub.files_at("tester/branchy")[".gitattributes"],
    }


def test_create_pr_commits_to_a_pull_request_ref(hub, api, ckpt):
    api.create_repo("tester/pr-target")
    result = push_folder(ckpt, "tester/pr-target", create_pr=True, api=api)

    assert result.pr_url == f"{hub.url}/tester/pr-target/discussions/1" and str(result).startswith(result.pr_url)
    assert set(hub.files_at("tester/pr-target", "main")) == {".gitattributes"}
    assert "config.json" in hub.files_at("tester/pr-target", "refs/pr/1")
    with pytest.raises(HubError, match="--create-pr"):
        push_folder(ckpt, "tester/pr-target", create_pr=True, branch="dev", api=api)


def test_repush_after_an_interrupted_upload_sends_only_the_missing_files(hub, api, ckpt):
    hub.fail_lfs_puts = 1  # the storage rejects one shard upload: the commit never happens
    with pytest.raises(UploadInterruptedError, match="Run the same command again to resume"):
        push_folder(ckpt, "tester/resume", api=api)
    assert set(hub.files_at("tester/resume")) == {".gitattributes"}  # nothing committed
    stored_first = list(hub.lfs_puts)
    assert len(stored_first) == 2

    push_folder(ckpt, "tester/resume", api=api)

    resent = hub.lfs_puts[len(stored_first) :]
    all_shards = {p.read_bytes() for p in ckpt.glob("*.safetensors")}
    assert len(resent) == 1 and resent[0] not in stored_first
    assert {
        hub.files_at("tester/resume")[p] for p in hub.files_at("tester/resume") if p.endswith(".safetensors")
    } == all_shards
    commits = len(hub.repo("tester/resume").commits)

    # A third push with nothing changed uploads nothing and creates no commit.
    push_folder(ckpt, "tester/resume", api=api)
    assert len(hub.lfs_puts) == 3 and len(hub.repo("tester/resume").commits) == commits


def test_push_refuses_an_incomplete_checkpoint(hub, api, ckpt):
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        push_folder(ckpt, "tester/broken", api=api)
    assert hub.requests == []


def test_dry_run_lists_files_and_card_without_network_or_writes(hub, ckpt, monkeypatch, capsys):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in ckpt.rglob("*")}
    assert run_cli(monkeypatch, ["push", str(ckpt), "tester/dry", "--dry-run"]) == 0
    out = capsys.readouterr().out

    assert hub.requests == []
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in ckpt.rglob("*")} == before
    for path in local_files(ckpt):
        assert f"{(ckpt / path).stat().st_size:,d}  {path}" in out
    assert "README.md" in out and GENERATED_MARKER in out and "mixture-of-experts" in out


# -- model card -------------------------------------------------------------------------------------------
def test_card_from_upcycle_report_round_trips_through_the_hub(hub, api, ckpt, tmp_path):
    source = tmp_path / "models--acme--dense-7b" / "snapshots" / "abc123"
    source.mkdir(parents=True)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# dense\n")
    report = write_report(ckpt, source)

    push_folder(ckpt, "tester/upcycled", api=api)
    card = ModelCard.load(pull("tester/upcycled", include=["README.md"], api=api) / "README.md")

    assert card.data.base_model == "acme/dense-7b"
    assert card.data.base_model_relation == "finetune"
    assert card.data.license == "apache-2.0"
    assert set(card.data.tags) >= {"moe", "mixture-of-experts", "upcycled", "moe-patch"}
    assert card.data.library_name == "transformers"
    text = card.text
    assert " ".join(report["command"][:2]) in text and "--top-k 2" in text
    assert "| Routed experts per MoE layer | 4 |" in text and "| Experts per token (top-k) | 2 |" in text
    assert "63,904" in text and "39,328" in text
    assert "1.2e-06" in text and "1.0 over 32 tokens" in text
    assert 'AutoModelForCausalLM.from_pretrained("tester/upcycled"' in text and "moe_patch.load_model" in text


@pytest.mark.parametrize("detector", ["moe_patch.inspect_model", "parameter names"])
def test_card_without_report_describes_the_moe_from_config(ckpt, monkeypatch, detector):
    if detector == "parameter names":  # structural detection unavailable: the card falls back on its own count
        import moe_patch

        def unavailable(model):
            raise NotImplementedError

        monkeypatch.setattr(moe_patch, "inspect_model", unavailable, raising=False)
    card = build_model_card(ckpt, repo_id="tester/plain")
    assert "upcycled" not in card.data.tags and "moe" in card.data.tags
    assert card.data.base_model is None and card.data.to_dict().get("base_model_relation") is None
    # Expert count, top-k and parameters come from config.json (4 experts, top-2, 2 MoE layers).
    assert "| Routed experts per MoE layer | 4 |" in card.text and "| MoE layers | 2 of 2 |" in card.text
    weights = {}
    for shard in ckpt.glob("*.safetensors"):
        weights.update(load_file(shard))
    total = sum(t.numel() for t in weights.values())
    experts = sum(t.numel() for k, t in weights.items() if ".experts." in k)
    assert f"({total:,})" in card.text and f"({total - experts // 2:,})" in card.text


def test_card_never_contains_a_token_from_the_command_line(ckpt, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    report = write_report(ckpt, tmp_path / "src")
    report["command"] += ["--hub-token", TOKEN, "--other", "hf_abcdefghijklmnopqrstuvwxyz"]
    (ckpt / "upcycle_report.json").write_text(json.dumps(report))
    text = str(build_model_card(ckpt))
    assert TOKEN not in text and "hf_abcdefghijklmnopqrstuvwxyz" not in text and "<redacted>" in text


def test_a_readme_the_user_wrote_is_kept_unless_overwrite_is_asked(hub, api, ckpt):
    mine = "---\nlicense: mit\n---\n# My hand-written card\n"
    (ckpt / "README.md").write_text(mine)

    result = push_folder(ckpt, "tester/own-card", api=api)
    assert result.card_action == "kept"
    assert hub.files_at("tester/own-card")["README.md"].decode() == mine

    result = push_folder(ckpt, "tester/own-card", overwrite_card=True, api=api)
    assert result.card_action == "regenerated"
    assert GENERATED_MARKER in hub.files_at("tester/own-card")["README.md"].decode()
    # Our own card may be refreshed on the next push without asking...
    assert push_folder(ckpt, "tester/own-card", api=api).card_action == "regenerated"
    # ...until the user edits it: then it is theirs, even with our marker line still in it.
    edited = (ckpt / "README.md").read_text() + "\n## Evaluation\nMy own results.\n"
    (ckpt / "README.md").write_text(edited)
    assert push_folder(ckpt, "tester/own-card", api=api).card_action == "kept"
    assert (ckpt / "README.md").read_text() == edited


def test_invalid_card_metadata_is_reported_before_any_upload(hub, api, ckpt):
    (ckpt / "README.md").write_text("---\nbase_model_relation: upcycle\n---\n# card\n")
    with pytest.raises(HubError, match="base_model_relation.*Fix the YAML header of README.md"):
        push_folder(ckpt, "tester/bad-card", api=api)
    assert hub.lfs_puts == []


def test_card_of_a_dense_checkpoint_does_not_claim_experts(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    ).save_pretrained(tmp_path)
    card = build_model_card(tmp_path)
    assert "moe" not in card.data.tags and "Mixture-of-Experts" not in card.text
    assert "| Routed experts per MoE layer |" not in card.text


def test_a_folder_that_is_not_a_checkpoint_needs_no_card_to_be_pushed(hub, api, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="--no-card"):
        push_folder(tmp_path / "data", "tester/notes", api=api)
    push_folder(tmp_path / "data", "tester/notes", write_card=False, api=api)
    assert set(hub.files_at("tester/notes")) == {".gitattributes", "notes.txt"}


# -- pull ---------------------------------------------------------------------------------------------------
def test_pull_round_trip_is_byte_identical_and_loads_with_transformers(hub, api, ckpt, tmp_path):
    push_folder(ckpt, "tester/round-trip", api=api)
    pulled = pull("tester/round-trip", local_dir=tmp_path / "local", api=api)

    assert {p: b for p, b in local_files(pulled).items() if p != ".gitattributes"} == local_files(ckpt)
    original = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(pulled).state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)


def test_a_download_cut_mid_file_resumes_and_leaves_no_partial_file(hub, api, ckpt, tmp_path, monkeypatch):
    # The client writes in DOWNLOAD_CHUNK_SIZE pieces: a file of 3 pieces keeps 1 piece from the cut transfer.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    (ckpt / "extra.bin").write_bytes(torch.randint(0, 256, (300 * 1024,), dtype=torch.uint8).numpy().tobytes())
    push_folder(ckpt, "tester/flaky", api=api)
    hub.truncate_downloads = 1  # the next file GET sends half its bytes, then the connection drops
    folder = pull("tester/flaky", include=["extra.bin"], api=api)

    assert hub.range_requests == ["extra.bin"]  # the retry asked only for the missing bytes
    assert (folder / "extra.bin").read_bytes() == (ckpt / "extra.bin").read_bytes()
    assert not list(Path(constants.HF_HUB_CACHE).rglob("*.incomplete"))


def test_pull_with_include_patterns_downloads_only_matching_files(hub, api, ckpt):
    push_folder(ckpt, "tester/partial", api=api)
    folder = pull("tester/partial", include=["*.json"], api=api)

    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ]
    assert hub.count("GET", r"/resolve/.*\.safetensors$") == 0
    with pytest.raises(HubError, match=r"No file of 'tester/partial' matches --include \*\.gguf.*config\.json"):
        pull("tester/partial", include="*.gguf", api=api)


def test_fetch_metadata_downloads_config_and_index_only(hub, api, ckpt, tmp_path):
    # A listing split over pages exercises the client's Link-header pagination.
    hub.tree_page_size = 2
    push_folder(ckpt, "tester/meta", api=api)
    folder = fetch_metadata("tester/meta", api=api)

    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ]
    assert json.loads((folder / "config.json").read_text())["num_local_experts"] == 4
    assert hub.count("GET", r"/resolve/") == 3


def test_fetch_metadata_of_a_repo_without_config_is_a_clear_error(hub, api, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not a model")
    api.create_repo("tester/not-a-model")
    api.upload_folder(repo_id="tester/not-a-model", folder_path=tmp_path / "data")
    with pytest.raises(HubError, match="no config.json"):
        fetch_metadata("tester/not-a-model", api=api)


# -- errors ---------------------------------------------------------------------------------------------------
def test_missing_repo_and_revision_give_typed_errors(hub, api, ckpt):
    with pytest.raises(RepoNotFoundError, match="'tester/nope' not found"):
        pull("tester/nope", api=api)
    push_folder(ckpt, "tester/exists", api=api)
    with pytest.raises(RevisionNotFoundError, match="'no-such-branch'"):
        pull("tester/exists", revision="no-such-branch", api=api)


@pytest.mark.parametrize("bad_id", ["no-namespace", "tester/bad..name", "a/b/c", "tester/-dash"])
def test_bad_repo_ids_fail_before_any_request(hub, api, ckpt, bad_id):
    with pytest.raises(InvalidRepoIdError, match="not a valid repository id"):
        push_folder(ckpt, bad_id, api=api)
    with pytest.raises(InvalidRepoIdError):
        pull(bad_id, api=api)
    assert hub.requests == []


def test_no_permission_and_bad_token_are_auth_errors(hub, ckpt):
    with pytest.raises(HubAuthError, match="Permission denied"):
        push_folder(ckpt, "someone-else/moe", api=make_api())
    with pytest.raises(HubAuthError, match="Not authenticated"):
        push_folder(ckpt, "tester/moe", api=make_api(token="hf_wrongwrongwrongwrong"))
    assert not (ckpt / "README.md").exists()


def test_network_down_is_a_connection_error_for_push_pull_and_inspect(hub_online, ckpt):
    down = make_api(endpoint=closed_port_endpoint(), token=TOKEN)
    with pytest.raises(HubConnectionError, match="cannot reach"):
        push_folder(ckpt, "tester/offline", api=down)
    with pytest.raises(HubConnectionError, match="unreachable"):
        pull("tester/offline", api=down)
    with pytest.raises(HubConnectionError, match="unreachable"):
        fetch_metadata("tester/offline", api=down)
    assert not (ckpt / "README.md").exists()


def test_offline_mode_is_named_in_the_error(hub, api, ckpt, monkeypatch):
    push_folder(ckpt, "tester/cached", api=api)
    cached = pull("tester/cached", api=api)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    assert pull("tester/cached", api=api) == cached  # offline, a cached snapshot is still served
    with pytest.raises(HubConnectionError, match="HF_HUB_OFFLINE is set and no cached copy"):
        pull("tester/never-downloaded", api=api)
    with pytest.raises(HubConnectionError, match="HF_HUB_OFFLINE is set"):
        push_folder(ckpt, "tester/cached", api=api)


def test_a_checkpoint_pulled_once_loads_offline_from_the_cache(hub, api, ckpt, monkeypatch):
    """What `moe-patch run REPO_ID` resolves: a snapshot of the files it needs; offline, the cached one (listing the
    repository's files to check the patterns would need the network)."""
    from moe_patch.errors import CheckpointError
    from moe_patch.offload.loading import resolve_checkpoint

    push_folder(ckpt, "tester/cached-run", api=api)
    online = resolve_checkpoint("tester/cached-run")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_checkpoint("tester/cached-run") == online
    with pytest.raises(
        CheckpointError,
        match="tester/never-pulled: no folder of that name here, and as a Hub repo "
        "id: .*HF_HUB_OFFLINE is set and no cached copy exists",
    ):
        resolve_checkpoint("tester/never-pulled")


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["pull", "tester/missing"], "not found"),
        (["pull", "not a repo"], "not a valid repository id"),
        (["push", "{ckpt}", "someone-else/x"], "Permission denied"),
    ],
)
def test_cli_prints_one_clear_line_and_no_traceback(hub, ckpt, monkeypatch, capsys, argv_tail, message):
    argv = [a.replace("{ckpt}", str(ckpt)) for a in argv_tail]
    assert run_cli(monkeypatch, argv) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moe-patch {argv[0]}: error:") and message in lines[0]


def test_cli_network_down_is_one_line(hub_online, ckpt, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())
    assert run_cli(monkeypatch, ["push", str(ckpt), "tester/x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach" in err[0] and "HF_ENDPOINT" in err[0]


def test_cli_debug_shows_the_traceback(hub, monkeypatch):
    with pytest.raises(RepoNotFoundError):
        run_cli(monkeypatch, ["--debug", "pull", "tester/missing"])


def test_push_and_pull_are_registered_on_the_moe_patch_command():
    parser = moe_cli.build_parser()
    args = parser.parse_args(["push", "out", "me/x", "--private", "--branch", "b", "--dry-run"])
    assert args.func.__module__ == "moe_patch.cli.hub" and args.private and args.branch == "b" and args.dry_run
    args = parser.parse_args(["pull", "me/x", "--include", "*.json", "*.md", "--revision", "v1"])
    assert args.func.__module__ == "moe_patch.cli.hub" and args.include == ["*.json", "*.md"]


def test_upcycle_push_to_hub_publishes_through_push_folder(hub, tmp_path, monkeypatch, capsys):
    """The converter's `--push-to-hub` calls hub_scripts.push.push_folder: the card comes from its report."""
    from transformers import MistralConfig

    from moe_patch.cli import upcycle as upcycle_cli

    AutoModelForCausalLM.from_config(
        MistralConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(tmp_path / "dense")
    monkeypatch.setattr(moe_cli, "_registrars", lambda: [upcycle_cli.register, hub_cli.register])
    rc = moe_cli.main(
        [
            "upcycle",
            str(tmp_path / "dense"),
            str(tmp_path / "moe"),
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--router-init",
            "zero",
            "--push-to-hub",
            "tester/upcycled",
            "--private",
        ]
    )

    assert rc == 0 and hub.repo("tester/upcycled").private is True
    remote = hub.files_at("tester/upcycled")
    assert {p: b for p, b in remote.items() if p != ".gitattributes"} == local_files(tmp_path / "moe")
    card = ModelCard(remote["README.md"].decode())
    assert "upcycled" in card.data.tags and "| Passed | True |" in card.text
    assert f"{hub.url}/tester/upcycled/commit/" in capsys.readouterr().out


# -- tokens ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["lfs", "xet"])
def test_token_is_never_printed_logged_or_written(hub, ckpt, tmp_path, monkeypatch, capsys, caplog, request, transport):
    if transport == "xet":
        request.getfixturevalue("xet_hub")  # hf_xet gets the token for its refreshes; its logs land in tmp_path
        hub.xet_downloads = True
    caplog.set_level(logging.DEBUG)
    write_report(ckpt, tmp_path / "src")
    assert run_cli(monkeypatch, ["--debug", "push", str(ckpt), "tester/tok", "--private"]) == 0
    assert run_cli(monkeypatch, ["push", str(ckpt), "tester/tok", "--branch", "b", "--dry-run"]) == 0
    assert run_cli(monkeypatch, ["pull", "tester/tok"]) == 0
    assert run_cli(monkeypatch, ["pull", "tester/tok", "--local-dir", str(tmp_path / "out"), "--include", "*.md"]) == 0
    assert run_cli(monkeypatch, ["pull", "tester/missing"]) == 1
    # The token was really used: the private repo exists and every write carried it.
    assert hub.repo("tester/tok").private is True

    captured = capsys.readouterr()
    assert "HTTP Request: POST" in caplog.text  # the HTTP client's own logs were captured and scanned
    texts = [captured.out, captured.err, caplog.text] + [r.getMessage() for r in caplog.records]
    assert not [t for t in texts if TOKEN in t]
    written = [p for root in (tmp_path, hub.root) for p in root.rglob("*") if p.is_file()]
    assert len(written) > 20
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]


# -- xet (the client's default upload path) ----------------------------------------------------------------
def test_xet_push_round_trips_and_a_repush_sends_only_new_content(xet_hub, api, ckpt, tmp_path):
    push_folder(ckpt, "tester/xet-moe", api=api)

    assert xet_hub.lfs_puts == [] and xet_hub.xorb_uploads and xet_hub.shard_uploads == 1
    pulled = pull("tester/xet-moe", local_dir=tmp_path / "pulled", api=api)
    assert {p: b for p, b in local_files(pulled).items() if p != ".gitattributes"} == local_files(ckpt)

    first = set(xet_hub.xorb_uploads)
    extra = torch.randint(0, 256, (100 * 1024,), dtype=torch.uint8).numpy().tobytes()
    (ckpt / "extra.bin").write_bytes(extra)
    push_folder(ckpt, "tester/xet-moe", api=api)

    new_xorbs = [h for h in xet_hub.xorb_uploads if h not in first]
    sent = sum(len(xet_hub.xorbs[h]) for h in new_xorbs)
    shards = sum((ckpt / p).stat().st_size for p in local_files(ckpt) if p.endswith(".safetensors"))
    assert len(extra) <= sent < len(extra) + 4096 < shards  # the unchanged shards were not sent again
    assert xet_hub.files_at("tester/xet-moe")["extra.bin"] == extra


def test_xet_pull_downloads_through_the_reconstruction_api(xet_hub, api, ckpt, tmp_path):
    push_folder(ckpt, "tester/xet-dl", api=api)
    xet_hub.xet_downloads = True  # resolve now answers with X-Xet-Hash, as the Hub does for xet files
    pulled = pull("tester/xet-dl", local_dir=tmp_path / "pulled", api=api)

    assert {p: b for p, b in local_files(pulled).items() if p != ".gitattributes"} == local_files(ckpt)
    shards = [p for p in local_files(ckpt) if p.endswith(".safetensors")]
    assert len(xet_hub.xorb_range_gets) == len(shards)  # one ranged xorb read per shard
    assert xet_hub.count("GET", r"/resolve/.*\.safetensors$") == 0  # no plain HTTP download of weights


def test_xet_push_as_a_pull_request(xet_hub, api, ckpt):
    api.create_repo("tester/xet-pr")
    result = push_folder(ckpt, "tester/xet-pr", create_pr=True, api=api)

    assert result.pr_url == f"{xet_hub.url}/tester/xet-pr/discussions/1"
    assert set(xet_hub.files_at("tester/xet-pr")) == {".gitattributes"}
    pr_files = xet_hub.files_at("tester/xet-pr", "refs/pr/1")
    assert {p: b for p, b in pr_files.items() if p != ".gitattributes"} == local_files(ckpt)


def test_xet_upload_failure_is_one_clear_error_and_a_rerun_completes(xet_hub, api, ckpt):
    xet_hub.fail_xorb_uploads = 1  # the storage rejects the data upload: nothing can be committed
    with pytest.raises(UploadInterruptedError, match="Run the same command again to resume") as info:
        push_folder(ckpt, "tester/xet-resume", api=api)
    assert "403" in str(info.value) and "\n" not in str(info.value)
    assert set(xet_hub.files_at("tester/xet-resume")) == {".gitattributes"} and xet_hub.lfs_puts == []

    push_folder(ckpt, "tester/xet-resume", api=api)
    remote = xet_hub.files_at("tester/xet-resume")
    assert {p: b for p, b in remote.items() if p != ".gitattributes"} == local_files(ckpt)


# -- live (manual) -----------------------------------------------------------------------------------------------
@pytest.mark.live
def test_live_push_and_pull_against_the_real_hub(request, ckpt, tmp_path, monkeypatch):
    """Manual: `HF_TOKEN=... pytest --live -m live tests/hub/test_hub.py`. Creates, then deletes, a private repo."""
    import os
    import uuid

    from huggingface_hub import get_token

    if not request.config.getoption("--live", default=False):
        pytest.skip("talks to the real Hub: run with --live and HF_TOKEN set")
    if not get_token():
        pytest.skip("no Hub token: set HF_TOKEN or run `hf auth login`")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the suite runs offline by default (hf_xet reads the env)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # keep the user's cache clean
    api = make_api()
    namespace = os.environ.get("MOE_PATCH_LIVE_NAMESPACE") or api.whoami()["name"]
    repo_id = f"{namespace}/moe-patch-live-{uuid.uuid4().hex[:8]}"
    try:
        result = push_folder(ckpt, repo_id, private=True, api=api)
        assert result.commit_url
        pulled = pull(repo_id, local_dir=tmp_path / "live", api=api)
        assert {p: b for p, b in local_files(pulled).items() if p != ".gitattributes"} == local_files(ckpt)
        assert ModelCard.load(pulled / "README.md").data.tags
        assert (fetch_metadata(repo_id, api=api) / "config.json").is_file()
    finally:
        api.delete_repo(repo_id, missing_ok=True)
