"""--precision exact|fast: what fast picks, the int8 fallback without native bf16, and fast
end to end in --tiny mode."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dat import precision
from dat.errors import DatError
from dat.precision import choose, cpu_flags
from dat.steer import SteeredLM

CPU = torch.device("cpu")


def test_exact_is_float32_and_fast_follows_the_cpu_flags():
    assert choose("exact", CPU).dtype is torch.float32 and not choose("exact", CPU).int8_linear
    bf16 = choose("fast", CPU, flags={"avx2", "avx512_bf16"})
    assert bf16.dtype is torch.bfloat16 and not bf16.int8_linear
    assert "native bf16: avx512_bf16" in bf16.describe()
    assert choose("fast", CPU, flags={"amx_bf16"}).dtype is torch.bfloat16
    fallback = choose("fast", CPU, flags={"avx2", "fma"})
    assert fallback.int8_linear and fallback.dtype is torch.float32
    assert "no native bf16" in fallback.describe() and "int8" in fallback.describe()
    assert choose("bf16", CPU, flags=set()).dtype is torch.bfloat16  # forced
    assert choose("int8", CPU, flags={"amx_bf16"}).int8_linear
    with pytest.raises(DatError, match="runs on the CPU only"):
        choose("int8", torch.device("cuda"))
    with pytest.raises(DatError, match="--precision must be one of exact, fast"):
        choose("fastest", CPU)


def test_cpu_flags_reads_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_without_native_bf16_fast_quantises_the_linear_layers(monkeypatch, default_lm):
    """A CPU without avx512_bf16/amx_bf16: fast picks int8 dynamic linear layers, says so,
    and still decodes sensible text close to the exact model's."""
    monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": {"avx2", "fma"})
    lm = SteeredLM.from_pretrained("default", device="cpu", precision="fast")
    assert lm.precision.int8_linear and "int8 fallback" in lm.precision.describe()
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in lm.model.modules())
    chat = [[{"role": "user", "content": "Name a fruit that is yellow."}]]
    text = lm.generate(chat, max_new_tokens=12)[0]
    assert text.strip()
    # the exact model finds the int8 reply about as likely as its own (same language)
    nll_fast = default_lm.loss(chat, [text]).item()
    nll_exact = default_lm.loss(chat, default_lm.generate(chat, max_new_tokens=12)).item()
    assert nll_fast < nll_exact + 1.5
    # int8 layers pass no gradient: training through them is refused, not silently a no-op
    actions = torch.zeros(1, 2, lm.hidden_size, requires_grad=True)
    with pytest.raises(DatError, match="no gradient"):
        lm.loss(chat, [text], actions=actions)
    with pytest.raises(DatError, match="cannot be combined with dtype bfloat16"):
        SteeredLM.from_pretrained("default", device="cpu", precision="int8", dtype="bfloat16")


def test_fast_runs_end_to_end_in_tiny_mode(tmp_path):
    out = tmp_path / "qs"
    p = subprocess.run([sys.executable, "-m", "dat.cli", "quickstart", "--tiny", "--precision",
                        "fast", "--no-compare-tokens", "--no-per-scenario", "--out", str(out)],
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "precision fast:" in p.stdout
    assert (out / "report" / "results.json").is_file()
    meta = (out / "explore-residual" / "meta.json").read_text()
    assert '"precision": "fast"' in meta  # part of the buffer's identity
