"""The layer-group rule of DESIGN §4, table-driven; groups always cover every layer exactly once."""

from __future__ import annotations

import pytest

from transfer.planner import PipelineSettings, num_groups, plan_layer_groups

DEFAULT = PipelineSettings()


@pytest.mark.parametrize(
    ("avg_tokens", "expected_n"),
    [
        (1024, 10),  # at min_tokens: max_iters
        (1536, 8),  # t = 0.25 -> 8.5, rounded half to even
        (2048, 7),  # t = 0.5 -> 7
        (3072, 4),  # saturation: min_iters
        (100_000, 4),  # beyond saturation: still min_iters
    ],
)
def test_group_count_follows_the_formula(avg_tokens, expected_n):
    assert num_groups(avg_tokens, DEFAULT) == expected_n


@pytest.mark.parametrize(
    ("layers", "avg_tokens", "settings", "expected"),
    [
        # ineligible: short prompts, shallow models, disabled -> one group (the whole forward)
        (24, 256, DEFAULT, [(0, 24)]),
        (24, 1023, DEFAULT, [(0, 24)]),
        (4, 5000, DEFAULT, [(0, 4)]),
        (24, 5000, PipelineSettings(enabled=False), [(0, 24)]),
        # eligible: N = 10 at 1024 tokens -> group size 24 // 10 = 2
        (24, 1024, DEFAULT, [(i, i + 2) for i in range(0, 24, 2)]),
        # saturated: N = 4 -> group size 6
        (24, 4096, DEFAULT, [(0, 6), (6, 12), (12, 18), (18, 24)]),
        # uneven: 32 layers, N = 10 -> size 3, last group short
        (32, 1024, DEFAULT, [(i, min(i + 3, 32)) for i in range(0, 32, 3)]),
        # more groups than layers -> one layer per group
        (6, 1024, DEFAULT, [(i, i + 1) for i in range(6)]),
        # fixed group size overrides the adaptive rule
        (24, 4096, PipelineSettings(group_size=5), [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]),
    ],
)
def test_plan(layers, avg_tokens, settings, expected):
    groups = plan_layer_groups(layers, avg_tokens, settings)
    assert groups == expected
    covered = [layer for a, b in groups for layer in range(a, b)]
    assert covered == list(range(layers))


@pytest.mark.parametrize("layers", [5, 6, 24, 32, 80])
@pytest.mark.parametrize("avg_tokens", [0, 1024, 1500, 2500, 9000])
def test_groups_cover_every_layer_once(layers, avg_tokens):
    groups = plan_layer_groups(layers, avg_tokens, DEFAULT)
    assert [x for a, b in groups for x in range(a, b)] == list(range(layers))
    assert all(a < b for a, b in groups)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (PipelineSettings(min_iters=5, max_iters=4), r"min_iters \(5\) must not exceed max_iters \(4\)"),
        (PipelineSettings(min_tokens=0), "min_tokens"),
        (PipelineSettings(min_iters=0), "min_iters"),
        (PipelineSettings(sat_multiplier=1.0), "sat_multiplier"),
        (PipelineSettings(group_size=0), "group_size"),
    ],
)
def test_invalid_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        settings.validate()
