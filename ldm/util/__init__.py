"""Small helpers shared across the package, one module per idea:

    images       tensors as PIL images; labelled image grids (`to_pil`, `image_grid`, `wrap_label`)
    numbered     numbered files that never replace one (`next_number`, `save_numbered`)
    targets      what a config's `target` may name (`resolve_target`, `any_target_allowed`, `get_obj_from_str`)
    instantiate  the CompVis config convention (`instantiate_from_config`, `check_target_config`, `check_keys`,
                 `check_ranges`, `nearest`, `load_model_from_config`, `count_params`)
    logs         the scripts' log format (`setup_logging`)
    imports      optional packages (`optional_import`)
    devices      the device and the CPU threads (`pick_device`, `use_idle_cores`)
    defaults     the CompVis one-liners `exists` and `default`

The project imports each helper from its module. This package re-exports them all, so that `from ldm.util import
instantiate_from_config` (CompVis code, the user's scripts, configs naming `ldm.util.X`) keeps working; it defines
nothing itself. `parse_yaml_value` moved to `ldm.checks` (beside `yaml_number`) and is re-exported here too.
"""
from ldm.checks import ConfigError, parse_yaml_value
from ldm.util.defaults import default, exists
from ldm.util.devices import THREAD_VARS, pick_device, use_idle_cores
from ldm.util.images import MIN_LABELLED_TILE, draw_words, image_grid, text_length, to_pil, word_gap, wrap_label
from ldm.util.imports import optional_import
from ldm.util.instantiate import (accepted_keys, check_keys, check_ranges, check_target_config, count_params,
                                  instantiate_from_config, load_model_from_config, nearest)
from ldm.util.logs import setup_logging
from ldm.util.numbered import next_number, save_numbered
from ldm.util.targets import (ALLOW_FLAG, SAFE_TARGET_PREFIXES, any_target_allowed, get_obj_from_str,
                              resolve_target)

__all__ = ["ALLOW_FLAG", "ConfigError", "MIN_LABELLED_TILE", "SAFE_TARGET_PREFIXES", "THREAD_VARS", "accepted_keys",
           "any_target_allowed", "check_keys", "check_ranges", "check_target_config", "count_params", "default",
           "draw_words", "exists", "get_obj_from_str", "image_grid", "instantiate_from_config",
           "load_model_from_config", "nearest", "next_number", "optional_import", "parse_yaml_value", "pick_device",
           "resolve_target", "save_numbered", "setup_logging", "text_length", "to_pil", "use_idle_cores", "word_gap",
           "wrap_label"]
