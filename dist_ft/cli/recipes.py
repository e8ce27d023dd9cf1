"""``dist-ft recipes``: list, copy and show the recipes, sweeps and launch configs that ship
with dist-ft (the repo's ``configs/``, ``configs/sweeps/``, ``launch/``)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from dist_ft import exitcodes
from dist_ft.config import ConfigError, Recipe, load_recipe, recipe_to_dict
from dist_ft.config.load import read_text_file
from dist_ft.config.schema import backend_label
from dist_ft.config.shipped import (
    KIND_TITLES,
    KINDS,
    ShippedFile,
    find_shipped,
    resolve_recipe,
    shipped_files,
    unknown_name,
)

EXAMPLES = """\
examples:
  dist-ft recipes list                                   # recipes, sweeps, launch configs
  dist-ft recipes copy chestxray14_smoke my_recipe.yaml  # a copy to edit
  dist-ft recipes show chestxray14_smoke                 # the file as it ships
  dist-ft recipes show chestxray14_smoke --resolved trainer.epochs=2   # every default filled in
  dist-ft train chestxray14_smoke                        # every command takes a shipped name

A path that exists wins over a shipped name of the same spelling.
"""

NEXT_STEP = {  # after a copy: how the copied file is used
    "recipe": "dist-ft plan {dest}",
    "sweep": "dist-ft submit RECIPE --sweep {dest}",
    "launch": "accelerate launch --config_file {dest} -m dist_ft train RECIPE",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``recipes`` and its actions ``list``, ``copy``, ``show``, ``keys``."""
    p = sub.add_parser(
        "recipes", help="list, copy and show the shipped recipes, sweeps and launch configs",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The recipes, sweeps and accelerate launch configs installed with dist-ft. "
        "Every command that takes a recipe (plan, train, submit, eval --config, ...) also "
        "takes a shipped recipe's name.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    ls = actions.add_parser("list", help="the shipped recipes (name, model, backend, purpose), "
                            "sweeps and launch configs")
    ls.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
    ls.set_defaults(run=run_list)

    cp = actions.add_parser("copy", help="copy a shipped recipe, sweep or launch config to edit")
    cp.add_argument("name", metavar="NAME",
                    help="a shipped recipe, sweep or launch config (see `dist-ft recipes list`)")
    cp.add_argument("dest", nargs="?", type=Path, metavar="DEST",
                    help="file to write, or an existing folder to write NAME.yaml into "
                    "(default: ./NAME.yaml)")
    cp.add_argument("--force", action="store_true",
                    help="overwrite DEST if it exists (default: refuse)")
    cp.set_defaults(run=run_copy)

    show = actions.add_parser(
        "show", help="print a recipe as it is, or resolved with every default filled in",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  dist-ft recipes show chestxray14_smoke\n"
        "  dist-ft recipes show my_recipe.yaml --resolved optim.lr=3e-4 > resolved.yaml\n"
        "  dist-ft recipes show cpu_2proc          # a launch config (or sweep) as it ships")
    show.add_argument("config", metavar="RECIPE",
                      help="recipe file or shipped name (a shipped sweep's or launch config's "
                      "name prints that file)")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="overrides, e.g. optim.lr=3e-4 (they imply --resolved)")
    show.add_argument("--resolved", action="store_true",
                      help="print the validated recipe, every default filled in and paths made "
                      "absolute, as YAML that any command reads back")
    show.set_defaults(run=run_show)

    keys = actions.add_parser(
        "keys", help="every recipe key: type, default, allowed values, meaning",
        description="The recipe keys, generated from the schema (the same as "
        "docs/config-reference.md); a PREFIX narrows the list to a section or a key.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  dist-ft recipes keys                  # all of them\n"
        "  dist-ft recipes keys optim            # optim.lr, optim.groups[].match[], ...\n"
        "  dist-ft recipes keys trainer.monitor  # one key")
    keys.add_argument("prefix", nargs="?", metavar="PREFIX",
                      help="a section or key, e.g. optim, plan.stages, trainer.monitor "
                      "(default: every key)")
    keys.set_defaults(run=run_keys)




def _recipe_row(item: ShippedFile) -> dict[str, Any]:
    row: dict[str, Any] = {"name": item.name, "path": str(item.path)}
    try:
        recipe = load_recipe(item.path)
    except ConfigError as exc:  # listed all the same, so that a broken one can be found
        return {**row, "model": "?", "backend": "?", "purpose": item.purpose,
                "error": str(exc)}
    trainer = recipe.trainer
    return {**row, "model": recipe.model.name,
            "backend": backend_label(trainer.backend, trainer.zero_stage),
            "purpose": item.purpose}


def _sweep_row(item: ShippedFile) -> dict[str, Any]:
    from dist_ft.launch.sweep import load_sweep

    row: dict[str, Any] = {"name": item.name, "path": str(item.path), "purpose": item.purpose}
    try:
        return {**row, "tasks": len(load_sweep(item.path).tasks)}
    except ConfigError as exc:
        return {**row, "tasks": None, "error": str(exc)}


def _launch_row(item: ShippedFile) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(item.path.read_text(encoding="utf-8")) or {}
    kind = str(data.get("distributed_type", "?"))
    backend = "the recipe's"  # DDP or DeepSpeed: plain launchers leave it to the recipe
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        offload = ds.get("offload_param_device") or "none"
        backend = f"DeepSpeed ZeRO-{ds.get('zero_stage', '?')}" + (
            f", offload to {offload}" if offload != "none" else "")
    elif kind == "FSDP":  # the recipe must say trainer.backend: fsdp (checked at start-up)
        backend = backend_label("fsdp")
    return {"name": item.name, "path": str(item.path), "backend": backend,
            "distributed_type": kind,
            "processes": data.get("num_processes", 1), "machines": data.get("num_machines", 1),
            "purpose": item.purpose}


def listing() -> dict[str, list[dict[str, Any]]]:
    """Every shipped file with what ``recipes list`` shows of it, by kind."""
    return {
        "recipes": [_recipe_row(f) for f in shipped_files(("recipe",))],
        "sweeps": [_sweep_row(f) for f in shipped_files(("sweep",))],
        "launch_configs": [_launch_row(f) for f in shipped_files(("launch",))],
    }


def _table(title: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> list[str]:
    """A plain text table: aligned columns, the last one (purpose) never wrapped or cut."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title]
    for values in [[c.upper() for c in columns], *cells]:
        padded = (v.ljust(w) for v, w in zip(values, widths, strict=True))
        lines.append(("  " + "  ".join(padded)).rstrip())
    return lines


def run_list(args: argparse.Namespace) -> int:
    """``recipes list``: plain tables on stdout (one line per file), or one JSON document."""
    doc = listing()
    if args.json:
        from dist_ft.jsonio import dumps

        print(dumps(doc))
        return 0
    for row in doc["recipes"] + doc["sweeps"]:
        if "error" in row:  # a broken file says so where its purpose would be
            row["purpose"] = "INVALID: " + row["error"].replace("\n", " ")
    for row in doc["launch_configs"]:
        if row["machines"] != 1:
            row["processes"] = f"{row['processes']} on {row['machines']} machines"
    sections = [
        ("recipes (dist-ft plan|train|submit NAME):", ("name", "model", "backend", "purpose"),
         doc["recipes"]),
        ("sweeps (dist-ft submit RECIPE --sweep NAME):", ("name", "tasks", "purpose"),
         doc["sweeps"]),
        ("launch configs (accelerate launch --config_file FILE, after dist-ft recipes copy "
         "NAME FILE):", ("name", "backend", "processes", "purpose"), doc["launch_configs"]),
    ]
    lines: list[str] = []
    for title, columns, rows in sections:
        lines += [*_table(title, columns, rows), ""]
    lines.append("copy one to edit: dist-ft recipes copy NAME [DEST]; "
                 "see one resolved: dist-ft recipes show NAME --resolved")
    print("\n".join(lines))
    return 0


def run_copy(args: argparse.Namespace) -> int:
    """``recipes copy``: write a shipped file to DEST; never overwrite without ``--force``."""
    def refuse(message: str) -> int:
        print(f"dist-ft recipes copy: error: {message}", file=sys.stderr)
        return exitcodes.USAGE

    found = find_shipped(args.name)
    if found is None:
        problem = unknown_name(args.name, KINDS, "recipe, sweep or launch config").problems[0]
        return refuse(f"{args.name!r}: {problem}")
    dest: Path = args.dest if args.dest is not None else Path(found.path.name)
    dest = dest.expanduser()
    if dest.is_dir():
        dest = dest / found.path.name
    if dest.exists():
        if not args.force:
            return refuse(f"{dest} exists; pass --force to overwrite it, or give another DEST")
        if dest.resolve() == found.path.resolve():
            return refuse(f"{dest} is the shipped file itself; give another DEST")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found.path, dest)  # contents only: the copy is the user's, writable
    where = dest.absolute()
    print(f"wrote {where} (a copy of the shipped {KIND_TITLES[found.kind]} {found.name}); "
          f"edit it, then: {NEXT_STEP[found.kind].format(dest=dest)}")
    return 0


def resolved_yaml(recipe: Recipe, header: str = "") -> str:
    """``recipe`` as YAML with every key, for :func:`dist_ft.config.load_recipe` to read back."""
    import yaml

    body = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True,
                          width=100)
    return header + body


def run_show(args: argparse.Namespace) -> int:
    """``recipes show``: the file as it is, or the validated recipe with defaults filled in."""
    if not args.resolved and not args.overrides:
        given = Path(args.config).expanduser()
        found = None if given.exists() else find_shipped(args.config)
        path = found.path if found is not None else resolve_recipe(args.config)
        sys.stdout.write(read_text_file(path, "recipe"))
        return 0
    path = resolve_recipe(args.config)
    recipe = load_recipe(path, args.overrides)
    header = (f"# {path.stem}, resolved: every default filled in, paths absolute.\n# From {path}"
              + (f" with {' '.join(args.overrides)}" if args.overrides else "") + "\n")
    sys.stdout.write(resolved_yaml(recipe, header))
    return 0


def run_keys(args: argparse.Namespace) -> int:
    """``recipes keys``: the key reference, all of it or under a prefix."""
    from dist_ft.config.reference import format_keys

    try:
        text = format_keys(args.prefix)
    except ConfigError as exc:  # an unknown prefix: its one line names close keys
        print(f"dist-ft recipes keys: {exc.problems[0]}", file=sys.stderr)
        return exitcodes.USAGE
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
