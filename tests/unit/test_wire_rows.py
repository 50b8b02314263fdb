"""encode_rows (pure): each share's bytes equal encode() of its rows, for every wire format,
so converting the batch once changes nothing the workers receive."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.engine.tensor_proto import from_proto, proto_fields, to_proto
from services.engine.wire import WireError, decode, encode, encode_rows
from services.protos_gen.epserve.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_rows_encode_as_their_own_tensors(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 200, generator=g) * torch.logspace(-3, 3, 9).unsqueeze(1)  # row scales
    x[4] = 0.0  # an all-zero row: fp8's scale falls back to 1
    rows = [np.array([0, 3, 8]), np.array([], dtype=np.int64), np.array([8, 1, 1]),
            np.arange(9)]
    got = encode_rows(x, rows, dtype)
    want = [encode(x[torch.from_numpy(r)], dtype) for r in rows]
    assert got == want
    assert got[1].shape == (0, 200) and decode(got[1]).shape == (0, 200)


def test_integer_rows_and_bad_input():
    slots = torch.arange(24, dtype=torch.int32).view(6, 4)
    r = np.array([5, 0])
    assert encode_rows(slots, [r], "int32") == [encode(slots[torch.from_numpy(r)], "int32")]
    with pytest.raises(WireError):
        encode_rows(slots, [r], "fp16")
    with pytest.raises(WireError):
        encode_rows(torch.zeros(2, 3, 4), [r], "fp8")


def test_proto_fields_build_the_same_message():
    w = encode(torch.randn(3, 130), "fp8")
    assert tensor_pb2.Tensor(**proto_fields(w)) == to_proto(w)
    assert from_proto(to_proto(w)) == w
