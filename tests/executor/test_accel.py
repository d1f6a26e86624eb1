"""The accelerator choice: a generated probe guest, timed under real QEMU."""

from __future__ import annotations

from pathlib import Path

from services.executor.runtimes import accel


async def test_the_probe_guest_boots_and_exits_under_tcg(tmp_path: Path) -> None:
    image = tmp_path / "probe.elf"
    image.write_bytes(accel.probe_image())
    took = await accel.time_probe("tcg", image)
    assert took is not None and took < accel.PROBE_TIMEOUT


async def test_auto_only_trusts_kvm_that_beats_tcg() -> None:
    mode, reason = await accel.choose_accel("auto")
    assert mode in ("kvm", "tcg")
    assert "TCG" in reason or "/dev/kvm" in reason
    if mode == "kvm":
        assert "<=" in reason


async def test_an_explicit_setting_is_not_probed() -> None:
    assert await accel.choose_accel("tcg") == ("tcg", "configured")
