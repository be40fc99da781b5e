"""`minigpt.device.describe_cpu`: the CPU line every CPU benchmark's results carry."""
import io
import os
import platform
from unittest import mock

import torch

from minigpt.device import describe_cpu

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


def test_the_line_names_the_model_family_instruction_set_and_cores():
    with mock.patch("builtins.open", return_value=io.StringIO(ZEN3)):
        line = describe_cpu()
    assert line == (f"{platform.machine()}, AMD EPYC 7B13 (family 25), "
                    f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores")


def test_without_proc_cpuinfo_the_rest_is_still_said():
    with mock.patch("builtins.open", side_effect=FileNotFoundError("/proc/cpuinfo")):
        line = describe_cpu()
    assert line == f"{platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores"
