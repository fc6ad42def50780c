"""OpenMP's wait policy on a small machine: `python -m bench.omp_wait [--rounds N]`.

torch's CPU kernels run on libgomp threads, which by default spin for a while after each parallel region, waiting
for the next. A label worker is never alone on its cores: its decode threads run beside the forward pass, a node
runs several workers, and a test run or a laptop runs more. A spinning thread holds a core that one of those needs.
workers/__init__.py therefore sets OMP_WAIT_POLICY=PASSIVE for every worker process; this measures what that buys.

Each case runs in fresh processes (libgomp reads the variable once, when torch loads), MobileNetV2 forward passes
of batch 8 at 224 px on 2 threads, with the policy left unset (libgomp's default) and PASSIVE:
- `alone`: one process;
- `two processes`: two such processes at once (two workers, or two lanes, sharing the cores);
- `decode beside`: one process whose 2 decode threads (Pillow, the bench photos) run beside its forward passes, as
  in a label worker; the row gives forward passes and decoded photos per second.
The load average is printed first: a busy neighbour changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

POLICIES = ("default", "PASSIVE")

_CHILD = r"""
import json, sys, threading, time
import torch, torchvision
rounds, decode = int(sys.argv[1]), sys.argv[2] == "decode"
torch.set_num_threads(2)
model = torchvision.models.mobilenet_v2().eval()
batch = torch.randn(8, 3, 224, 224)
decoded, stop = [0], threading.Event()

def decode_loop():
    import io
    from PIL import Image
    from bench.data import photo_payloads
    photos = photo_payloads()[:50]
    while not stop.is_set():
        for payload in photos:
            Image.open(io.BytesIO(payload)).convert("RGB").resize((224, 224))
            decoded[0] += 1
            if stop.is_set():
                break

with torch.inference_mode():
    model(batch)
    threads = [threading.Thread(target=decode_loop) for _ in range(2 if decode else 0)]
    for thread in threads:
        thread.start()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        model(batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stop.set()
    for thread in threads:
        thread.join()
print(json.dumps({"wall": wall, "cpu": cpu, "decoded": decoded[0]}))
"""


def _env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return env if policy == "default" else {**env, "OMP_WAIT_POLICY": policy}


def _run(policy: str, processes: int, rounds: int, decode: bool) -> list[dict]:
    command = [sys.executable, "-c", _CHILD, str(rounds), "decode" if decode else "plain"]
    env = _env(policy)
    children = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=600)
        if child.returncode != 0:
            raise SystemExit(f"a bench process exited {child.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="forward passes per process")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; {args.rounds} passes of batch 8 per process")
    cases = {"alone": (1, False), "two processes": (2, False), "decode beside": (1, True)}
    rates: dict[tuple[str, str], float] = {}
    for case, (processes, decode) in cases.items():
        for policy in POLICIES:
            started = time.perf_counter()
            results = _run(policy, processes, args.rounds, decode)
            passes = sum(args.rounds / r["wall"] for r in results)  # forward passes per second, all processes
            cpu = sum(r["cpu"] for r in results) / (processes * args.rounds)
            extra = f", {sum(r['decoded'] / r['wall'] for r in results):.0f} photos decoded/s" if decode else ""
            rates[case, policy] = passes
            print(f"{case:14s} {policy:8s} {passes:6.2f} passes/s, {cpu * 1000:6.0f} ms of the process's CPU per "
                  f"pass{extra} ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    for case in cases:
        print(f"{case}: PASSIVE / default = {rates[case, 'PASSIVE'] / rates[case, 'default']:.2f}x passes/s")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
