"""The adapter design space (Xiang et al. 2023, "A Closer Look at Parameter-Efficient Tuning in Diffusion Models",
arXiv 2303.18181), plus LoRA, LoCon, LoHa, LoKr, DoRA and (IA)^3: one package, each idea in one module, imports
running down this list.

    positions.py   the named points of the blocks, valid din -> dout pairs, the config sections
    spec.py        AdapterSpec (one validated entry), the errors
    options.py     typed options: each form's fields as a dataclass (defaults, ranges, help)
    base.py        what every form answers for itself (AdapterForm, ProjectionForm, Update)
    bottleneck.py  the paper's `inout` forms for transformer blocks and ResBlocks
    lora.py        LoRA and LoCon (LoRA on convolutions) and their plain-tensor update LoRAFactors
    loha.py        LoHa and HadaFactors
    lokr.py        LoKr and KronFactors
    dora.py        DoRA and DoRAFactors
    ia3.py         (IA)^3 and IA3Vector
    schema.py      FORMS (the registry: one line per form), parsing `adapter_config` into specs, the options' help
    rows.py        groups that act on some rows of a batch (several runs in one batch)
    attach.py      injection into a network, freezing, enable / scale / remove / mount, parameters
    budget.py      sizes for a parameter budget (sweeps), the paper's sizes
    sources.py     which files are read and what their configs say about strength (peft configs, metadata)
    files.py       kohya / A1111 / ComfyUI / LyCORIS, diffusers and peft files and folders
    io.py          adapter directories (ours and the paper code's), and loading any of the above
    merge.py       folding into the base weights; LoRA + LoRA (cloneofsimo's modes)

The networks (`UNetModel`, `FrozenCLIPEmbedder`) call `inject_adapters` for their `adapter_config`; this package never
imports a network: blocks expose `ADAPTER_KIND`, `adapter_widths()` and call `taps(name, t)`, networks `ADAPTER_ROLE`.
"""
from ldm.modules.adapters.attach import (AdapterGroup, adapter_blocks, adapter_carriers, adapter_groups,
                                         adapter_networks, adapter_parameters, adapter_state_dict, adapters_enable,
                                         build_adapter, freeze_except_adapters, group_adapters, inject_adapters,
                                         is_added_key, match_targets, mount_group, network, planned_parameter_count,
                                         remove_adapters, restored_on_error, set_adapter_scale)
from ldm.modules.adapters.base import AdapterForm, ProjectionForm, ProjectionOptions, Update, is_projection
from ldm.modules.adapters.bottleneck import METHODS, InOutAdapter, ResInOutAdapter
from ldm.modules.adapters.budget import (PAPER_RESBLOCK_PARAMETERS, PAPER_TRANSFORMER_MID_DIM, fit_budget,
                                         paper_mid_dim, with_size)
from ldm.modules.adapters.dora import DoRA, DoRAFactors
from ldm.modules.adapters.loha import HadaFactors, LoHa
from ldm.modules.adapters.lokr import KronFactors, LoKr
from ldm.modules.adapters.options import Options
from ldm.modules.adapters.folders import save_peft_folder
from ldm.modules.adapters.files import (FORMATS, external_names, kohya_name, load_lora_file, lora_state_dict,
                                        projection_updates, read_lora_state_dict, save_lora_file)
from ldm.modules.adapters.ia3 import IA3, IA3Vector
from ldm.modules.adapters.io import CONFIG_FILE, SECTION, WEIGHTS_FILE, load_adapter_from_dir, save_adapter_to_dir
from ldm.modules.adapters.lora import LoCon, LoRA, LoRAFactors, mix_factors, stack_factors
from ldm.modules.adapters.merge import (MODES, check_merge_output, combine_loras, combine_updates, merge_adapters,
                                        merge_into_checkpoint, save_base_checkpoint)
from ldm.modules.adapters.rows import Rows
from ldm.modules.adapters.positions import (POSITIONS, PROJECTION, SECTION_OF, SECTIONS, STREAM, block_kind,
                                            is_valid_pair, section_value, valid_pairs)
from ldm.modules.adapters.schema import (FORMS, KIND_FIELDS, config_from_specs, form_fields, form_of, forms,
                                         options_help, parse_adapter_config)
from ldm.modules.adapters.spec import (DEFAULT_GROUP, INITS, AdapterConfigError, AdapterDirError, AdapterSpec,
                                       describe)

__all__ = [
    "CONFIG_FILE", "DEFAULT_GROUP", "FORMATS", "FORMS", "IA3", "INITS", "KIND_FIELDS", "METHODS", "MODES",
    "PAPER_RESBLOCK_PARAMETERS", "PAPER_TRANSFORMER_MID_DIM", "POSITIONS", "PROJECTION", "SECTION", "SECTIONS",
    "SECTION_OF", "STREAM", "WEIGHTS_FILE", "AdapterConfigError", "AdapterDirError", "AdapterForm", "AdapterGroup", "AdapterSpec",
    "DoRA", "DoRAFactors", "HadaFactors", "IA3Vector", "InOutAdapter", "KronFactors", "LoCon", "LoHa", "LoKr",
    "LoRA", "LoRAFactors", "Options", "Rows", "ProjectionForm", "ProjectionOptions", "ResInOutAdapter", "Update",
    "adapter_blocks", "adapter_carriers", "adapter_groups", "adapter_networks", "adapter_parameters",
    "adapter_state_dict", "adapters_enable", "block_kind", "build_adapter", "check_merge_output", "combine_loras",
    "combine_updates", "config_from_specs", "describe", "external_names", "fit_budget", "form_fields", "form_of",
    "forms", "freeze_except_adapters", "group_adapters", "inject_adapters", "is_added_key", "is_projection",
    "is_valid_pair", "kohya_name", "load_adapter_from_dir", "load_lora_file", "lora_state_dict", "match_targets",
    "merge_adapters", "merge_into_checkpoint", "mix_factors", "mount_group", "network", "options_help", "paper_mid_dim",
    "parse_adapter_config", "planned_parameter_count", "projection_updates", "read_lora_state_dict",
    "remove_adapters", "restored_on_error", "save_adapter_to_dir", "save_base_checkpoint", "save_lora_file",
    "save_peft_folder", "section_value", "set_adapter_scale", "stack_factors", "valid_pairs", "with_size",
]
