"""`python -m bench [--quick] [--repeat N] [--warm] [--compiled]` compares (`--warm`: also through the job service on
a warm pool; `--compiled`: also on a warm pool of torch.compile'd workers); `python -m bench scale` checks that cost
grows linearly."""

from __future__ import annotations

import argparse
import logging
import sys

from bench.raydata_reference import RayDataTuning
from bench.suite import FULL, QUICK, SuiteConfig, run_suite


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("mode", nargs="?", choices=("compare", "scale"), default="compare")
    parser.add_argument("--quick", action="store_true", help="a few hundred images: a smoke test")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the median is reported")
    parser.add_argument("--models", nargs="+", help="only these models (mobilenet_v2, resnet50)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--bulklabel-workers", type=int, default=0, help="0 = bulklabel's default placement")
    parser.add_argument("--raydata-actors", type=int, default=1)
    parser.add_argument("--raydata-actor-cpus", type=float, default=1.0)
    parser.add_argument("--raydata-torch-threads", type=int, default=2)
    parser.add_argument("--raydata-reuse-freed-memory", action="store_true",
                        help="give the Ray Data actors bulklabel's allocator setting too")  # fmt: skip
    parser.add_argument("--warm", action="store_true",
                        help="also each job through the job service, on a warm pool")  # fmt: skip
    parser.add_argument("--compiled", action="store_true",
                        help="also (implies --warm) on a warm pool of torch.compile'd workers; an untimed warm-up "
                        "job compiles, as a pool does once")  # fmt: skip
    parser.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    for noisy in ("ray", "ray.data", "botocore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.mode == "scale":
        from bench.scale import ScaleConfig, run_scale

        lines = run_scale(ScaleConfig(quick=args.quick, cpus=args.cpus, repeat=args.repeat))
        print("\n".join(lines), flush=True)
        return 0
    cases = QUICK if args.quick else FULL
    if args.models:
        cases = tuple(c for c in cases if c.name in args.models)
    config = SuiteConfig(
        cases=cases,
        batch_size=args.batch_size,
        cpus=args.cpus,
        repeat=args.repeat,
        bulklabel_workers=args.bulklabel_workers,
        raydata=RayDataTuning(
            actors=args.raydata_actors,
            actor_cpus=args.raydata_actor_cpus,
            torch_threads=args.raydata_torch_threads,
            reuse_freed_memory=args.raydata_reuse_freed_memory,
        ),
        warm=args.warm or args.compiled,
        compiled=args.compiled,
    )
    results = run_suite(config)
    print("\n".join(r.memory_line() for r in results), flush=True)
    if config.warm:
        print("\n".join(r.warm_line() for r in results), flush=True)
    print("\n".join(r.line() for r in results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
