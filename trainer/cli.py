"""The `train` command: `train recipe=NAME [overrides]`, `train -m ...`, `train --list`, `train --help`.

Recipes are registered in Hydra's ConfigStore as the `recipe` group (package `_global_`) from the
YAML files shipped in `blocktrain.recipes` or from a user's own file, so the group resolves the same
way in every install mode. Help and listing import neither torch nor Lightning.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from blocktrain.trainer.errors import UserError

CONFIG_MODULE = "blocktrain.conf"
USAGE = """\
usage: train recipe=NAME [key=value ...]          run a recipe (Hydra overrides after it)
       train -m recipe=NAME key=a,b [...]          multirun sweep (one run and W&B run per point)
       train recipe=NAME --cfg job                 print the composed config
       train recipe=path/to/own.yaml               run your own recipe file
       train --list                                list recipes and plugins
       train --hydra-help                          Hydra's own help (config groups, flags)

common overrides: trainer=cpu|gpu|ddp|fsdp|debug  logger=wandb|csv|none  optim=adamw|sgd|adamw8bit|paged_adamw8bit
                  resume=auto  init_from=PATH  seed=N  run_dir=PATH  trainer.max_steps=N  plugin=[a,b]
"""


def _print_listing() -> None:
    from blocktrain.trainer.registry import available_plugins, builtin_recipes, recipe_description

    recipes = builtin_recipes()
    plugins = available_plugins()
    width = max(map(len, [*recipes, *plugins, "name"])) + 2
    print("Recipes (train recipe=NAME):")
    for name in sorted(recipes):
        print(f"  {name:<{width}}{recipe_description(recipes[name])}")
    print("\nPlugins (plugin=[NAME,...]):")
    for name, entry in sorted(plugins.items()):
        origin = "" if entry.origin == "built-in" else f"  [{entry.origin}]"
        print(f"  {name:<{width}}{entry.description}{origin}")


def _load_yaml(path: Path):
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and OmegaConf grammar errors
        raise UserError(f"malformed YAML in {path}:\n{exc}") from None
    if not isinstance(node, dict) and not hasattr(node, "keys"):
        raise UserError(f"{path} must hold a mapping of config keys, not {type(node).__name__}")
    return node


def register_recipes(args: list[str]) -> list[str]:
    """Store every built-in recipe, and any recipe file named in ``args``, in Hydra's ConfigStore.

    Returns ``args`` with file-valued ``recipe=`` overrides rewritten to their registered names.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from blocktrain.trainer.registry import builtin_recipes, resolve_recipe
    from blocktrain.trainer.resolvers import register_resolvers

    register_resolvers()
    store = ConfigStore.instance()

    def register(name: str, path: Path) -> None:
        node = _load_yaml(path)
        if "name" not in node:
            node = OmegaConf.merge({"name": name}, node)
        store.store(group="recipe", name=name, node=node, package="_global_")

    for name, path in builtin_recipes().items():
        register(name, path)
    rewritten = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "recipe" and value:
            names = []
            for choice in value.split(","):  # multirun: recipe=a,b
                name, path = resolve_recipe(choice)
                register(name, path)
                names.append(name)
            arg = f"{key}={','.join(names)}"
        rewritten.append(arg)
    _register_third_party_plugin_configs(store)
    return rewritten


def _register_third_party_plugin_configs(store) -> None:
    """Entry-point plugins ship no YAML in our tree: their config dataclass becomes `plugin/NAME`."""
    from omegaconf import OmegaConf

    from blocktrain.trainer.registry import available_plugins, load_plugin_class
    from blocktrain.trainer.validation import PLUGIN_MARKER

    for name, entry in available_plugins().items():
        if entry.origin != "built-in":
            defaults = OmegaConf.to_container(OmegaConf.structured(load_plugin_class(name).config_class))
            store.store(group="plugin", name=name, node={PLUGIN_MARKER: name, **defaults}, package=f"plugin.{name}")


def compose_config(overrides: list[str]):
    """The run config `train OVERRIDES` composes (recipes must be registered); for notebooks and tests."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from blocktrain.trainer.validation import explain_composition_error

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        try:
            return compose(config_name="config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as exc:
            raise UserError(explain_composition_error(exc, overrides)) from None


def load_config(args: list[str]):
    """Register the recipes named in ``args`` and compose: ``run(load_config(["recipe=X", ...]))``."""
    return compose_config(register_recipes(list(args)))


def _hydra_entry(original_argv: list[str]):
    import hydra

    @hydra.main(version_base="1.3", config_path="pkg://" + CONFIG_MODULE, config_name="config")
    def task(cfg):
        sys.argv = original_argv  # Lightning's DDP launcher re-runs this command line in each process
        try:
            from blocktrain.trainer.run import run

            return run(cfg)
        except UserError as exc:
            _fail(exc)

    return task


def _check_before_hydra(args: list[str]) -> None:
    """A run, and ``--cfg`` (printing the config), are validated here, before Hydra or torch start; ``--cfg``
    lets values left for the user (``???``) through and checks no paths. Other Hydra flags pass unchecked."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main uses: flags and overrides alike

    from blocktrain.trainer.validation import check_local_paths, validate_config

    parsed = get_args_parser().parse_args(args)
    showing = parsed.cfg is not None
    if parsed.multirun or (not showing and any(a.startswith("-") for a in args)):
        return
    cfg = compose_config(parsed.overrides)
    validate_config(cfg, allow_missing=showing)
    if not showing:
        check_local_paths(cfg)


def _fail(exc: UserError) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if args[0] in ("--list", "list"):
        _print_listing()
        return
    if args[0] == "--hydra-help":
        args[0] = "--help"
    original_argv = [sys.argv[0], *args]
    try:
        args = register_recipes(args)
        _check_before_hydra(args)
    except UserError as exc:
        _fail(exc)
    sys.argv = [sys.argv[0], *args]
    _hydra_entry(original_argv)()


if __name__ == "__main__":
    main()
