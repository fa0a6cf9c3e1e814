"""The simulation engine's look-up by destination answers every site as Flower's own LinkState
does, on Flower's real in-memory state, without validating other sites' instructions."""
from __future__ import annotations

import pytest
from flwr.app import Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server.simulation_engine import look_up_by_destination

RUN_ID = 7
SUPERLINK_NODE_ID = 1


@pytest.fixture(autouse=True)
def task_identity():
    """What flwr-simulation sets before its ServerApp creates messages."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID


def simulation(num_nodes: int):
    """Flower's in-memory state and grid, set up as flwr-simulation sets them up."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = list(_register_nodes(num_nodes, factory))
    state = factory.state()
    run = Run.create_empty(run_id=RUN_ID)
    run.federation_id, run.primary_task_id = NOOP_FEDERATION_ID, 1
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=RUN_ID)
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return grid, state, nodes


def push(grid, destinations, ttl=None) -> list[str]:
    return list(grid.push_messages([Message(RecordDict(), node, "train", ttl=ttl) for node in destinations]))


def sweep(state, nodes) -> dict[int, list[str]]:
    """One pass of the engine's feeder thread: every node asks for one instruction."""
    return {node: [m.metadata.message_id for m in state.get_message_ins(node_id=node, limit=1)] for node in nodes}


def count_validations(state) -> list:
    calls = []
    validate = state._check_stored_messages  # pylint: disable=protected-access

    def counted(message_ids, run_id=None):
        calls.append(set(message_ids))
        return validate(message_ids, run_id)

    state._check_stored_messages = counted  # pylint: disable=protected-access
    return calls


def test_answers_as_flower_does_and_validates_only_addressed_instructions():
    grids = {name: simulation(30) for name in ("flower", "looked-up")}
    assert look_up_by_destination(grids["looked-up"][0])
    answers = {}
    for name, (grid, state, nodes) in grids.items():
        validations = count_validations(state)
        pushed = push(grid, [nodes[3], nodes[3], nodes[11], nodes[29]])
        first, second, third = sweep(state, nodes), sweep(state, nodes), sweep(state, nodes)
        by_node = {nodes.index(n): len(ids) for n, ids in first.items() if ids}
        answers[name] = (by_node, {nodes.index(n): len(ids) for n, ids in second.items() if ids},
                         any(third.values()))
        delivered = sorted(i for ids in (*first.values(), *second.values()) for i in ids)
        assert delivered == sorted(pushed)  # each instruction once, to its own node
        answers[name] += (len(validations),)
    flower, looked_up = answers["flower"], answers["looked-up"]
    assert flower[:3] == looked_up[:3] == ({3: 1, 11: 1, 29: 1}, {3: 1}, False)
    # Flower validates every stored instruction on every node's ask; the look-up only on the asks
    # of nodes with an undelivered instruction (5 asks in three sweeps)
    assert flower[3] > 10 * looked_up[3]
    assert looked_up[3] <= 5 * 4


def test_an_expired_instruction_is_not_delivered():
    grid, state, nodes = simulation(5)
    assert look_up_by_destination(grid)
    push(grid, [nodes[2]], ttl=1e-6)
    assert sweep(state, nodes) == {node: [] for node in nodes}
    assert not state.message_ins_store  # Flower's own validation deleted it


def test_other_grids_and_a_second_call_change_nothing():
    grid, state, _ = simulation(2)
    assert look_up_by_destination(object()) is False
    assert look_up_by_destination(grid) is True
    wrapped = state.get_message_ins
    assert look_up_by_destination(grid) is False  # already wrapped: not wrapped twice
    assert state.get_message_ins is wrapped
    with pytest.raises(AssertionError):
        state.get_message_ins(node_id=12345, limit=0)
