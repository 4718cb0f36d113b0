"""The server's overhead: tokens/s through `moe-patch serve` against `generate()` in-process, same checkpoint.

Builds (once) a random-weight Qwen3-MoE-shaped checkpoint with a word-level tokenizer and a chat template,
starts `moe-patch serve` on it (a subprocess on a free loopback port), loads the same checkpoint with
``moe_patch.load_model`` in this process with the same offload options, and then, in interleaved rounds
(the order rotates each round, so drifts of a shared machine hit all alike):

- direct:      ``model.generate()`` on the chat-templated prompt, greedy, a streamer timing the first token;
- stream:      ``POST /v1/chat/completions`` with ``stream: true`` (raw HTTP, timing the first content chunk);
- non-stream:  the same without streaming (end-to-end time only).

Every run generates exactly --new-tokens tokens (the model has no end-of-sequence token). Reported per
mode: medians of end-to-end tok/s (prefill included) and of decode tok/s (first to last token), the
server's own engine figure from ``GET /stats``, and the overhead ``1 - server / direct`` of the medians.
The load average is recorded before and after: figures from a busy machine are not comparable.

    python bench/serve.py --rounds 3 --new-tokens 16          # a quick check that it works
    python bench/serve.py --rounds 15 --new-tokens 128        # the measurement (quiet machine)
"""

from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (inspect.py); never import them as modules
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))  # tokenizer_helpers

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

NAME = "bench-moe"
MESSAGES = [{"role": "user", "content": " ".join(f"w{i}" for i in range(10, 42))}]  # a 32-word question
MODES = ("direct", "stream", "non-stream")


def build_checkpoint(path: Path, args: argparse.Namespace) -> Path:
    """Random fp32 weights of a small Qwen3-MoE, saved with a tokenizer; written under a temporary name."""
    if (path / "config.json").exists():
        return path
    from tokenizer_helpers import save_word_tokenizer
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.expert_width, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=args.hidden // 8, num_experts=args.experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=0,
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
        proc = subprocess.Popen([str(exe), "serve", str(path), "--port", str(port), "--served-model-name", NAME,
                                 *offload_flags(args)], stdout=out, stderr=subprocess.STDOUT, env=env)
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


def through_server(port: int, new_tokens: int, stream: bool) -> dict[str, float]:
    body = json.dumps({"model": NAME, "messages": MESSAGES, "max_tokens": new_tokens, "temperature": 0,
                       "stream": stream})
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
    return {"tokens": tokens, "e2e_s": end - t0, "decode_s": end - first, "id": rid}


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
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             streamer=timer)
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
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    import moe_patch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tag = f"L{args.layers}-h{args.hidden}-e{args.experts}x{args.expert_width}-k{args.top_k}-v{args.vocab}"
    path = build_checkpoint(args.workdir / tag, args)
    load_before = os.getloadavg()
    port = free_port()
    server = start_server(path, port, args, args.workdir / "server.log")
    try:
        model = moe_patch.load_model(path, expert_cache=args.expert_cache, host_cache=args.host_cache,
                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = torch.tensor([tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                          return_dict=True)["input_ids"]])
        run = {
            "direct": lambda: direct(model, ids, args.new_tokens),
            "stream": lambda: through_server(port, args.new_tokens, stream=True),
            "non-stream": lambda: through_server(port, args.new_tokens, stream=False),
        }
        for mode in MODES:  # warm-up: caches, first-call allocations
            run[mode]()
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            order = MODES[r % 3:] + MODES[:r % 3]
            for mode in order:
                res = run[mode]()
                assert res["tokens"] == args.new_tokens, (mode, res)
                if "id" in res:
                    res["engine_decode_tok_s"] = engine_decode_tok_s(port, res["id"])
                results[mode].append(res)
                decode = f"{(res['tokens'] - 1) / res['decode_s']:8.2f}" if "decode_s" in res else "       -"
                print(f"round {r:2d} {mode:10s} e2e {res['tokens'] / res['e2e_s']:8.2f} tok/s  decode {decode} tok/s",
                      flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    load_after = os.getloadavg()

    def med(mode: str, key: str) -> float | None:
        values = [((x["tokens"] - 1) / x["decode_s"]) if key == "decode" else x["tokens"] / x["e2e_s"]
                  for x in results[mode] if key != "decode" or "decode_s" in x]
        return statistics.median(values) if values else None

    summary = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{args.threads} threads",
        "load_average_1_5_15_min": {"before": load_before, "after": load_after},
        "command": " ".join([sys.executable, *sys.argv]),
        "checkpoint": tag, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "prompt_tokens": ids.shape[1],
        "modes": {m: {"e2e_tok_s_median": med(m, "e2e"), "decode_tok_s_median": med(m, "decode"),
                      "engine_decode_tok_s_median": statistics.median(
                          [x["engine_decode_tok_s"] for x in results[m] if x.get("engine_decode_tok_s")] or [float("nan")])
                      if m != "direct" else None,
                      "runs": results[m]} for m in MODES},
    }
    d = summary["modes"]
    summary["overhead"] = {
        "stream_decode": 1 - d["stream"]["decode_tok_s_median"] / d["direct"]["decode_tok_s_median"],
        "stream_e2e": 1 - d["stream"]["e2e_tok_s_median"] / d["direct"]["e2e_tok_s_median"],
        "non_stream_e2e": 1 - d["non-stream"]["e2e_tok_s_median"] / d["direct"]["e2e_tok_s_median"],
    }
    print(f"\nload average before {load_before}, after {load_after}")
    print("| mode | end-to-end tok/s (median) | decode tok/s (median) | server engine decode tok/s | overhead (e2e / decode) |")
    print("|---|---|---|---|---|")
    for m in MODES:
        over = "-" if m == "direct" else (
            f"{100 * summary['overhead']['stream_e2e']:.1f}% / {100 * summary['overhead']['stream_decode']:.1f}%"
            if m == "stream" else f"{100 * summary['overhead']['non_stream_e2e']:.1f}% / -")
        dec = d[m]["decode_tok_s_median"]
        eng = d[m]["engine_decode_tok_s_median"]
        print(f"| {m} | {d[m]['e2e_tok_s_median']:.2f} | {'-' if dec is None else f'{dec:.2f}'} | "
              f"{'-' if eng is None else f'{eng:.2f}'} | {over} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
