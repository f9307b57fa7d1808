"""The ursa-8b / ursa-rm-8b presets, built on the meta device, have exactly the released tensors."""
from pathlib import Path

import pytest
import torch

from ursa.config import get_config
from ursa.model import URSAModel

FIX = Path(__file__).parent / "fixtures"


def _manifest(name):
    rows = [l.split("\t") for l in (FIX / name).read_text().splitlines() if l.strip()]
    return {n: tuple(int(x) for x in s.split("x")) for n, s, _ in rows}, sum(int(c) for _, _, c in rows)


@pytest.mark.parametrize("preset,fixture,total", [("ursa-8b", "ursa8b_weights.tsv", 8_044_783_361),
                                                  ("ursa-rm-8b", "ursa_rm8b_weights.tsv", 8_044_786_946)])
def test_released_manifest(preset, fixture, total):
    with torch.device("meta"):
        model = URSAModel(get_config(preset))
    got = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    want, want_total = _manifest(fixture)
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {n: s for n, s in got.items() if want[n] != s} == {}
    assert sum(t.numel() for t in model.state_dict().values()) == want_total == total
    lm = sum(t.numel() for n, t in model.state_dict().items() if n.startswith("language_model."))
    assert lm == 7_615_616_512
