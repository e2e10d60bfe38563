"""The README's table of measured runs of transformers classes: saved weights, --real, the dry run beside it.

    .venv/bin/python scripts/figures/hf_real.py [PRESET ...]     (default: llava-1.5-7b qwen2-vl-7b paligemma-3b)

For each preset, its twin (the published config shrunk to tiny sizes: same class, same code paths) gets
random weights, saved the way users have them (`save_pretrained`: config.json + safetensors, three shards
with `model.safetensors.index.json`) into a temporary directory; `--model DIR --real` then measures a 2-GPU
map (decoder layers split in half, the head with them unless it is tied) on this CPU's two logical devices,
fp32, 1 image + 32 text tokens, 8 new tokens, 5 timed repeats. Beside it, the same map's dry run on virtual
GPUs (simulated). Printed: a markdown table; the milliseconds are this machine's, the rest must agree.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from xctune.hardware import make_cluster
from xctune.models.hf import get_preset, twin
from xctune.models.hf.family import HFFamily
from xctune.models.hf.weights import save_weights
from xctune.models.loading import resolve_model
from xctune.plans.plan import Plan
from xctune.worlds.real import HostExecutor
from xctune.worlds.simulate import simulate
from xctune.workload import Workload

W = Workload(prompt_tokens=32, new_tokens=8)


def split_map(profile) -> dict:
    m = {u.name: 0 for u in profile.units}
    for name in profile.layers[len(profile.layers) // 2:]:
        m[name] = 1
    for name in profile.head:
        m[name] = 0 if name in profile.colocation else 1
    return m


def kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def main(names) -> None:
    print("| twin of | parameters | prompt (image + text) | transfers prefill / per decode step, KiB: measured | dry run "
          "| KV cache per GPU, KiB | tokens = 1 device fp32 | peak cuda:0 / cuda:1, KiB (measured) | e2e ms (cv) | trial s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = Path(tmp) / name
            save_weights(HFFamily(twin(get_preset(name))).build_host(seed=1), path, shards=3)
            spec = resolve_model(str(path))
            profile = spec.profile
            plan = Plan.uniform(split_map(profile))
            t0 = time.perf_counter()
            ex = HostExecutor(spec, W, repeats=5, warmup=1, budget=make_cluster("2x64MiB"))
            rec = ex.run(plan)
            seconds = time.perf_counter() - t0
            sim = simulate(profile, plan, W, make_cluster("2x1GiB"))
            if not (rec.ok and sim.ok):
                print(f"| {name} | failed: {rec.cause or sim.cause} |")
                continue

            def phases(r):
                pre = sum(v for k, v in r.transfer_by_phase.items() if k.startswith("prefill"))
                dec = sum(v for k, v in r.transfer_by_phase.items() if k.startswith("decode")) / (W.new_tokens - 1)
                return f"{kib(pre)} / {kib(dec)}"

            same = rec.transfer_by_phase == sim.transfer_by_phase and rec.kv_bytes == sim.kv_bytes
            kv = " / ".join(kib(rec.kv_bytes[d]) for d in ("cuda:0", "cuda:1"))
            print(f"| {name} | {profile.total_params / 1e6:.2f} M | {W.prompt_length(profile.config) - W.prompt_tokens} + "
                  f"{W.prompt_tokens} | {phases(rec)} | {phases(sim)}{'' if same else ' (DIFFERS)'} | {kv} | "
                  f"{'yes' if rec.fidelity_top1 == 1.0 and rec.fidelity_max_abs == 0.0 else 'NO'} | "
                  f"{kib(rec.peak_bytes['cuda:0'])} / {kib(rec.peak_bytes['cuda:1'])} | "
                  f"{rec.e2e_ms.median:.1f} ({100 * rec.e2e_ms.cv:.0f}%) | {seconds:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["llava-1.5-7b", "qwen2-vl-7b", "paligemma-3b"])
