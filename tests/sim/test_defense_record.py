"""The simulator states the devices' defense: its flags reach the federation's RoundConfig, a bad
one is refused before any work, and each split method's result carries a note saying it."""

from __future__ import annotations

import pytest

from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.sim.config import SimConfig
from sfprompt.sim.run_split import _result


def test_a_split_result_notes_the_defense_and_its_epsilon() -> None:
    rounds = RoundConfig(defense_clip=5.0, defense_noise=20.0, defense_grad_noise=16.0)
    notes = _result("sfprompt", 2, [], rounds, None).notes  # type: ignore[arg-type]
    (note,) = [n for n in notes if "defense" in n]
    assert "L2 norm 5" in note and "sigma 20" in note and "epsilon 0.484" in note
    assert "16 x" in note
    plain = _result("sfprompt", 2, [], RoundConfig(), None).notes  # type: ignore[arg-type]
    assert not [n for n in plain if "defense" in n]


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"defense_noise": 1.0}, "defense_noise"),  # no clip: sigma C has no C
        ({"defense_clip": -1.0}, "defense_clip"),
        ({"defense_grad_noise": float("nan")}, "defense_grad_noise"),
    ],
)
def test_a_bad_defense_is_refused_before_any_work(values: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SimConfig(**values)
