"""The driver's messages: a step round-trips through its int64 encoding (the docstring's example included),
and the one-off JSON messages keep their payload."""

from __future__ import annotations

import torch

from mixtral.distributed.protocol import Command, StepMessage, command_message, json_message, read_json


def test_docstring_example() -> None:
    t9 = 31000
    msg = StepMessage(seqs=[(7, 0, 9, 1, 1)], released=[9], token_ids=[torch.tensor([t9])], blocks=[42])
    assert msg.encode().tolist() == [1, 1, 1, 1, 1, 0, -1, 7, 0, 9, 1, 1, 9, t9, 42]


def test_step_round_trip() -> None:
    prompt = torch.arange(100, 170)  # a 70-token prompt chunk next to two decode tokens
    msg = StepMessage(seqs=[(3, 0, 0, 70, 5), (4, 2, 33, 1, 0), (8, 1, 12, 1, 1)], released=[1, 2],
                      token_ids=[prompt, torch.tensor([5]), torch.tensor([6])], blocks=[10, 11, 12, 13, 14, 99])
    back = StepMessage.decode(msg.encode())
    assert back.seqs == msg.seqs and back.released == msg.released and back.blocks == msg.blocks
    assert [t.tolist() for t in back.token_ids] == [prompt.tolist(), [5], [6]]
    assert back.device_ids == 0 and back.input_rows is None


def test_step_fed_from_the_device() -> None:
    """A step launched ahead: no token ids on the wire; the ids tensor's length and the rows that feed it."""
    msg = StepMessage(seqs=[(3, 0, 80, 1, 0), (8, 1, 20, 1, 0)], device_ids=3, input_rows=[0, 2])
    back = StepMessage.decode(msg.encode())
    assert back.token_ids == [] and back.device_ids == 3 and back.input_rows == [0, 2]
    every_row = StepMessage.decode(StepMessage(seqs=[(3, 0, 80, 1, 0)], device_ids=1).encode())
    assert every_row.input_rows is None


def test_json_and_command_messages() -> None:
    payload = {"model": "/models/Mixtral-8x22B", "dtype": "bfloat16", "seed": 3, "names": ["é", "ü"]}
    msg = json_message(Command.LOAD, payload)
    assert Command(int(msg[0])) == Command.LOAD and read_json(msg) == payload
    assert command_message(Command.ALLOCATE, 1234).tolist() == [int(Command.ALLOCATE), 1234]
