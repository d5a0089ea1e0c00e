"""Does attending over the past help an agent? PPO with the attention policy against an
LSTM and a memoryless MLP (the anchors), at the same budget, on a MiniGrid task that
needs memory and on one that does not.

Every run is ``attnlab train memory-agent[-lstm|-mlp]`` / ``doorkey-agent[-lstm|-mlp]``'s
(the Trainer and the task's defaults, without the evaluations in between), then 100
evaluation episodes (actions sampled from the policy; seeds never used in training).
Runs go two at a time, one thread each.

One JSON line per run (env, policy, seed, frames, success %, mean return, train_s), then
one summary line per environment and policy: the mean and standard deviation over seeds,
with the MLP's and LSTM's mean success beside the attention policy's and the gaps.

python benchmarks/bench_rl.py                    # 3 seeds x 3 policies x 2 environments
python benchmarks/bench_rl.py --smoke            # tiny, for CI
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from attnlab.cli._args import int_in, parse_smoke, script_parser
from attnlab.rl.env import make_env
from attnlab.rl.task import DOORKEY_ENV, MEMORY_ENV, AgentTask, run_episodes
from attnlab.tasks import spec, train_config
from attnlab.train import Trainer

POLICIES = ("attention", "lstm", "mlp")


def parse() -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--envs", nargs="+", default=[MEMORY_ENV, DOORKEY_ENV])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--seeds", type=int_in(0), nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--steps", type=int_in(1), default=None, help="optimizer steps (default per task)"
    )
    p.add_argument("--episodes", type=int_in(1), default=100)
    p.add_argument("--workers", type=int_in(1), default=2)
    p.add_argument(
        "--eval-every",
        type=int_in(1),
        default=None,
        help="also evaluate (32 episodes) every N steps during training, printed to stderr",
    )
    args = parse_smoke(p, None, {"seeds": [0], "episodes": 4})  # (--steps may be given)
    for env_id in args.envs:  # before the process pool: the check AgentTask's envs make
        try:
            make_env(env_id).close()
        except (ValueError, ImportError) as e:
            p.error(f"argument --envs: {e}")
    return args


def task_name(env_id: str, policy: str) -> str:
    base = "memory-agent" if "Memory" in env_id else "doorkey-agent"
    return base if policy == "attention" else f"{base}-{policy}"


def run(
    env_id: str,
    policy: str,
    seed: int,
    steps: int | None,
    episodes: int,
    smoke: bool,
    eval_every: int | None = None,
) -> dict[str, Any]:
    """Train one agent as ``attnlab train`` would and evaluate it."""
    torch.set_num_threads(1)
    name = task_name(env_id, policy)
    size = {"n_envs": 4, "rollout_steps": 16, "eval_episodes": 2, "d_model": 16} if smoke else {}
    task = AgentTask(env_id=env_id, policy=policy, name=name, **size)  # seeded by cfg.seed
    cfg = train_config(spec(name), steps=steps, seed=seed, progress=False)
    cfg.eval_every = eval_every or cfg.steps  # by default one evaluation, at the end
    t0 = time.perf_counter()
    tag = {"env": env_id, "policy": policy, "seed": seed}
    trainer = Trainer(task, cfg, on_eval=lambda r: print(json.dumps(tag | r), file=sys.stderr))
    trainer.fit()
    train_s = time.perf_counter() - t0
    iterations = -(-trainer.step // task.steps_per_iteration(cfg.batch_size))  # rollouts
    frames = iterations * task.n_envs * task.rollout_steps
    res = run_episodes(trainer.model.eval(), env_id, episodes).summary()
    return {
        "env": env_id,
        "policy": policy,
        "seed": seed,
        "frames": frames,
        **res,
        "train_s": round(train_s, 1),
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and deviation over seeds per (env, policy); the baselines beside attention."""
    out = []
    for env_id in dict.fromkeys(r["env"] for r in rows):
        mean = {}
        for policy in dict.fromkeys(r["policy"] for r in rows):
            sel = [r for r in rows if r["env"] == env_id and r["policy"] == policy]
            succ = [r["success"] for r in sel]
            rec = {
                "env": env_id,
                "policy": policy,
                "seeds": len(sel),
                "success_mean": round(statistics.mean(succ), 2),
                "success_sd": round(statistics.stdev(succ), 2) if len(succ) > 1 else 0.0,
                "return_mean": round(statistics.mean(r["return"] for r in sel), 4),
                "train_s_mean": round(statistics.mean(r["train_s"] for r in sel), 1),
            }
            mean[policy] = rec["success_mean"]
            out.append(rec)
        att = next((r for r in out if r["env"] == env_id and r["policy"] == "attention"), None)
        if att is not None:
            for base in ("mlp", "lstm"):
                if base in mean:
                    att[f"{base}_success_mean"] = mean[base]
                    att[f"gap_vs_{base}"] = round(mean["attention"] - mean[base], 2)
    return out


def main() -> None:
    args = parse()
    steps = 8 if args.smoke and args.steps is None else args.steps
    episodes = args.episodes
    jobs = [(e, p, s) for e in args.envs for p in args.policies for s in args.seeds]
    if args.smoke:
        jobs = [(e, p, 0) for e in args.envs[-1:] for p in args.policies]
    rows, cpu = [], {"cpu": torch.backends.cpu.get_cpu_capability()}  # the times' CPU
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        futures = [
            pool.submit(run, e, p, s, steps, episodes, args.smoke, args.eval_every)
            for e, p, s in jobs
        ]
        for f in futures:
            rows.append(f.result())
            print(json.dumps(rows[-1] | cpu), flush=True)
    for rec in summarize(rows):
        print(json.dumps({"summary": True, **rec, **cpu}), flush=True)


if __name__ == "__main__":
    main()
