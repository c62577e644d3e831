"""The H100 profiles against their calibration files: points, HBM floor, prefill, KV arithmetic."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from serving.emulator.calibration import (
    Calibration,
    ItlBatch1,
    Prefill,
    load_all,
    load_calibration,
    markdown_table,
    measured,
    predict,
    rows,
    worst_error,
)
from serving.emulator.profiles import PROFILE_ALIASES, PROFILES, get_profile

CALIBRATIONS = load_all()
H100_PROFILES = sorted(n for n, p in PROFILES.items() if n.startswith("h100-") and p.name == n)
CASES = [(name, i) for name, cal in sorted(CALIBRATIONS.items()) for i in range(len(cal.points))]


def test_every_h100_profile_has_a_calibration_file_of_its_model() -> None:
    assert H100_PROFILES == sorted(
        [
            "h100-nvl-coder-8b",
            "h100-nvl-reasoning-32b",
            "h100-sxm-coder-8b",
            "h100-sxm-reasoning-32b",
        ]
    )
    assert sorted(CALIBRATIONS) == H100_PROFILES
    for name in H100_PROFILES:
        assert CALIBRATIONS[name].model == PROFILES[name].served_model_name
        assert name.split("-")[1].upper() in CALIBRATIONS[name].gpu  # NVL or SXM


@pytest.mark.parametrize(("name", "index"), CASES)
def test_profile_reproduces_its_point(name: str, index: int) -> None:
    point = CALIBRATIONS[name].points[index]
    predicted = predict(PROFILES[name], point)
    if point.engine_gap:
        # A known gap stays flagged only while it is real: unflag it once the engine fits it.
        assert abs(predicted / measured(point) - 1) > 0.10
        assert not point.derived
    else:
        assert predicted == pytest.approx(measured(point), rel=0.10)


def test_two_published_points_are_known_gaps_and_no_derived_point_is() -> None:
    published = [p for cal in CALIBRATIONS.values() for p in cal.points if not p.derived]
    assert len(published) >= 15
    gaps = [p for p in published if p.engine_gap]
    assert [
        (g.kind, getattr(g, "concurrency", None), getattr(g, "input_tokens", None)) for g in gaps
    ] == [("throughput", 16, 1024), ("throughput", 32, 1024)]
    assert not any(p.engine_gap for cal in CALIBRATIONS.values() for p in cal.points if p.derived)
    assert worst_error(rows(PROFILES, CALIBRATIONS)) <= 0.10


@pytest.mark.parametrize("name", H100_PROFILES)
def test_h100_profiles_overlap_reads_and_compute(name: str) -> None:
    profile = PROFILES[name]
    assert profile.step_model == "roofline"
    additive = dataclasses.replace(profile, step_model="additive")
    # Decode batches up to ~250 sequences are read-bound: batch-1 ITL is the additive one.
    for batch, context in [(1, 640), (16, 16 * 1088), (128, 128 * 640)]:
        assert profile.step_s(0, batch, context) == additive.step_s(0, batch, context)
    # A 1,024-token chunk is compute-bound: its step no longer pays the weight read on top.
    assert profile.step_s(1024, 0, 1024) == pytest.approx(profile.prefill_token_s * 1024)
    assert additive.step_s(1024, 0, 1024) - profile.step_s(1024, 0, 1024) > profile.base_s


@pytest.mark.parametrize("name", H100_PROFILES)
def test_batch1_decode_is_never_faster_than_reading_the_weights(name: str) -> None:
    profile, cal = PROFILES[name], CALIBRATIONS[name]
    contexts = [0] + [p.context_tokens for p in cal.points if isinstance(p, ItlBatch1)]
    for context in contexts:
        assert profile.step_s(0, 1, context) >= cal.weight_read_s()


@pytest.mark.parametrize("name", H100_PROFILES)
def test_prefill_runs_at_most_sixty_percent_of_peak(name: str) -> None:
    fraction = CALIBRATIONS[name].prefill_peak_fraction(PROFILES[name].prefill_token_s)
    assert 0.4 < fraction <= 0.60


@pytest.mark.parametrize("name", H100_PROFILES)
def test_kv_cache_is_the_memory_arithmetic_of_the_file(name: str) -> None:
    profile, cal = PROFILES[name], CALIBRATIONS[name]
    assert profile.kv_cache_tokens == cal.kv_cache_tokens()
    assert profile.block_size == cal.block_size
    assert profile.max_model_len <= profile.kv_cache_tokens


def test_sxm_reserve_reproduces_the_kv_the_published_run_logged() -> None:
    # The run behind the SXM points used --gpu-memory-utilization 0.9 and logged 377,024 tokens.
    cal = CALIBRATIONS["h100-sxm-coder-8b"]
    at_run = cal.model_copy(update={"gpu_memory_utilization": 0.9})
    assert at_run.kv_cache_tokens() == 377_024


def test_old_names_are_the_nvl_profiles() -> None:
    assert PROFILE_ALIASES == {
        "h100-coder-8b": "h100-nvl-coder-8b",
        "h100-reasoning-32b": "h100-nvl-reasoning-32b",
    }
    for alias, target in PROFILE_ALIASES.items():
        assert get_profile(alias) is PROFILES[target]


def test_markdown_table_has_a_row_per_point() -> None:
    small = {"h100-nvl-reasoning-32b": CALIBRATIONS["h100-nvl-reasoning-32b"]}
    table = markdown_table(rows(PROFILES, small))
    lines = table.splitlines()
    assert len(lines) == 2 + len(small["h100-nvl-reasoning-32b"].points)
    assert all(line.count("|") == 10 for line in lines)
    assert "(derived)" in lines[2] and "H100 NVL 94GB" in lines[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_bad_file_names_the_file_and_the_field(tmp_path: Path) -> None:
    good = (
        Path(__file__).resolve().parents[2] / "serving/emulator/calibration/h100-nvl-coder-8b.yaml"
    )
    text = good.read_text(encoding="utf-8")
    path = _write(tmp_path, text.replace("hbm_bandwidth_tb_s: 3.9", "hbm_bandwidth_tb_s: fast"))
    with pytest.raises(ValueError, match=r"bad\.yaml: hbm_bandwidth_tb_s"):
        load_calibration(path)
    path = _write(tmp_path, text.replace("itl_ms: 5.896", "itl_msec: 5.896"))
    with pytest.raises(ValueError, match=r"bad\.yaml: points\.0\.itl_batch1\.itl_ms"):
        load_calibration(path)
    path = _write(tmp_path, text.replace("kind: prefill", "kind: warmup"))
    with pytest.raises(ValueError, match=r"bad\.yaml: points\.1"):
        load_calibration(path)
    path = _write(tmp_path, "points: [")
    with pytest.raises(ValueError, match=r"cannot read calibration file .*bad\.yaml"):
        load_calibration(path)


def test_a_good_file_round_trips() -> None:
    cal = CALIBRATIONS["h100-sxm-coder-8b"]
    assert Calibration.model_validate(cal.model_dump()) == cal


RESULTS = Path(__file__).parents[2] / "bench" / "results"
# `python -m bench.gpu_check` results: file, the card's name, its nominal HBM bandwidth (TB/s).
GPU_CHECKS = {
    "gpu-check-h100-sxm.json": ("H100", 3.35),
    "gpu-check-h200.json": ("H200", 4.8),
}


@pytest.mark.parametrize("check_file", sorted(GPU_CHECKS))
@pytest.mark.parametrize("name", H100_PROFILES)
def test_batch1_decode_is_not_faster_than_the_measured_card(name: str, check_file: str) -> None:
    """`python -m bench.gpu_check` on real cards: a batch-1 GEMV chain over 16.4 GB of bf16
    weights reached 2.73 TB/s on an H100 SXM (81% of the nominal 3.35) and 3.74 TB/s on an
    H200 (78% of the nominal 4.8). No profile's batch-1 step may beat its weight bytes read at
    that fraction of its own card's nominal bandwidth."""
    import json

    card, nominal_tb_s = GPU_CHECKS[check_file]
    check = json.loads((RESULTS / check_file).read_text(encoding="utf-8"))
    assert card in check["device"]
    efficiency = check["bandwidth"]["gemv_batch1_tb_s"] / nominal_tb_s
    assert 0.6 < efficiency <= 1.0
    cal = CALIBRATIONS[name]
    floor = cal.weight_bytes / (cal.hbm_bandwidth_tb_s * efficiency * 1e12)
    assert PROFILES[name].step_s(0, 1, 0) >= floor


def test_a_prefill_point_adds_the_frontend_time_the_engine_does_not_model() -> None:
    point = next(p for p in CALIBRATIONS["h100-sxm-coder-8b"].points if isinstance(p, Prefill))
    assert point.frontend_ms > 0
    bare = point.model_copy(update={"frontend_ms": 0.0})
    profile = PROFILES["h100-sxm-coder-8b"]
    assert predict(profile, point) == pytest.approx(predict(profile, bare) + point.frontend_ms)
    with pytest.raises(ValueError, match="frontend_ms"):
        Prefill.model_validate(
            {"kind": "prefill", "input_tokens": 8, "ttft_ms": 1, "frontend_ms": -1}
        )
