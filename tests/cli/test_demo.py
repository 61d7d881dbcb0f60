"""``asymflow demo``: the Delta demo, here ``--quick`` on small synthetic data."""

from __future__ import annotations

from pathlib import Path

from asymflow.report import demo_configs
from tests.cli.helpers import assert_clean_error, invoke


def test_quick_demo_trains_every_variant_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = invoke(["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.md'}" in result.stdout
    report = (out / "report.md").read_text()
    for name, config in demo_configs(quick=True).items():
        assert (out / name / "result.json").is_file(), name
        assert (out / name / "ledger.sqlite").is_file(), name
        assert name in result.stdout  # one row of the final table per run
        assert f"| {name} | {config.variant} |" in report
    # The same directory with the full settings is refused before any training.
    assert_clean_error(invoke(["demo", "--out", str(out)]), "--out")


def test_demo_out_must_be_a_directory(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("")
    assert_clean_error(invoke(["demo", "--quick", "--out", str(file)]), "--out must be a directory")
