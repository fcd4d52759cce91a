"""torchrun's variables checked before any process group starts: missing, not numbers, out of
range, each one line; a peer that never comes ends the wait after a bound, with a line."""
import socket

import pytest
import torch

from diffusion101 import distributed
from diffusion101.config import UserError

TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env,said", [
    ({"RANK": "0"}, "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),  # by hand
    ({**TORCHRUN, "RANK": "abc"}, "RANK='abc' is not a whole number"),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, r"WORLD_SIZE=0 is out of range \(1\.\.65536\)"),
    ({**TORCHRUN, "RANK": "2"}, r"RANK=2 is out of range \(0\.\.1\)"),  # one past the last
    ({**TORCHRUN, "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is out of range"),
    ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT='http' is not a whole number"),
    ({**TORCHRUN, "MASTER_ADDR": ""}, "MASTER_ADDR is not"),
])
def test_torchruns_variables_are_checked_before_any_group(monkeypatch, env, said):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=said):
        distributed.setup(torch.device("cpu"))
    assert not torch.distributed.is_initialized()


def test_no_rank_is_one_process_and_a_bad_timeout_is_refused(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup(torch.device("cpu")) == (0, 1, torch.device("cpu"), False)
    for text in ("0", "-5", "nan", "soon"):
        monkeypatch.setenv("DIFFUSION101_PEER_TIMEOUT", text)
        with pytest.raises(UserError, match="DIFFUSION101_PEER_TIMEOUT"):
            distributed.peer_timeout()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank", ["0", "1"])  # the one that waits for peers, the one that dials
def test_a_peer_that_never_comes_ends_the_wait_with_one_line(monkeypatch, rank):
    for name, value in {**TORCHRUN, "RANK": rank, "LOCAL_RANK": rank,
                        "MASTER_PORT": str(_free_port()), "DIFFUSION101_PEER_TIMEOUT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=rf"^process {rank} of 2 could not join the others at "
                                        rf"127\.0\.0\.1:\d+ within 1 s \(") as e:
        distributed.setup(torch.device("cpu"))
    assert "\n" not in str(e.value) and not torch.distributed.is_initialized()
