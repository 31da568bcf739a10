"""The README documents what the code offers: every trainer flag, every objective, every scorer."""

from pathlib import Path

from rpo_fast.config import TrainConfig
from rpo_fast.objectives import OBJECTIVES
from rpo_fast.scorers import SCORERS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_objectives_and_scorers_are_documented():
    for name in OBJECTIVES:
        assert f"| `{name}` |" in README, name
    for name in SCORERS:
        assert f"`{name}" in README, name
    assert "PLACEHOLDER" not in README


def test_the_flag_table_is_the_generated_one():
    from rpo_fast.cli import flag_table

    assert flag_table(TrainConfig) in README


def test_the_metrics_key_table_is_the_generated_one():
    from rpo_fast.metrics import key_table

    assert "\n".join("  " + line for line in key_table().splitlines()) in README
