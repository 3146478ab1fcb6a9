"""Shared by the training tests: a tiny store builder, and the entry point of the multi-process tests
(`torchrun ... tests/_train_worker.py CONFIG [options]`).

--stop-after STEP simulates a preemption: every rank stops right after the checkpoint of that step is
complete (the collective save has returned on all ranks), as a killed job would after its last save.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import distill.train as train_mod
from store_schema.config import PipelineConfig, dumps_toml, load_config

# Training-sized tiny model on top of conftest's tiny config (its student is 32-d with 2 heads).
TRAIN_OVERRIDES = ["heads.decoder_heads=2", "heads.decoder_depth=1", "optim.warmup_steps=2",
                   "train.log_every=2", "train.checkpoint_every=3"]
STORE_UNITS = {"data/a.tar": 24, "data/b.tar": 16}


def build_store(root: Path, extra: list[str] | tuple[str, ...] = (), with_joint_stats: bool = True) -> PipelineConfig:
    """A finalised 40-sample store under root (3 teachers, 32-d features) with its cross-teacher statistics
    (unless `with_joint_stats` is False); returns its config, also written to root/config.toml."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_config
    from store_fixtures import teacher_meta, write_unit
    from store_schema.joint_stats import fit_joint_stats
    from store_schema.store import FeatureStore
    cfg = tiny_config(root, TRAIN_OVERRIDES + list(extra))
    store = FeatureStore.create(cfg.store.root, cfg, teacher_meta(cfg))
    for i, (src, n) in enumerate(STORE_UNITS.items()):
        write_unit(store, cfg, src, n, seed=i)
    store.finalize_stats()
    if with_joint_stats:  # as extraction does; without them, a store written before the shared basis existed
        fit_joint_stats(store, 0)
    (root / "config.toml").write_text(dumps_toml(cfg))
    return cfg


class Preempted(Exception):
    pass


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--poison", default=None, metavar="RANK:STEP",
                   help="make one rank's teacher features NaN at one step (the others stay finite)")
    args = p.parse_args()
    if args.poison:
        rank, step = map(int, args.poison.split(":"))
        train_mod.make_batches = _poisoned(train_mod.make_batches, rank, step)
    torch.set_num_threads(1)  # two processes on a shared CPU; also keeps kernels' reduction order fixed
    real_save = train_mod.save_checkpoint

    def save_then_maybe_stop(accelerator, model, optimizer, scheduler, step, *rest):
        path = real_save(accelerator, model, optimizer, scheduler, step, *rest)
        if step == args.stop_after:
            raise Preempted(step)
        return path

    train_mod.save_checkpoint = save_then_maybe_stop
    try:
        summary = train_mod.train(load_config(args.config, args.set), resume=args.resume)
        _say(f"SUMMARY {summary['step']} {summary['world_size']}")
    except Preempted as e:
        _say(f"PREEMPTED after step {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _poisoned(make_batches, bad_rank: int, bad_step: int):
    def poisoned(run, start_step):
        for step, batch in enumerate(make_batches(run, start_step), start=start_step + 1):
            if (run.rank, step) == (bad_rank, bad_step):
                for t in batch["teacher_patch"]:
                    batch["teacher_patch"][t] = torch.full_like(batch["teacher_patch"][t], float("nan"))
            yield batch
    return poisoned


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: the ranks share the launcher's stdout
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
