"""Run an exported plan with torch.distributed.pipelining: one process per stage.

Written next to `split_spec.json` and `pipeline_plan.json` by `xctune export --target
torch-pipelining` (or a search whose target is a pipeline). What it runs of the model comes from
the model's family (models/base.py `PipelineParts`): the language model (input rows -> logits) is
traced and cut at the split points; the first rank runs the vision encoder, the projector and the
token embeddings before the pipeline, as the engines place them. A family that provides no such
parts is refused with one line (exit 2).
Greedy decoding without a KV cache crossing the pipeline: each step runs the sequence padded to
its final length again (attention is causal, so a position never sees the padding after it).

    python run_pipeline.py --nproc 2           # local processes, gloo on 127.0.0.1 (a CPU try)
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 run_pipeline.py
    python run_pipeline.py --reference         # the same greedy loop in one process, no pipeline

The last rank prints one JSON line: {"tokens": [[...]], "stages": N, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from xctune.errors import BadInput

HERE = Path(__file__).resolve().parent


def load_parts(plan: dict, args):
    """The model's pipeline parts (models/base.py PipelineParts), from its family: BadInput where the
    family provides none."""
    from xctune.models.families import family_of
    from xctune.models.loading import resolve_model
    from xctune.models.profile import DTYPES

    spec = resolve_model(args.model or plan["model"], args.trust_remote_code)
    return family_of(spec.config).pipeline_parts(
        lambda: spec.load_master(seed=plan.get("weights_seed", 0)).to(DTYPES[plan["dtype"]]).eval())


@torch.no_grad()
def prompt(parts, plan: dict, args):
    """The rows of one request, padded to its final length: [1, prompt + new - 1, width]."""
    from xctune.workload import Workload

    w = plan["workload"]
    layout = tuple(w["hd_layout"]) if w.get("hd_layout") else None
    work = Workload(images=w["images"], prompt_tokens=w["prompt_tokens"], new_tokens=args.new_tokens, batch=1,
                    hd_layout=layout, seed=w.get("seed", 0))
    rows = parts.prompt_rows(work)
    length = rows.shape[1]
    x = torch.zeros(1, length + args.new_tokens - 1, rows.shape[-1], dtype=rows.dtype)
    x[:, :length] = rows
    return x, length


@torch.no_grad()
def greedy(step, parts, x, length: int, new_tokens: int, share=None) -> list[int]:
    """`step(x)` gives the logits (None where this rank has none); `share(token)` gives every
    rank the token the last stage chose."""
    tokens = []
    for i in range(new_tokens):
        logits = step(x)
        pos = length - 1 + i
        token = logits[:, pos].argmax(-1) if logits is not None else torch.zeros(1, dtype=torch.long)
        if share is not None:
            token = share(token)
        tokens.append(int(token[0]))
        if i + 1 < new_tokens:
            x[:, pos + 1] = parts.token_row(token)
    return tokens


def split_spec() -> dict:
    from torch.distributed.pipelining import SplitPoint

    spec = json.loads((HERE / "split_spec.json").read_text())
    return {name: getattr(SplitPoint, point) for name, point in spec.items()}


def run_stage(rank: int, world: int, args) -> None:
    from torch.distributed.pipelining import ScheduleGPipe, pipeline

    plan = json.loads((HERE / "pipeline_plan.json").read_text())
    if world != len(plan["stages"]):
        raise SystemExit(f"this plan has {len(plan['stages'])} stages: run it with that many processes, not {world}")
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}") if cuda else torch.device("cpu")
    parts = load_parts(plan, args)
    x, length = prompt(parts, plan, args)
    pipe = pipeline(parts.decoder, mb_args=(x,), split_spec=split_spec())
    stage = pipe.build_stage(rank, device)
    schedule = ScheduleGPipe(stage, n_microbatches=1)
    last = world - 1

    def step(x):
        if rank == 0:
            schedule.step(x.to(device))
            return None
        out = schedule.step()
        return out.cpu() if rank == last else None

    def share(token):
        token = token.to(device)
        dist.broadcast(token, src=last)
        return token.cpu()

    tokens = greedy(step, parts, x, length, args.new_tokens, share)
    if rank == last:
        print(json.dumps({"tokens": [tokens], "stages": world, "backend": dist.get_backend(), "device": device.type}),
              flush=True)


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_stage(rank, world, args)
    except BadInput as e:
        sys.exit(_refused(e))
    finally:
        dist.destroy_process_group()


def _refused(e: BadInput) -> int:
    print(f"run_pipeline.py: error: {e}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BadInput as e:
        return _refused(e)


def _main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, help="spawn this many local processes (gloo on 127.0.0.1)")
    p.add_argument("--reference", action="store_true", help="one process, no pipeline: the tokens to compare with")
    p.add_argument("--model", help="preset or checkpoint directory (default: the plan's)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default: the plan's workload)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even where CUDA is available")
    args = p.parse_args(argv)
    plan = json.loads((HERE / "pipeline_plan.json").read_text())
    if args.new_tokens is None:
        args.new_tokens = plan["workload"]["new_tokens"]
    if args.reference:
        parts = load_parts(plan, args)
        x, length = prompt(parts, plan, args)
        tokens = greedy(parts.decoder, parts, x, length, args.new_tokens)
        print(json.dumps({"tokens": [tokens], "stages": 1, "backend": None, "device": "cpu"}), flush=True)
        return 0
    if args.nproc:
        import torch.multiprocessing as mp

        with socket.socket() as s:  # a free port on the loopback interface
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_worker, args=(args.nproc, port, args), nprocs=args.nproc, join=True)
        except mp.ProcessExitedException as e:  # a worker said why on stderr (bad input: exit 2)
            return e.exit_code
        return 0
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun, or with --nproc N for local processes, or --reference")
    cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        run_stage(dist.get_rank(), dist.get_world_size(), args)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
