"""`moe-patch run` as `llama-cli` users run it: the text on stdout as it is generated, everything else on stderr,
Ctrl-C keeps what was generated, `--json` is one document, the prompt from a file or a pipe.

The real console script runs on a tiny Mixtral checkpoint (random weights, a 4096-token context so a long
generation can be interrupted) with a word-level tokenizer; every text is compared with transformers'
greedy ``generate()`` on the same checkpoint loaded fully resident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_patch.cli import main
from tests.cli.terminal_helpers import Terminal
from tests.helpers.offload import VOCAB, build, expert_bytes
from tests.helpers.tokenizer import save_word_tokenizer

MOE_PATCH = Path(sys.executable).with_name("moe-patch")  # the console script of this environment
CONTEXT = 4096
PROMPT = "w5 w6 w7"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(not MOE_PATCH.exists(), reason="the moe-patch console script is not installed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = build("mixtral")
    model.config.max_position_embeddings = CONTEXT
    path = tmp_path_factory.mktemp("run") / "tiny-moe"
    model.save_pretrained(path)
    save_word_tokenizer(path, VOCAB)
    return path


class Reference:
    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False)
        return out[0, len(ids) :].tolist()

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def ref(checkpoint) -> Reference:
    return Reference(checkpoint)


def flags() -> list[str]:
    one = expert_bytes("mixtral")
    return ["--dtype", "float32", "--expert-cache", f"{2 * one}B", "--host-cache", f"{3 * one}B"]


def run(checkpoint: Path, *argv: str, stdin: str | None = None, shell_tail: str = "") -> subprocess.CompletedProcess:
    command = [str(MOE_PATCH), "run", str(checkpoint), *flags(), *argv]
    if shell_tail:  # `moe-patch run ... | TAIL`, as a shell runs it
        command = ["bash", "-o", "pipefail", "-c", " ".join(map(repr, command)) + " | " + shell_tail]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300, env=ENV)


# -- stdout is the text ---------------------------------------------------------------------------------------------
def test_stdout_holds_only_the_generated_text_and_stderr_the_rest(checkpoint, ref):
    proc = run(checkpoint, "-p", PROMPT, "-n", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ref.text(ref.greedy(ref.ids(PROMPT), 12)) + "\n"
    assert "prompt: 3 tokens; generated: 12 tokens (length)" in proc.stderr
    assert "moe-patch offload statistics" in proc.stderr and "hit rate" in proc.stderr


def test_quiet_prints_the_text_and_nothing_else(checkpoint, ref):
    proc = run(checkpoint, "-q", "-p", PROMPT, "-n", "5")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == ref.text(ref.greedy(ref.ids(PROMPT), 5)) + "\n"


def test_the_prompt_comes_from_a_file_or_standard_input(checkpoint, ref, tmp_path):
    expected = ref.text(ref.greedy(ref.ids(PROMPT), 6)) + "\n"
    (tmp_path / "prompt.txt").write_text(PROMPT + "\n")
    from_file = run(checkpoint, "-q", "-n", "6", "-f", str(tmp_path / "prompt.txt"))
    from_stdin = run(checkpoint, "-q", "-n", "6", "-f", "-", stdin=PROMPT)
    assert from_file.stdout == from_stdin.stdout == expected, from_file.stderr + from_stdin.stderr


# -- --json is one document --------------------------------------------------------------------------------------
def _no_nan(constant: str):
    raise AssertionError(f"{constant} is not JSON")


def test_json_is_one_document_with_the_text_its_ids_and_finite_statistics(checkpoint, ref):
    """A one-token prompt: the prefill is still a prefill (its speed is a number, not NaN)."""
    piped = run(
        checkpoint,
        "--prompt-ids",
        "20",
        "-n",
        "8",
        "--json",
        shell_tail=f"{sys.executable} -c 'import json,sys; json.load(sys.stdin)'",
    )
    assert piped.returncode == 0, piped.stderr
    proc = run(checkpoint, "--prompt-ids", "20", "-n", "8", "--json")
    document = json.loads(proc.stdout, parse_constant=_no_nan)
    expected = ref.greedy([20], 8)
    assert document["token_ids"] == expected and document["text"] == ref.text(expected)
    assert document["prompt_tokens"] == 1 and document["generated_tokens"] == 8
    assert document["finish_reason"] == "length"
    stats = document["statistics"]
    assert stats["prefill_tokens_per_s"] > 0 and stats["decode_tokens_per_s"] > 0
    assert "nan" not in proc.stderr.lower()


def test_text_statistics_never_show_nan_for_a_one_token_prompt(checkpoint):
    proc = run(checkpoint, "--prompt-ids", "20", "-n", "3")
    assert proc.returncode == 0 and "nan" not in proc.stderr.lower()
    assert "prefill: 1 tokens" in proc.stderr


# -- streaming and Ctrl-C, in a terminal ------------------------------------------------------------------------------
def test_tokens_appear_as_generated_and_ctrl_c_keeps_them(checkpoint, ref):
    expected = ref.greedy(ref.ids(PROMPT), 3)
    term = Terminal([str(MOE_PATCH), "run", str(checkpoint), *flags(), "-p", PROMPT, "-n", str(CONTEXT - 3)], ENV)
    try:
        term.expect(ref.text(expected))  # the first words, while it generates thousands
        assert term.proc.poll() is None, "the text appeared only once generation had ended"
        term.ctrl_c()
        assert term.finish() == 130
        match = term.expect(r"prompt: 3 tokens; generated: (\d+) tokens \(interrupted\)")
        generated = int(match.group(1))
        assert 3 <= generated < CONTEXT - 3
        shown = term.seen[: term.seen.index("prompt: 3 tokens")].split("\n")
        text = next(line for line in shown if line.startswith(ref.text(expected)))
        assert text == ref.text(ref.greedy(ref.ids(PROMPT), generated))  # every generated token was kept
        assert f"interrupted after {generated} generated tokens; what was generated is kept" in term.seen
    finally:
        term.close()


def test_ctrl_c_under_json_gives_one_document_with_the_partial_text(checkpoint, ref):
    term = Terminal(
        [str(MOE_PATCH), "run", str(checkpoint), *flags(), "-p", PROMPT, "-n", str(CONTEXT - 3), "--json"],
        ENV,
        stdout_pipe=True,
    )
    try:
        term.expect(r"generating:.*\b([1-9]\d*)/4093")  # the progress bar on the terminal: tokens are coming
        term.ctrl_c()
        assert term.finish() == 130
        document = json.loads(term.stdout(), parse_constant=_no_nan)
    finally:
        term.close()
    ids = document["token_ids"]
    assert document["finish_reason"] == "interrupted" and 1 <= len(ids) < CONTEXT - 3
    assert ids == ref.greedy(ref.ids(PROMPT), len(ids)) and document["text"] == ref.text(ids)


# -- arguments as llama-cli spells them ------------------------------------------------------------------------------
def test_short_options_and_temp_are_the_long_ones(checkpoint, capsys):
    from moe_patch.cli.entry import build_parser

    args = build_parser().parse_args(
        ["run", str(checkpoint), "-p", "x", "-n", "7", "-c", "64", "-t", "2", "-s", "3", "--temp", "0.5", "-q"]
    )
    assert (args.prompt, args.max_new_tokens, args.ctx_size, args.threads, args.seed, args.temperature, args.quiet) == (
        "x",
        7,
        64,
        2,
        3,
        0.5,
        True,
    )
    assert args.device == "auto" and args.expert_cache == "auto"  # the defaults for a model that should just fit


def test_direct_io_reaches_the_offload_options(checkpoint):
    from moe_patch.cli.entry import build_parser
    from moe_patch.cli.offload_args import offload_options

    parse = build_parser().parse_args
    assert offload_options(parse(["run", str(checkpoint), "-p", "x", "--device", "cpu"])).direct_io == "auto"
    args = parse(["run", str(checkpoint), "-p", "x", "--device", "cpu", "--direct-io", "never"])
    assert offload_options(args).direct_io == "never"
    with pytest.raises(SystemExit):
        parse(["run", str(checkpoint), "-p", "x", "--direct-io", "sometimes"])


def test_threads_are_honoured(checkpoint, capsys):
    assert main(["run", str(checkpoint), *flags(), "--prompt-ids", "5", "-n", "2", "-q", "-t", "2"]) == 0
    assert torch.get_num_threads() == 2  # the fixture puts the test's own count back


def test_the_context_bounds_the_prompt_and_the_new_tokens(checkpoint, capsys):
    assert main(["run", str(checkpoint), *flags(), "-p", PROMPT, "-c", "8", "-n", "10"]) == 1
    err = capsys.readouterr().err
    assert "--max-new-tokens: the prompt (3 tokens) plus 10 new tokens exceeds the context of 8 tokens" in err
    assert main(["run", str(checkpoint), *flags(), "-p", PROMPT, "-c", "8", "-q"]) == 0  # the default is cut to fit
    assert len(capsys.readouterr().out.split()) == 5
    assert main(["run", str(checkpoint), *flags(), "-p", PROMPT, "-c", str(CONTEXT + 1)]) == 1
    assert f"--ctx-size {CONTEXT + 1}: the model's context is {CONTEXT} tokens" in capsys.readouterr().err


def test_sampling_with_a_seed_is_reproducible(checkpoint, capsys):
    argv = [
        "run",
        str(checkpoint),
        *flags(),
        "-p",
        PROMPT,
        "-n",
        "12",
        "--temp",
        "1.2",
        "--top-k",
        "40",
        "-s",
        "7",
        "-q",
    ]
    texts = []
    for _ in range(2):
        assert main(argv) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0].split()) == 12


def test_the_automatic_expert_cache_is_chosen_and_said(checkpoint, ref):
    proc = subprocess.run(
        [str(MOE_PATCH), "run", str(checkpoint), "--dtype", "float32", "-p", PROMPT, "-n", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert "expert cache auto: " in proc.stderr and "free on cpu" in proc.stderr
    assert proc.stdout == ref.text(ref.greedy(ref.ids(PROMPT), 4)) + "\n"


def test_device_auto_is_cuda_when_torch_sees_a_gpu(monkeypatch):
    from moe_patch.cli.offload_args import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"


# -- the command line around it ----------------------------------------------------------------------------------------
def test_debug_is_accepted_after_the_command_too(tmp_path):
    missing = str(tmp_path / "nowhere")
    for argv in (["--debug", "run", missing, "--prompt-ids", "1"], ["run", missing, "--prompt-ids", "1", "--debug"]):
        proc = subprocess.run([str(MOE_PATCH), *argv], capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
    proc = subprocess.run(
        [str(MOE_PATCH), "run", missing, "--prompt-ids", "1"], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert proc.stderr.count("\n") == 1 and "no such folder" in proc.stderr


def test_version_names_moe_patch_transformers_and_torch():
    from importlib.metadata import version

    proc = subprocess.run([str(MOE_PATCH), "--version"], capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 0
    assert proc.stdout.strip() == (
        f"moe-patch {version('moe-patch')} (transformers {version('transformers')}, torch {version('torch')})"
    )
