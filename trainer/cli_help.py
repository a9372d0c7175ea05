"""`python -m trainer --help`: Hydra's app help, from its own help template (the config groups with their
options, then the config the command line composes), printed without Hydra's listing of the groups.

Hydra lists them by deep-copying its whole ConfigStore (every stored schema) twice per group, about a hundred
copies: 1.1 of the 1.5 s `--help` took. Listed here from the same two sources (conf/, the ConfigStore), the
groups show their options but not the base_* schemas stored beside them. A command line this would not answer
as Hydra does (other flags, other configs, a help template naming Hydra's flags or groups) is left to Hydra.
"""
from __future__ import annotations

import string
from typing import Optional, Sequence

FLAGS = {"--help", "-h", "--multirun", "-m"}  # what --help may come with here (Hydra ignores --multirun then)


def help_text(args: Sequence[str]) -> Optional[str]:
    """What Hydra's `--help` prints for `args` (the command line), or None when `args` asks no help or asks it
    in a way left to Hydra."""
    from omegaconf import OmegaConf, open_dict

    from trainer.hydra_flags import other_configs
    from trainer.groups import config_groups, group_options
    from trainer.assemble import compose

    flags = [a for a in args if a.startswith("-")]
    if not {"--help", "-h"} & set(flags) or not set(flags) <= FLAGS or other_configs(args):
        return None
    if any("=" not in a for a in args if a not in flags):
        return None
    try:
        cfg = compose([a for a in args if a not in flags], with_hydra=True)
        template = cfg.hydra.help.template
    except Exception:  # noqa: BLE001 - what does not compose: Hydra's own message says it
        return None
    if "$FLAGS_HELP" in template or "$HYDRA_CONFIG_GROUPS" in template:
        return None
    listed = "".join(f"{group}: {', '.join(o for o in group_options(group) if not o.startswith('base_'))}\n"
                     for group in config_groups())
    with open_dict(cfg):
        del cfg["hydra"]
    return string.Template(template).substitute(APP_CONFIG_GROUPS=listed, CONFIG=OmegaConf.to_yaml(cfg))
