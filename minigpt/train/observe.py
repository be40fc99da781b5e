"""What a training run reports: model FLOP utilisation and the metrics log.

MFU (PaLM, Chowdhery et al. 2022, appendix B) is achieved FLOP/s over the device's peak,
with FLOPs counted from what the step computes (`minigpt.counts.step_flops_per_token`: no LM
head for a classifier, no weight gradients for frozen weights). The peak is a property of the
hardware, so it lives here and never in the model; every run states the one it assumes.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch
from torch import nn

from minigpt.config import GPTConfig
from minigpt.counts import flops_per_token, step_flops_per_token
from minigpt.files import writing

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, no sparsity).
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def _cpu_ghz() -> float:
    try:
        max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        return int(max_khz) / 1e6
    except (OSError, ValueError):
        pass
    try:
        mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
        if mhz:
            return float(mhz.group(1)) / 1e3
    except OSError:
        pass
    return 2.5  # a typical server core, when the OS does not say


def _cpu_flops_per_cycle() -> tuple[int, str]:
    try:
        flags = set(re.search(r"flags\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).split())
    except (OSError, AttributeError):
        flags = set()
    if "avx512f" in flags:
        return 64, "AVX-512 FMA"  # 2 FMA units x 16 fp32 lanes x 2
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2 FMA"  # 2 FMA units x 8 fp32 lanes x 2
    return 16, "SIMD, assumed"


def peak_flops(device: torch.device, threads: int | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was arrived at) for MFU; on a CPU, `threads` computing
    (None: torch's thread count; micro-batch threads leave torch's at 1, minigpt.train.threads)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"{name}: {flops / 1e12:.0f} TFLOP/s bf16 dense (data sheet)"
        return 312e12, f"{name} is not in the table: assuming A100's 312 TFLOP/s bf16; set peak_flops"
    threads = threads or torch.get_num_threads()
    ghz = _cpu_ghz()
    per_cycle, isa = _cpu_flops_per_cycle()
    flops = threads * ghz * 1e9 * per_cycle
    return flops, f"CPU: {threads} threads x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({isa}) = {flops / 1e9:.0f} GFLOP/s"


def find_gpt_config(model: nn.Module) -> GPTConfig | None:
    """The GPTConfig of `model` or of the first submodule that has one (a classifier over a GPT)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, GPTConfig):
            return config
    return None


def model_flops_per_token(model: nn.Module, seq_len: int, lm_head: bool = True) -> float | None:
    """FLOPs per token of one training step of `model` as it stands (`counts.step_flops_per_token`).

    Read from the model itself: the LM head counts only when `model` is the GPT (a wrapper
    such as a classifier reads hidden states), frozen weights get no weight gradients, LoRA
    adapters (parameters named lora_*) add their own small matmuls, and gradients flow back
    only to the first block with something to train. None when there is no GPT inside.
    `lm_head=False` leaves the head out even when `model` is the GPT.
    """
    from minigpt.model import GPT

    gpt = next((m for m in model.modules() if isinstance(m, GPT)), None)
    if gpt is None:
        config = find_gpt_config(model)
        return None if config is None else flops_per_token(config, seq_len=seq_len, training=True)
    trained, adapters = [], []
    for block in gpt.blocks:
        named = list(block.named_parameters())
        trained.append(sum(p.numel() for n, p in named if p.requires_grad and "lora_" not in n))
        adapters.append(sum(p.numel() for n, p in named if "lora_" in n))
    return step_flops_per_token(
        gpt.config, seq_len, lm_head=model is gpt and lm_head, trained=trained, adapters=adapters,
        embeddings_trained=gpt.tok_emb.weight.requires_grad or gpt.pos_emb.weight.requires_grad,
        head_trained=gpt.lm_head.weight.requires_grad)


def lm_head_flops_per_position(model: nn.Module) -> float:
    """The LM head's share of `model_flops_per_token` (its forward, and its backward as far as
    the step computes it): what a loss that applies the head only at target positions saves
    at every other position. 0 when `model` is not itself the GPT (a classifier reads hidden
    states and never runs the head)."""
    from minigpt.model import GPT

    if not isinstance(model, GPT):
        return 0.0
    # The head's FLOPs do not depend on the sequence length, so any length gives the difference.
    seq_len = model.config.block_size
    return model_flops_per_token(model, seq_len) - model_flops_per_token(model, seq_len, lm_head=False)


class MetricsLog:
    """metrics.jsonl in the run folder (one JSON object per line), and TensorBoard if asked.

    On resume, lines for steps after the checkpoint (from the interrupted run) are dropped
    so the log reads as one run. Each line carries `wall_s`, the seconds since this log
    was opened (the start of training in this process), for loss-versus-time curves.
    """

    def __init__(self, out_dir: Path, resume_step: int | None, tensorboard: bool, enabled: bool) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        self.started = time.perf_counter()
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = [line for line, record in _parse(self.path) if record.get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.is_file():
            self.path.unlink()
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError as err:
                logger.warning("tensorboard=True but TensorBoard is not installed (%s); "
                               "pip install tensorboard. Metrics still go to %s", err, self.path)

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with writing(self.path):
            self.file.write(json.dumps({"kind": kind, "step": step, **values,
                                        "wall_s": round(time.perf_counter() - self.started, 3)}) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; is it a training run folder?")
    return [record for _, record in _parse(path)]


def _parse(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for each line of a metrics.jsonl. A last line cut by a crash is
    dropped with a warning; a bad line before it is an error naming the line."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == len(lines) - 1:
                logger.warning("%s: dropping its last line, cut short (by a crash, most likely): %.60r", path, line)
                break
            raise ValueError(f"{path}, line {i + 1}: not a metrics record ({err}); the file is damaged. Fix or "
                             f"delete that line (or move the file aside) and run again") from None
        out.append((line, record))
    return out



class TrainWindow:
    """Loss, throughput and MFU over the updates since the last log step."""

    def __init__(self, peak: float, dp_size: int, world_size: int | None = None) -> None:
        """`dp_size` ranks read different tokens (a tensor-parallel group shares its batch);
        MFU is against the peak of all `world_size` devices (default dp_size)."""
        self.peak, self.dp_size = peak, dp_size
        self.world_size = dp_size if world_size is None else world_size
        self.flops: float | None = None
        """Model FLOPs per token with the LM head at every position, from the first batch with token ids."""
        self.head_flops = 0.0
        """Of those, the LM head's (forward and backward), charged only where it ran."""
        self.time, self.tokens, self.head_tokens, self.losses = 0.0, 0, 0, []

    def add(self, seconds: float, tokens: int, loss: float | None, model: nn.Module, seq_len: int | None,
            head_tokens: int | None = None) -> None:
        """One update: its seconds, the tokens of this rank, its loss (None if skipped), and how
        many of the tokens the LM head ran on (None: all; a prompt-masked loss skips the rest)."""
        self.time += seconds
        self.tokens += tokens * self.dp_size
        self.head_tokens += (tokens if head_tokens is None else head_tokens) * self.dp_size
        if self.flops is None and seq_len:
            self.flops = model_flops_per_token(model, seq_len)
            self.head_flops = lm_head_flops_per_position(model)
        if loss is not None:
            self.losses.append(loss)

    def write(self, step: int, lr: float, grad_norm: float, skipped: int, metrics: MetricsLog, bar) -> None:
        """Write a 'train' record and the progress-bar postfix, then start a new window."""
        tokens_per_s = self.tokens / self.time if self.time > 0 else 0.0
        mfu = None
        if self.flops and self.time > 0:
            done = self.flops * self.tokens - self.head_flops * (self.tokens - self.head_tokens)
            mfu = done / self.time / (self.peak * self.world_size)
        loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
        values = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
                  "skipped": skipped}
        metrics.write("train", step, values)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
        if mfu is not None:
            postfix["mfu"] = f"{100 * mfu:.1f}%"
        bar.set_postfix(postfix, refresh=False)
        self.time, self.tokens, self.head_tokens, self.losses = 0.0, 0, 0, []
