"""The Flower ``ClientApp``: a sampled client trains its assigned random subnetwork locally.

On a ``train`` message the client

1. reads the run config, its block b, the round and the normalization constants from the
   message config (sent by the server; it holds no secret: no seeds, no other client's block);
2. finds its data: the shard ``partition-id`` of ``num-partitions`` of the run's data spec
   (``--node-config "partition-id=0 num-partitions=10"``, set automatically by the simulation
   engine), or, when its node config has ``data="SPEC"``, the whole training split of its own
   data set (a real deployment, where each site holds its own data);
3. loads the global weights, freezes every parameter outside block b, runs ``local_epochs`` of
   SGD (Dong, Chen, Ozgur, ICML 2025, arXiv 2503.03043, Sec. 3: a client updates one random
   sub-network), and replies with Delta = w_local - w_global on block b only (d times less
   upload than the full model).

The client adds no noise and does no clipping: privacy is client-level with a trusted server
that clips and noises (McMahan et al., ICLR 2018, DP-FedAvg). The server re-applies the block
mask and the clipping whatever the client sends. No metric about the client's data is
returned, not even its number of examples. Before the first round the server's query message
asks for the node's ``partition-id`` (public node config) to number the clients.
"""

from __future__ import annotations

import hashlib

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from asymflow.data import load_data
from asymflow.data.dataset import ImageSplit, TensorImageDataset
from asymflow.federated.config import FederatedConfig
from asymflow.federated.network import (
    block_names,
    build_network,
    load_weights,
    local_update,
    partition_plan,
)
from asymflow.federated.shards import client_split
from asymflow.federated.strategy import (
    ARRAYS_KEY,
    BLOCK_KEY,
    CONFIG_KEY,
    PARTITION_KEY,
    ROUND_KEY,
    UPDATE_KEY,
    arrays_to_weights,
    weights_to_arrays,
)

__all__ = ["app", "client_shard", "partition_reply", "train_client"]

NORM_MEAN_KEY = "norm-mean"
NORM_STD_KEY = "norm-std"
NUM_CLASSES_KEY = "num-classes"
IN_CHANNELS_KEY = "in-channels"

app = ClientApp()


def client_shard(config: FederatedConfig, node_config: dict[str, object]) -> tuple[int, ImageSplit]:
    """(client number, training data) of this node; see the module docstring."""
    local = node_config.get("data")
    if isinstance(local, str) and local:
        partition = int(str(node_config.get("partition-id", 0)))
        return partition, load_data(local, progress=False).train
    if "partition-id" not in node_config:
        raise ValueError(
            "node_config must give partition-id and num-partitions (or data=SPEC for the "
            'node\'s own data), e.g. --node-config "partition-id=0 num-partitions=10"'
        )
    partition = int(str(node_config["partition-id"]))
    parts = int(str(node_config.get("num-partitions", config.clients)))
    _, shard = client_split(
        config.data, partition, parts, split=config.split, alpha=config.alpha, seed=config.seed
    )
    return partition, shard


def _local_seed(seed: int, server_round: int, partition: int) -> int:
    digest = hashlib.sha256(f"{seed}:{server_round}:{partition}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def train_client(message: Message, node_config: dict[str, object]) -> RecordDict:
    """The reply content of a ``train`` message: ``{"update": Delta on the block}``."""
    record = message.content.config_records[CONFIG_KEY]
    values = dict(record)
    config = FederatedConfig.from_run_config(values)
    block = int(values[BLOCK_KEY])  # type: ignore[arg-type]
    server_round = int(values.get(ROUND_KEY, 0))  # type: ignore[arg-type]
    mean = [float(v) for v in values[NORM_MEAN_KEY]]  # type: ignore[union-attr]
    std = [float(v) for v in values[NORM_STD_KEY]]  # type: ignore[union-attr]
    torch.set_num_threads(config.threads)
    partition, shard = client_shard(config, node_config)
    dataset = TensorImageDataset(shard, train=True, mean=mean, std=std, augment=False)
    model = build_network(
        config,
        num_classes=int(values[NUM_CLASSES_KEY]),  # type: ignore[arg-type]
        in_channels=int(values[IN_CHANNELS_KEY]),  # type: ignore[arg-type]
    )
    load_weights(model, arrays_to_weights(message.content.array_records[ARRAYS_KEY]))
    names = block_names(partition_plan(model, config), block)
    generator = torch.Generator().manual_seed(_local_seed(config.seed, server_round, partition))
    delta = local_update(
        model,
        names,
        dataset,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        generator=generator,
    )
    return RecordDict({UPDATE_KEY: weights_to_arrays(delta)})


def partition_reply(node_config: dict[str, object]) -> RecordDict:
    """The reply to the server's population query: this node's ``partition-id`` (its public
    node config, by which the server numbers the clients), or nothing if it has none."""
    values: dict[str, int] = {}
    if PARTITION_KEY in node_config:
        values[PARTITION_KEY] = int(str(node_config[PARTITION_KEY]))
    return RecordDict({CONFIG_KEY: ConfigRecord(values)})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Flower entry point: the population query (see :func:`partition_reply`)."""
    return Message(content=partition_reply(dict(context.node_config)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower entry point: local training of the assigned block."""
    content = train_client(msg, dict(context.node_config))
    return Message(content=content, reply_to=msg)
