"""Recipes from flags and TOML files: flags override only the settings they name."""

from __future__ import annotations

import pytest

from slimgraph.compiler.errors import CompressionOptionError
from slimgraph.compiler.recipe import recipe_from_flags


def write(tmp_path, text: str):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_flags_keep_the_files_other_settings(tmp_path):
    path = write(tmp_path, '[quantize]\nmethod = "awq"\nbits = 4\nawq_clip = false\ndamp = 0.05\n'
                           '[[rules]]\nmatch = "lm_head"\nquantize = false\n')
    recipe = recipe_from_flags(recipe_file=path, quantize="int3", method="awq", group_size=64)
    q = recipe.steps["quantize"]
    assert (q.bits, q.group_size, q.method) == (3, 64, "awq")        # from the flags
    assert q.awq_clip is False and q.damp == 0.05                     # from the file
    assert recipe.settings_for("quantize", "lm_head") is None


def test_flags_override_the_files_value(tmp_path):
    path = write(tmp_path, '[prune]\nmethod = "wanda"\nsparsity = 0.3\n[lowrank]\nmethod = "whiten"\nenergy = 0.9\n')
    recipe = recipe_from_flags(recipe_file=path, prune=0.6, prune_method="sparsegpt", lowrank=0.2,
                               lowrank_method="asvd")
    assert (recipe.steps["prune"].method, recipe.steps["prune"].sparsity) == ("sparsegpt", 0.6)
    low = recipe.steps["lowrank"]
    assert (low.method, low.ratio, low.energy) == ("asvd", 0.2, None)


def test_file_alone_is_kept(tmp_path):
    path = write(tmp_path, '[quantize]\nmethod = "gptq"\nbits = 8\ngroup_size = 0\nact_order = false\n')
    q = recipe_from_flags(recipe_file=path).steps["quantize"]
    assert (q.method, q.bits, q.group_size, q.act_order) == ("gptq", 8, None, False)


def test_merged_settings_are_still_checked(tmp_path):
    path = write(tmp_path, '[quantize]\nmethod = "awq"\nbits = 4\n')
    with pytest.raises(CompressionOptionError, match="--group-size"):
        recipe_from_flags(recipe_file=path, quantize="int4", group_size=4)


def test_energy_alone_and_rules_switching_ratio_to_energy(tmp_path):
    from slimgraph.compiler.recipe import recipe_from_toml

    path = write(tmp_path, '[lowrank]\nmethod = "whiten"\nratio = 0.3\n'
                           '[[rules]]\nmatch = "*.down_proj"\nlowrank = { energy = 0.95 }\n')
    recipe = recipe_from_toml(path)
    assert recipe.steps["lowrank"].ratio == 0.3
    down = recipe.settings_for("lowrank", "model.layers.0.mlp.down_proj")
    assert (down.method, down.ratio, down.energy) == ("whiten", None, 0.95)
    energy_only = recipe_from_toml(write(tmp_path, '[lowrank]\nenergy = 0.9\n')).steps["lowrank"]
    assert (energy_only.ratio, energy_only.energy) == (None, 0.9)
    with pytest.raises(CompressionOptionError, match="exactly one"):
        recipe_from_toml(write(tmp_path, '[lowrank]\nenergy = 0.9\nratio = 0.2\n'))


def test_zero_point_settings(tmp_path):
    """An unknown zero point is refused; a symmetric rule under a float-zero recipe has none to keep."""
    from slimgraph.compiler.recipe import QuantizeSettings
    from slimgraph.passes.quantize import _spec

    with pytest.raises(CompressionOptionError, match="zero_point must be one of"):
        QuantizeSettings(zero_point="half")
    assert _spec(QuantizeSettings(zero_point="float")).float_zero
    assert not _spec(QuantizeSettings(zero_point="float", symmetric=True)).float_zero
