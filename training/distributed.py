"""Data-parallel training through Ray Train: `TorchTrainer` workers each run `seqrank.training.train.fit` on a shard.

What each worker does differently from single-process training is all in `DataParallelWorker`, the `Worker` that
`fit` is given: it keeps every world_size-th length-bucketed batch (training/batches.py), wraps the model and its
loss in DistributedDataParallel (gradients averaged by all-reduce: gloo on CPU, NCCL on GPU) and averages the
logged loss. Rank 0 evaluates, decides early stopping for everyone and writes the run directory, so the directory
holds exactly the files of a local run. `optim.batch_size` stays the global batch: each worker takes
batch_size / num_workers users per step, so the same config means the same optimisation with any worker count.

The run directory is written by rank 0 on its node; on a multi-node cluster give `--out` on shared storage.
The data is loaded once by the driver and handed to the workers through Ray's object store. While rank 0
evaluates, the others wait in a collective (Ray's TorchConfig timeout, 30 min by default, bounds an evaluation).
Called in a process that already has Ray initialised, the run uses that cluster; otherwise `distributed.address`
decides ("" starts a private one and shuts it down afterwards).
"""

from __future__ import annotations

import inspect
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from seqrank.training import run_dir as run_files
from seqrank.training.batches import Shard
from seqrank.training.config import TrainConfig, config_from_dict
from seqrank.training.data import SequenceData
from seqrank.training.sources import load_sequences
from seqrank.training.step import Worker


@dataclass
class DataParallelWorker(Worker):
    """A Ray Train worker: torch.distributed is already initialised by TorchTrainer when this is built."""

    def wrap(self, objective: torch.nn.Module) -> torch.nn.Module:
        from ray.train.torch import prepare_model

        # find_unused_parameters: parts of the model get no gradient in some configs (the backbone's unused word
        # table, behaviour or attribute tables the data lacks); broadcast_buffers off: the buffers are constants
        # (the item attribute table is O(catalogue) and would otherwise be re-sent every step).
        ddp_arguments = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
        no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in ddp_arguments else "broadcast_buffers"
        return prepare_model(objective, move_to_device=self.device,
                             parallel_strategy_kwargs={"find_unused_parameters": True, no_buffer_sync: False})

    def mean(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.shard.world_size

    def loss_weight(self, positions: int) -> float:
        total = torch.tensor([positions], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(total)
        return self.shard.world_size * positions / float(total.item())

    def chief_decides(self, flag: bool) -> bool:
        tensor = torch.tensor([int(flag)], device=self._collective_device())
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: rebuild the config, fetch the shared data, run the loop on this rank."""
    import ray
    import ray.train
    import ray.train.torch

    config = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    if not config.optim.num_threads:
        torch.set_num_threads(config.distributed.cpus_per_worker)
    data: SequenceData = ray.get(loop_config["data"])
    worker = DataParallelWorker(Shard(context.get_world_rank(), context.get_world_size()), ray.train.torch.get_device())
    loop_config["train_worker"](config, loop_config["run_dir"], data, progress=loop_config["progress"], worker=worker)


def fit_with_ray(config: TrainConfig, run_dir: str | Path, data: SequenceData | None, progress: bool,
                 train_worker: Callable[..., run_files.FitResult | None]) -> run_files.FitResult:
    """Run `train_worker` (train.fit, handed in so this module never imports train back) on distributed.num_workers
    Ray Train workers, each with its `DataParallelWorker`; returns rank 0's result, read from run_dir."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = config.distributed
    run_dir = Path(run_dir).resolve()
    data = data if data is not None else load_sequences(config.data)
    started_ray = not ray.is_initialized()
    if started_ray:
        if settings.address:
            ray.init(address=settings.address, logging_level=logging.WARNING)
        else:  # "local": a new private Ray even where another one runs (a `seqrank serve`, a test cluster)
            # Without the dashboard (two cores here) Ray Train's placement-group cleaner cannot reach the State
            # API and warns every second; log_to_driver=progress keeps a --quiet run's console free of that.
            ray.init(address="local", num_cpus=settings.num_workers * settings.cpus_per_worker,
                     include_dashboard=False, logging_level=logging.WARNING, log_to_driver=progress)
    storage = Path(tempfile.mkdtemp(prefix="seqrank-ray-train-"))  # Ray Train's own state, not part of the run
    try:
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"config": config.to_dict(), "run_dir": str(run_dir), "data": ray.put(data),
                               "progress": progress, "train_worker": train_worker},
            scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                         resources_per_worker={"CPU": settings.cpus_per_worker,
                                                               **({"GPU": 1} if settings.use_gpu else {})}),
            run_config=RunConfig(name=run_dir.name, storage_path=str(storage)),
        )
        trainer.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if started_ray:
            ray.shutdown()
    return run_files.read_result(run_dir)
