"""Training the public model with torch's DDP engine, launched by ``torchrun``.

:class:`DistributedPublic` is the public server's :class:`LocalPublic` when it is given
several processes (``asymflow public serve --nproc-per-node N``, DESIGN.md sec. 5). Each
training call writes a job (the uploaded bits and labels, the model and optimizer state, the
hyper-parameters) to a temporary directory and runs ``python -m torch.distributed.run
--standalone --nproc-per-node N -m asymflow.transport.ddp JOB``. Every worker wraps M_res in
``torch.nn.parallel.DistributedDataParallel`` (gloo on CPU, NCCL with one CUDA device per
process) and trains on its shard of each batch (:meth:`LocalPublic.train_shard`); rank 0
writes the new state, which the server loads only if every worker succeeded.

Batch normalization runs over the whole batch of all processes (:class:`GlobalBatchNorm2d`),
so one DDP step equals one single-process step on the same batch up to float rounding
(DDP averages gradients over processes: PyTorch docs, "Distributed Data Parallel",
https://pytorch.org/docs/stable/notes/ddp.html). No cluster code of our own: torchrun
starts, rendezvous and supervises the processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from asymflow.accounting.events import event_from_dict
from asymflow.checks import check_int
from asymflow.delta.contract import NoisyLabels, SanitizedResidual, TrainArgs
from asymflow.public.local import LocalPublic
from asymflow.transport.spec import PublicSpec

WORKER = "asymflow.transport.ddp"
"""The module torchrun runs in every process."""

JOB_FILE = "job.pt"
RESULT_FILE = "result.pt"
LOG_TAIL_LINES = 30
"""Lines of the workers' output kept in a :class:`DistributedTrainingError`."""


class DistributedTrainingError(RuntimeError):
    """torchrun or a worker failed; ``output`` holds the end of what they printed."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


# ------------------------------------------------------------------ batch norm over ranks


class _SumOverRanks(torch.autograd.Function):
    """y = sum_r x_r on every rank. Every rank's loss depends on every x_r, so the gradient
    of x_r is again the sum over ranks of dL/dy."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch of all processes: the
    per-channel sums, counts and squared deviations are summed over ranks with a
    differentiable all-reduce, so outputs, gradients and running statistics are those of
    BatchNorm2d on the whole batch (Ioffe & Szegedy, ICML 2015, Alg. 1; the unbiased variance
    updates the running one). It is torch.nn.SyncBatchNorm's computation, which refuses CPU
    tensors; outside a process group or in eval mode it is BatchNorm2d."""

    @classmethod
    def sharing(cls, bn: nn.BatchNorm2d) -> GlobalBatchNorm2d:
        """A GlobalBatchNorm2d holding ``bn``'s own parameters and buffers (an optimizer over
        ``bn`` keeps working; state_dict keys are unchanged)."""
        out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        out.weight, out.bias = bn.weight, bn.bias
        out.running_mean, out.running_var = bn.running_mean, bn.running_var
        out.num_batches_tracked = bn.num_batches_tracked
        out.train(bn.training)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = (0, 2, 3)
        sums = _SumOverRanks.apply(torch.cat([x.sum(dims), x.new_full((1,), x.numel() // c)]))
        n = float(sums[c])
        if n < 2:
            raise ValueError(
                f"expected more than 1 value per channel when training, got {n:g} over all ranks"
            )
        mean = sums[:c] / n
        centred = x - mean[:, None, None]
        var = _SumOverRanks.apply(centred.square().sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps)[:, None, None]
        if self.affine:
            out = out * self.weight[:, None, None] + self.bias[:, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum
                if f is None:
                    f = 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean, alpha=f)
                self.running_var.mul_(1 - f).add_(var * (n / (n - 1)), alpha=f)
        return out


def global_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by a :class:`GlobalBatchNorm2d` sharing its
    parameters and buffers; return ``module``."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, GlobalBatchNorm2d.sharing(child))
        else:
            global_batch_norm(child)
    return module


# ------------------------------------------------------------------ the launcher


class DistributedPublic(LocalPublic):
    """The public side of ``spec`` whose :meth:`train` runs as a DDP job of
    ``nproc_per_node`` processes on this machine (on CUDA when it has that many devices,
    else on CPU with ``torch.get_num_threads()`` threads each). Upload, logits and state stay
    in process. A failed job raises :class:`DistributedTrainingError` and leaves the model's
    state as it was."""

    def __init__(self, spec: PublicSpec, *, nproc_per_node: int) -> None:
        check_int("nproc_per_node", nproc_per_node, 1)
        super().__init__(spec.factory(), **spec.public_options())
        self.spec = spec
        self.nproc_per_node = nproc_per_node
        self.device = "cuda" if torch.cuda.device_count() >= nproc_per_node else "cpu"

    def train_with(self, dataset_id: str, args: TrainArgs) -> dict[str, float]:
        self.training_rows(dataset_id, args)
        data, labels = self.dataset(dataset_id)
        assert labels is not None  # training_rows refuses unlabelled data sets
        net = self.model(args.model)
        optimizer = self.optimizers[args.model]
        indices = args.indices
        job = {
            "spec": self.spec.to_dict(),
            "device": self.device,
            "bits": torch.from_numpy(np.array(data.bits)),
            "shape": list(data.shape),
            "event": data.event.to_dict(),
            "version": data.version,
            "labels": torch.from_numpy(np.array(labels.labels)),
            "classes": labels.classes,
            "label_event": labels.event.to_dict(),
            "state": {"model": net.state_dict(), "optimizer": optimizer.state_dict()},
            "train": {
                **{f.name: getattr(args, f.name) for f in fields(args)},
                "indices": None if indices is None else torch.from_numpy(np.array(indices)),
            },
        }
        with tempfile.TemporaryDirectory(prefix="asymflow-ddp-") as tmp:
            directory = Path(tmp)
            torch.save(job, directory / JOB_FILE)
            self._run(directory)
            result = torch.load(directory / RESULT_FILE, map_location="cpu", weights_only=True)
        net.load_state_dict(result["model"])
        optimizer.load_state_dict(result["optimizer"])
        return dict(result["metrics"])

    def _run(self, directory: Path) -> None:
        """torchrun the workers on ``directory``; raise if any of them fails."""
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "PYTHONPATH": package_root if not path else f"{package_root}{os.pathsep}{path}",
        }
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={self.nproc_per_node}", "-m", WORKER, str(directory),
        ]  # fmt: skip
        log_path = directory / "workers.log"
        with log_path.open("wb") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0 or not (directory / RESULT_FILE).exists():
            lines = log_path.read_text(errors="replace").splitlines()
            raise DistributedTrainingError(
                f"torchrun with {self.nproc_per_node} processes exited with code {code}",
                "\n".join(lines[-LOG_TAIL_LINES:]),
            )


# ------------------------------------------------------------------ the worker


def work(directory: Path) -> None:
    """One torchrun process: train its shard of the job in ``directory`` under DDP; rank 0
    writes the resulting state and the metrics of the whole batch atomically."""
    job = torch.load(directory / JOB_FILE, weights_only=True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = job["device"] == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        public = PublicSpec.from_dict(job["spec"]).make_public()
        data = SanitizedResidual(
            job["bits"].numpy(),
            tuple(job["shape"]),
            event_from_dict(job["event"]),
            job["version"],
        )
        labels = NoisyLabels(
            job["labels"].numpy(), job["classes"], event_from_dict(job["label_event"])
        )
        key = public.upload(data, labels)
        options = job["train"]
        indices = options["indices"]
        args = TrainArgs(**{**options, "indices": None if indices is None else indices.numpy()})
        net = public.model(args.model).to(device)
        net.load_state_dict(job["state"]["model"])
        public.optimizers[args.model].load_state_dict(job["state"]["optimizer"])  # onto `device`
        public.models[args.model] = DistributedDataParallel(
            global_batch_norm(net), device_ids=[local_rank] if cuda else None
        )
        metrics = public.train_shard(key, args, (rank, world))
        seen = metrics["samples"]
        totals = torch.tensor(
            [metrics["loss"] * seen, metrics["acc_on_received_labels"] * seen, seen],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(totals)
        if rank == 0:
            loss, correct, samples = totals.tolist()
            result = {
                "model": net.state_dict(),
                "optimizer": public.optimizers[args.model].state_dict(),
                "metrics": {
                    "loss": loss / max(samples, 1.0),
                    "acc_on_received_labels": correct / max(samples, 1.0),
                    "samples": samples,
                },
            }
            tmp = directory / f".{RESULT_FILE}.tmp"
            torch.save(result, tmp)
            os.replace(tmp, directory / RESULT_FILE)
        # tear down together: a rank that destroys its gloo group while the other still
        # writes the result sometimes aborts ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """``torchrun ... -m asymflow.transport.ddp JOB_DIR``: see :func:`work`."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: torchrun ... -m asymflow.transport.ddp JOB_DIR", file=sys.stderr)
        return 2
    work(Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "DistributedPublic",
    "DistributedTrainingError",
    "GlobalBatchNorm2d",
    "global_batch_norm",
    "work",
]
