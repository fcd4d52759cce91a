"""memory.py: the memory a network and a batch need, counted before it is spent, against what
the device (or this process, on a CPU) may take."""
import pytest

from diffusion101.config import UserError
from diffusion101.presets import get_preset


def test_memory_is_estimated_before_it_is_spent(tmp_path, monkeypatch):
    from diffusion101 import checkpoint, memory
    from diffusion101.model_files import load_model
    from diffusion101.unet import UNet
    from conftest import tiny_checkpoint
    for name in ("tiny", "cpu", "reference"):  # counted on the meta device, as built for real
        m = get_preset(name).model
        assert memory.parameter_count(m) == sum(p.numel() for p in UNet(m).parameters())
        assert memory.activation_floats(m, training=True) > memory.activation_floats(m, training=False) > 0
    monkeypatch.setattr(memory, "device_memory", lambda device: 2 ** 30)  # a 1 GiB machine
    cpu = get_preset("cpu").model
    memory.check_memory(cpu, 20, "cpu")  # the grid of digits 0-9, guided
    memory.check_memory(cpu, 128, "cpu", training=True)
    with pytest.raises(UserError, match=r"sampling 200,000 images at once .* needs about [\d,.]+ GiB"):
        memory.check_memory(cpu, 200_000, "cpu")
    big = get_preset("cpu").model
    big.img_size = 512
    with pytest.raises(UserError, match="training in batches of 128"):
        memory.check_memory(big, 128, "cpu", training=True)
    # a small file whose config asks for a huge network: refused from the counts alone
    crafted = tiny_checkpoint()
    crafted["config"]["model"]["channels"] = [8192, 8192]
    checkpoint.save(crafted, tmp_path / "crafted.pt")
    with pytest.raises(UserError, match=r"describes a network of [\d,]+ parameters, but its weights hold"):
        load_model(tmp_path / "crafted.pt")


def _kernel(tmp_path, monkeypatch, files: dict, address_space=None):
    """memory.cpu_memory reading a made-up /proc and /sys/fs/cgroup (and, if given, an
    address-space limit in bytes)."""
    import resource

    from diffusion101 import memory
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(memory, "PROC", tmp_path / "proc")
    monkeypatch.setattr(memory, "CGROUP", tmp_path / "cgroup")
    limit = resource.RLIM_INFINITY if address_space is None else address_space
    monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, resource.RLIM_INFINITY))
    return memory


GIB = 2 ** 30


@pytest.mark.parametrize("files,address_space,room", [
    # what the machine has available, then less under each kind of limit
    ({"proc/meminfo": f"MemTotal: 99 kB\nMemAvailable: {GIB // 1024} kB\n"}, None, GIB),
    ({"proc/meminfo": "MemAvailable: 99999999999 kB\n", "proc/self/cgroup": "0::/job\n",
      "cgroup/job/memory.max": str(3 * GIB), "cgroup/job/memory.current": str(GIB)}, None, 2 * GIB),
    ({"proc/self/cgroup": "4:memory:/box\n1:name=systemd:/\n",
      "cgroup/memory/box/memory.limit_in_bytes": str(3 * GIB),
      "cgroup/memory/box/memory.usage_in_bytes": str(GIB // 2)}, None, 5 * GIB // 2),
    ({"proc/self/cgroup": "0::/\n", "cgroup/memory.max": "max\n"}, None, None),  # no limit
    ({"proc/self/status": f"Name: python\nVmSize: {GIB // 1024} kB\n"}, 4 * GIB, 3 * GIB),
])
def test_the_memory_a_process_may_take_is_the_least_of_its_limits(tmp_path, monkeypatch, files,
                                                                   address_space, room):
    import os
    memory = _kernel(tmp_path, monkeypatch, files, address_space)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory.cpu_memory() == (total if room is None else room)


def test_a_batch_beyond_a_containers_limit_is_refused_with_its_number(tmp_path, monkeypatch):
    memory = _kernel(tmp_path, monkeypatch, {
        "proc/self/cgroup": "0::/\n", "cgroup/memory.max": str(3 * GIB),
        "cgroup/memory.current": "0"})
    with pytest.raises(UserError, match=r"training in batches of 60000 .* this process may take "
                                        r"3\.0 GiB on the cpu device"):
        memory.check_memory(get_preset("cpu").model, 60_000, "cpu", training=True)


def test_an_allocation_that_fails_inside_torch_is_one_line(capsys):
    """Under an address-space limit torch's allocator fails with a RuntimeError of its own."""
    import torch

    from diffusion101.cli import run_cli

    def allocate(argv):
        torch.empty(2 ** 50, dtype=torch.uint8)  # a PiB: no machine has it

    def other(argv):
        raise RuntimeError("some other failure")
    assert run_cli(allocate, []) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: out of memory: an allocation of 1,048,576.0 GiB failed (ask for "
                     "fewer or smaller images, or a smaller model); files already saved are intact"]
    with pytest.raises(RuntimeError, match="some other failure"):  # not ours to word
        run_cli(other, [])
