"""`minigpt.device.describe_cpu`: the CPU line every CPU benchmark's results carry."""
import io
from contextlib import ExitStack
from unittest import mock

import torch

from minigpt import device

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu avx2 fma

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model name\t: another block, not read
"""


def machine(cpuinfo):
    """describe_cpu() on a made-up machine: x86_64, AVX2, 2 cores, and `cpuinfo` as
    /proc/cpuinfo (an exception: no such file)."""
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(device.platform, "machine", lambda: "x86_64"))
        stack.enter_context(mock.patch.object(device.os, "cpu_count", lambda: 2))
        stack.enter_context(mock.patch.object(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2"))
        opened = {"side_effect": cpuinfo} if isinstance(cpuinfo, Exception) else {"return_value": io.StringIO(cpuinfo)}
        stack.enter_context(mock.patch("builtins.open", **opened))
        return device.describe_cpu()


def test_the_line_names_the_model_family_instruction_set_and_cores():
    assert machine(ZEN3) == "x86_64, AMD EPYC 7B13 (family 25), AVX2, 2 cores"


def test_a_model_without_a_family_is_named_alone():
    assert machine("model name\t: Some ARM core\n") == "x86_64, Some ARM core, AVX2, 2 cores"


def test_without_proc_cpuinfo_the_rest_is_still_said():
    assert machine(FileNotFoundError("/proc/cpuinfo")) == "x86_64, AVX2, 2 cores"
