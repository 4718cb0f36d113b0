"""The server: its overhead against `generate()` in-process, and what batching concurrent clients gives.

Builds (once) a random-weight Qwen3-MoE-shaped checkpoint with a word-level tokenizer and a chat template,
starts `moe-patch serve` on it (a subprocess on a free loopback port, ``--prompt-cache 0`` so that repeated
prompts are computed like ``generate()`` computes them) and runs two sections.

overhead: loads the same checkpoint with ``moe_patch.load_model`` in this process with the same offload options,
and then, in interleaved rounds (the order rotates each round, so drifts of a shared machine hit all alike):

- direct:      ``model.generate()`` on the chat-templated prompt, greedy, a streamer timing the first token;
- stream:      ``POST /v1/chat/completions`` with ``stream: true`` (raw HTTP, timing the first content chunk);
- non-stream:  the same without streaming (end-to-end time only).

Reported per mode: medians of end-to-end tok/s (prefill included) and of decode tok/s (first to last token), the
server's own engine figure from ``GET /stats``, and the overhead ``1 - server / direct`` of the medians.

concurrency: for 1, 2 and 4 clients (``--clients``), rounds in which that many clients each stream one request at
once (different prompts of the same length, greedy), interleaved with the other client counts. Reported per count,
as medians over rounds: the aggregate decode rate the engine measured (decode tokens over the time of its decode
passes, from ``GET /stats`` before and after the round: batching shows here), the aggregate end-to-end rate (all
clients' tokens over the round's wall time, prefills included), per client the decode rate it saw and its time
to first token, and the expert bytes the engine read per decode token (a batch's tokens share the experts they have
in common, and only those); ratios against one client.

Every run generates exactly --new-tokens tokens (the model has no end-of-sequence token). The load average is
recorded before and after: figures from a busy machine are not comparable.

    python bench/serve.py --rounds 3 --new-tokens 16          # a quick check that it works
    python bench/serve.py --rounds 15 --new-tokens 128        # the measurement (quiet machine)
"""

from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (inspect.py); never import them as modules
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.append(os.path.dirname(_HERE))  # the repository, after the installed packages: tests.helpers.tokenizer

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

NAME = "bench-moe"
MESSAGES = [{"role": "user", "content": " ".join(f"w{i}" for i in range(10, 42))}]  # a 32-word question
MODES = ("direct", "stream", "non-stream")


def client_messages(client: int, round_index: int) -> list[dict]:
    """A 32-word question per client and round: no two concurrent prompts alike."""
    start = 100 + 37 * client + 3 * round_index
    return [{"role": "user", "content": " ".join(f"w{start + i}" for i in range(32))}]


def build_checkpoint(path: Path, args: argparse.Namespace) -> Path:
    """Random fp32 weights of a small Qwen3-MoE, saved with a tokenizer; written under a temporary name."""
    if (path / "config.json").exists():
        return path
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from tests.helpers.tokenizer import save_word_tokenizer

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)  # a router that routes decisively
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    save_word_tokenizer(tmp, args.vocab)
    tmp.rename(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offload_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--dtype", "float32", "--host-cache", args.host_cache]
    return flags + (["--expert-cache", args.expert_cache] if args.expert_cache else [])


def start_server(path: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("moe-patch")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(exe),
                "serve",
                str(path),
                "--port",
                str(port),
                "--served-model-name",
                NAME,
                "--prompt-cache",
                "0",
                "--parallel",
                str(max(args.clients)),
                *offload_flags(args),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"moe-patch serve exited:\n{log.read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("moe-patch serve did not start within 300 s")


def through_server(port: int, new_tokens: int, stream: bool, messages: list[dict] = MESSAGES) -> dict[str, float]:
    body = json.dumps(
        {"model": NAME, "messages": messages, "max_tokens": new_tokens, "temperature": 0, "stream": stream}
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"the server answered {response.status}: {response.read()[:500]!r}")
    if not stream:
        answer = json.loads(response.read())
        end = time.perf_counter()
        return {"tokens": answer["usage"]["completion_tokens"], "e2e_s": end - t0, "id": answer["id"]}
    first = tokens = rid = None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        rid = chunk["id"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
            first = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {
        "tokens": tokens,
        "e2e_s": end - t0,
        "decode_s": end - first,
        "ttft_s": first - t0,
        "id": rid,
        "t0": t0,
        "end": end,
    }


def server_stats(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/stats")
    return json.loads(conn.getresponse().read())


def decode_counts(port: int) -> tuple[int, float, float]:
    """The server's decode tokens so far, the seconds its decode passes took and the expert bytes they read."""
    c = server_stats(port)["cumulative"]
    rate, tokens = c["decode_tokens_per_s"], c["decode_tokens"]
    read = sum((b or 0) * tokens for b in c["decode_bytes_per_token"].values())
    return tokens, (tokens / rate if rate else 0.0), read


def concurrent_round(port: int, clients: int, new_tokens: int, round_index: int) -> dict:
    """``clients`` streamed requests at once; the round's aggregate and per-client figures."""
    tokens0, seconds0, read0 = decode_counts(port)
    results: list[dict | None] = [None] * clients
    start = threading.Barrier(clients)

    def one(i: int) -> None:
        start.wait()
        results[i] = through_server(port, new_tokens, True, client_messages(i, round_index))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens1, seconds1, read1 = decode_counts(port)
    done = [r for r in results if r is not None]
    assert len(done) == clients and all(r["tokens"] == new_tokens for r in done), results
    wall = max(r["end"] for r in done) - min(r["t0"] for r in done)
    return {
        "engine_decode_tok_s": (tokens1 - tokens0) / (seconds1 - seconds0),
        "expert_bytes_per_decode_token": (read1 - read0) / (tokens1 - tokens0),
        "aggregate_e2e_tok_s": sum(r["tokens"] for r in done) / wall,
        "client_decode_tok_s": [(r["tokens"] - 1) / r["decode_s"] for r in done],
        "client_ttft_s": [r["ttft_s"] for r in done],
        "mean_batch": statistics.mean(x["mean_batch"] or 1 for x in server_stats(port)["requests"][-clients:]),
    }


def direct(model, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.puts, self.first = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:  # the first put is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    timer = FirstToken()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, streamer=timer
        )
    end = time.perf_counter()
    return {"tokens": out.shape[1] - ids.shape[1], "e2e_s": end - t0, "decode_s": end - timer.first}


def engine_decode_tok_s(port: int, request_id: str) -> float | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/stats")
    records = json.loads(conn.getresponse().read())["requests"]
    return next((r["offload"]["decode_tokens_per_s"] for r in records if r["request_id"] == request_id), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--expert-width", type=int, default=512)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--expert-cache", default=None, help="device-cache budget (default: no limit)")
    p.add_argument("--host-cache", default="0")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--workdir", type=Path, default=Path("/tmp/moe-patch-bench-serve"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="concurrent client counts")
    p.add_argument("--sections", nargs="+", choices=["overhead", "concurrency"], default=["overhead", "concurrency"])
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tag = f"L{args.layers}-h{args.hidden}-e{args.experts}x{args.expert_width}-k{args.top_k}-v{args.vocab}"
    path = build_checkpoint(args.workdir / tag, args)
    load_before = os.getloadavg()
    port = free_port()
    server = start_server(path, port, args, args.workdir / "server.log")
    summary: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} threads",
        "command": " ".join([sys.executable, *sys.argv]),
        "checkpoint": tag,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
    }
    try:
        if "overhead" in args.sections:
            summary["overhead_section"] = overhead(args, path, port)
        if "concurrency" in args.sections:
            summary["concurrency"] = concurrency(args, port)
    finally:
        server.terminate()
        server.wait(timeout=60)
    load_after = os.getloadavg()
    summary["load_average_1_5_15_min"] = {"before": load_before, "after": load_after}
    print(f"\nload average before {load_before}, after {load_after}")
    if "overhead_section" in summary:
        print_overhead(summary["overhead_section"])
    if "concurrency" in summary:
        print_concurrency(summary["concurrency"])
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


def overhead(args: argparse.Namespace, path: Path, port: int) -> dict:
    from transformers import AutoTokenizer

    import moe_patch

    model = moe_patch.load_model(path, expert_cache=args.expert_cache, host_cache=args.host_cache, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(
        [tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]]
    )
    run = {
        "direct": lambda: direct(model, ids, args.new_tokens),
        "stream": lambda: through_server(port, args.new_tokens, stream=True),
        "non-stream": lambda: through_server(port, args.new_tokens, stream=False),
    }
    for mode in MODES:  # warm-up: caches, first-call allocations
        run[mode]()
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = MODES[r % 3 :] + MODES[: r % 3]
        for mode in order:
            res = run[mode]()
            assert res["tokens"] == args.new_tokens, (mode, res)
            if "id" in res:
                res["engine_decode_tok_s"] = engine_decode_tok_s(port, res["id"])
            results[mode].append(res)
            decode = f"{(res['tokens'] - 1) / res['decode_s']:8.2f}" if "decode_s" in res else "       -"
            print(
                f"round {r:2d} {mode:10s} e2e {res['tokens'] / res['e2e_s']:8.2f} tok/s  decode {decode} tok/s",
                flush=True,
            )

    def med(mode: str, key: str) -> float | None:
        values = [
            ((x["tokens"] - 1) / x["decode_s"]) if key == "decode" else x["tokens"] / x["e2e_s"]
            for x in results[mode]
            if key != "decode" or "decode_s" in x
        ]
        return statistics.median(values) if values else None

    out = {
        "prompt_tokens": ids.shape[1],
        "modes": {
            m: {
                "e2e_tok_s_median": med(m, "e2e"),
                "decode_tok_s_median": med(m, "decode"),
                "engine_decode_tok_s_median": statistics.median(
                    [x["engine_decode_tok_s"] for x in results[m] if x.get("engine_decode_tok_s")] or [float("nan")]
                )
                if m != "direct"
                else None,
                "runs": results[m],
            }
            for m in MODES
        },
    }
    d = out["modes"]
    out["overhead"] = {
        "stream_decode": 1 - d["stream"]["decode_tok_s_median"] / d["direct"]["decode_tok_s_median"],
        "stream_e2e": 1 - d["stream"]["e2e_tok_s_median"] / d["direct"]["e2e_tok_s_median"],
        "non_stream_e2e": 1 - d["non-stream"]["e2e_tok_s_median"] / d["direct"]["e2e_tok_s_median"],
    }
    return out


def print_overhead(summary: dict) -> None:
    d = summary["modes"]
    print(
        "| mode | end-to-end tok/s (median) | decode tok/s (median) | server engine decode tok/s | overhead (e2e / "
        "decode) |"
    )
    print("|---|---|---|---|---|")
    for m in MODES:
        over = (
            "-"
            if m == "direct"
            else (
                f"{100 * summary['overhead']['stream_e2e']:.1f}% / {100 * summary['overhead']['stream_decode']:.1f}%"
                if m == "stream"
                else f"{100 * summary['overhead']['non_stream_e2e']:.1f}% / -"
            )
        )
        dec = d[m]["decode_tok_s_median"]
        eng = d[m]["engine_decode_tok_s_median"]
        print(
            f"| {m} | {d[m]['e2e_tok_s_median']:.2f} | {'-' if dec is None else f'{dec:.2f}'} | "
            f"{'-' if eng is None else f'{eng:.2f}'} | {over} |"
        )


def concurrency(args: argparse.Namespace, port: int) -> dict:
    for clients in args.clients:  # warm-up
        concurrent_round(port, clients, args.new_tokens, round_index=1000 + clients)
    runs: dict[int, list[dict]] = {c: [] for c in args.clients}
    for r in range(args.rounds):
        order = args.clients[r % len(args.clients) :] + args.clients[: r % len(args.clients)]
        for clients in order:
            res = concurrent_round(port, clients, args.new_tokens, round_index=r)
            runs[clients].append(res)
            print(
                f"round {r:2d} {clients} clients: engine decode {res['engine_decode_tok_s']:8.2f} tok/s, "
                f"aggregate e2e {res['aggregate_e2e_tok_s']:8.2f} tok/s, per client decode "
                f"{statistics.median(res['client_decode_tok_s']):7.2f} tok/s, ttft "
                f"{statistics.median(res['client_ttft_s']):6.2f} s, mean batch {res['mean_batch']:.2f}",
                flush=True,
            )
    out = {}
    for clients, rs in runs.items():
        out[clients] = {
            "engine_decode_tok_s_median": statistics.median(x["engine_decode_tok_s"] for x in rs),
            "aggregate_e2e_tok_s_median": statistics.median(x["aggregate_e2e_tok_s"] for x in rs),
            "client_decode_tok_s_median": statistics.median(v for x in rs for v in x["client_decode_tok_s"]),
            "client_ttft_s_median": statistics.median(v for x in rs for v in x["client_ttft_s"]),
            "client_ttft_s_max": max(v for x in rs for v in x["client_ttft_s"]),
            "mean_batch_median": statistics.median(x["mean_batch"] for x in rs),
            "expert_bytes_per_decode_token_median": statistics.median(x["expert_bytes_per_decode_token"] for x in rs),
            "runs": rs,
        }
    base = out.get(1)
    for fig in out.values():
        fig["engine_decode_vs_1_client"] = (
            fig["engine_decode_tok_s_median"] / base["engine_decode_tok_s_median"] if base else None
        )
        fig["aggregate_e2e_vs_1_client"] = (
            fig["aggregate_e2e_tok_s_median"] / base["aggregate_e2e_tok_s_median"] if base else None
        )
    return out


def print_concurrency(summary: dict) -> None:
    print(
        "| clients | engine decode tok/s (aggregate) | vs 1 client | end-to-end tok/s (aggregate) | vs 1 client | "
        "per-client decode tok/s | time to first token (median / max) | mean batch | expert MiB read per token |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for clients, f in summary.items():
        ratio = f"{f['engine_decode_vs_1_client']:.2f}x" if f["engine_decode_vs_1_client"] else "-"
        e2e_ratio = f"{f['aggregate_e2e_vs_1_client']:.2f}x" if f["aggregate_e2e_vs_1_client"] else "-"
        print(
            f"| {clients} | {f['engine_decode_tok_s_median']:.2f} | {ratio} | {f['aggregate_e2e_tok_s_median']:.2f} | "
            f"{e2e_ratio} | {f['client_decode_tok_s_median']:.2f} | {f['client_ttft_s_median']:.2f} s / "
            f"{f['client_ttft_s_max']:.2f} s | {f['mean_batch_median']:.2f} | "
            f"{f['expert_bytes_per_decode_token_median'] / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
