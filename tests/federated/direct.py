"""A Grid that runs the real ClientApp in this process (no Ray), for the ServerApp tests and
the chaos test: deterministic, and seconds instead of Ray's start-up."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from asymflow.federated.strategy import CONFIG_KEY, UPDATE_KEY


class DirectGrid(Grid):
    """A Grid whose nodes run ``app`` in this process; it records every exchange (one call
    per round for training, then one for client evaluation, which is always empty here), and
    counts the population queries (node i of ``node_ids`` has partition-id i)."""

    def __init__(self, app: ClientApp, node_ids: list[int]) -> None:
        self.app = app
        self.node_ids = node_ids
        self.calls: list[list[tuple[int, dict[str, Any], set[str]]]] = []
        self.queries = 0

    def set_run(self, run: Any) -> None:  # pragma: no cover - unused
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover - unused
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies, exchanged, queried = [], [], False
        partition = {node: i for i, node in enumerate(self.node_ids)}
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = message.metadata.dst_node_id
            context = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": partition[node], "num-partitions": len(partition)},
                state=RecordDict(),
                run_config={},
            )
            reply = self.app(message, context)
            assert reply.metadata.src_node_id == node
            replies.append(reply)
            if message.metadata.message_type == MessageType.QUERY:
                self.queries, queried = self.queries + 1, True
                continue
            config = dict(message.content.config_records[CONFIG_KEY])
            exchanged.append((node, config, set(reply.content.array_records[UPDATE_KEY])))
        if not queried:
            self.calls.append(exchanged)
        return replies


def set_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need the process's task identity, which Flower's runtimes set."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
