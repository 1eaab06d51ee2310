"""A prefill engine in its own process, driven over stdin/stdout by the KV transfer tests.

Started as ``python kv_prefill_process.py MODEL TOKENIZER CONNECTOR [--slow-send SECONDS]``.
Prints one JSON line ``{"address": [host, port], "layout": {...}}`` when ready, then
answers one JSON line per command line:

- ``{"op": "prefill", "rid": ..., "prompt_token_ids": [...]}`` -> the finished output's
  first token and kv_transfer_params;
- ``{"op": "stats"}`` -> free/total blocks, live leases, integrity of the block pool.

Between commands it keeps stepping while leases are open, so a decode peer's DONE frees
them. ``--slow-send`` delays every block send (the test double for a long transfer, so a
test can kill this process while a load is in flight).
"""

from __future__ import annotations

import json
import queue
import sys
import threading

LEASE_SECONDS = 5.0  # short, so a test can watch an unclaimed lease expire
PREFIX = "@kv-test "  # libraries (UCX) may print their own lines on stdout


def reply(answer: dict) -> None:
    print(PREFIX + json.dumps(answer), flush=True)


def main() -> None:
    model, tokenizer, connector = sys.argv[1:4]
    slow = float(sys.argv[sys.argv.index("--slow-send") + 1]) if "--slow-send" in sys.argv else 0
    from tandem.engine import SamplingParams
    from tandem.engine.llm import LLM

    if slow:
        from tandem.kvtransfer import server

        original = server.BlockServer._serve_read

        async def slow_read(self, link, msg, writer):
            import asyncio

            await asyncio.sleep(slow)
            await original(self, link, msg, writer)

        server.BlockServer._serve_read = slow_read

    engine = LLM(
        model, tokenizer=tokenizer, dtype="float32", kv_cache_memory="16MiB",
        role="prefill", kv_connector=connector, kv_lease_seconds=LEASE_SECONDS,
    ).engine  # fmt: skip
    worker = engine.runner.connector
    reply({"address": list(worker.address), "layout": worker.layout})
    commands: queue.Queue = queue.Queue()

    def read_commands() -> None:
        for line in sys.stdin:
            commands.put(line)
        commands.put("")  # stdin closed: the test is gone, so are we

    threading.Thread(target=read_commands, daemon=True).start()
    while True:
        try:
            line = commands.get(timeout=0.002 if engine.scheduler.has_work() else 0.05)
        except queue.Empty:
            if engine.scheduler.has_work():
                engine.step()
            continue
        if not line:
            return
        command = json.loads(line)
        if command["op"] == "prefill":
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            rid = command["rid"]
            engine.add_request(rid, {"prompt_token_ids": command["prompt_token_ids"]}, params)
            out = None
            while out is None:
                out = next((o for o in engine.step() if o.request_id == rid and o.finished), None)
            answer = {"token_ids": out.outputs[0].token_ids, "params": out.kv_transfer_params}
        elif command["op"] == "stats":
            kv = engine.scheduler.kv
            kv.check_integrity()
            answer = {
                "num_free_blocks": kv.pool.num_free_blocks,
                "num_blocks": kv.pool.num_blocks,
                "num_leased": len(engine.scheduler.leased),
            }
        else:
            return
        reply(answer)


if __name__ == "__main__":
    main()
