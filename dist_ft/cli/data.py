"""``dist-ft data``: dataset statistics, the preprocessed cache, the synthetic twin."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dist_ft.config.errors import ConfigError
from dist_ft.config.schema import DataConfig, SplitFilesConfig

EXAMPLES = """\
examples:
  dist-ft data synth data/cxr14_synth --images 600 --size 256 --seed 0
  dist-ft data stats data/cxr14_synth
  dist-ft data stats /datasets/chestxray14 --json | jq .splits
  dist-ft data stats data/my_images --check-images --workers 8   # ImageFolder: train/ val/ test/
  dist-ft data stats data/labels.csv --data csv.label_column=labels --data csv.patient_column=pid
  dist-ft data prepare /datasets/chestxray14 --out /scratch/cxr14_256 --size 256 --workers 16
  dist-ft data prepare data/my_images --out /scratch/my_images_256 --size 256  # ImageFolder
  dist-ft data prepare data/labels.csv --out /scratch/labels_256 \
      --data csv.label_column=labels --data csv.patient_column=pid
  # splits from your own list files (the recipe's data.split_files must name the same files)
  dist-ft data stats /datasets/chestxray14 --split-file train_val=lists/trainval.txt \\
      --split-file test=lists/test.txt
  dist-ft data prepare /datasets/chestxray14 --out /scratch/cxr14_256 \\
      --split-file train=lists/train.txt --split-file val=lists/val.txt \\
      --split-file test=lists/test.txt
"""

SPLIT_ROLES = tuple(SplitFilesConfig.model_fields)  # train_val, train, val, test
STATS_FORMATS = typing.get_args(DataConfig.model_fields["format"].annotation)  # data.format


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``data`` and its subcommands."""
    p = sub.add_parser(
        "data", help="dataset statistics, preprocessed cache, synthetic ChestX-ray14",
        description="Work with datasets: ChestX-ray14 folders, ImageFolder trees, CSV files.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def split_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of train_val carved out as val, by patient (unused with "
                       "--split-file train= and val=)")
        q.add_argument("--test-fraction", type=float, default=0.2,
                       help="used only without a test list (test_list.txt or --split-file "
                       "test=)")
        q.add_argument("--split-seed", type=int, default=0,
                       help="seed of the by-patient val (and test) draw")
        q.add_argument(
            "--split-file", action="append", metavar="ROLE=PATH", dest="split_file",
            help="an image list file (one image id per line) defining a split, as "
            f"data.split_files.ROLE in a recipe; ROLE is one of {', '.join(SPLIT_ROLES)}. "
            "Repeat it: train_val=A test=B, test=B alone (every other image is train/val), "
            "or train=A val=B [test=C]; other images are left out. Replaces the list files "
            "in ROOT. A cache prepared with split files serves only recipes whose "
            "data.split_files name the same files with the same content")

    stats = verbs.add_parser("stats", help="counts per class and split, missing and bad images",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    stats.add_argument("root", help="a ChestX-ray14 folder (Data_Entry_2017*.csv[.gz]; images "
                       "may be absent), an ImageFolder tree (train/, val/, test/) or a CSV file")
    stats.add_argument("--json", action="store_true", help="one JSON document on stdout")
    stats.add_argument("--format", default="auto", choices=("auto", *STATS_FORMATS),
                       help="the recipe's data.format; auto tells ChestX-ray14, ImageFolder and "
                       "CSV apart by the layout")
    stats.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                       help="a recipe data.* setting for formats other than ChestX-ray14, e.g. "
                       "--data csv.label_column=labels --data root=/images (repeat it)")
    stats.add_argument("--check-images", action="store_true",
                       help="decode every image found, as training does, to find bad ones")
    stats.add_argument("--workers", type=int, default=1,
                       help="decoding processes for --check-images")
    split_args(stats)
    stats.set_defaults(run=run_stats)

    prep = verbs.add_parser("prepare", help="decode once into memory-mapped uint8 shards",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_argument("root", help="a ChestX-ray14 folder (metadata CSV and images), an "
                      "ImageFolder tree (train/, val/, test/) or a CSV file; train on the "
                      "cache with data.cache: OUT in a recipe of the same data.format")
    prep.add_argument("--format", default="auto",
                      choices=("auto", "chestxray14", "imagefolder", "csv"),
                      help="the recipe's data.format; auto tells them apart by the layout")
    prep.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                      help="a recipe data.* setting for ImageFolder and CSV, as the recipe "
                      "that trains on the cache has it, e.g. --data csv.label_column=labels "
                      "--data root=/images (repeat it)")
    prep.add_argument("--out", required=True, help="cache folder (resumes if interrupted)")
    prep.add_argument("--size", type=int, default=256, help="side of the stored images")
    prep.add_argument("--workers", type=int, default=1, help="decoding processes")
    prep.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    prep.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                      help="stop at an unreadable image (naming it), or skip it and list "
                      "it in the manifest")
    prep.add_argument("--rebuild", action="store_true",
                      help="replace a cache of other data or settings at --out (else refused)")
    split_args(prep)
    prep.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    prep.set_defaults(run=run_prepare)

    synth = verbs.add_parser("synth", help="write a synthetic ChestX-ray14 twin",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("out", help="folder to write (created)")
    synth.add_argument("--images", type=int, default=600, help="number of images")
    synth.add_argument("--size", type=int, default=256, help="side of the square PNGs")
    synth.add_argument("--seed", type=int, default=0, help="everything drawn depends on it")
    synth.add_argument("--dialect", choices=("2017", "2020"), default="2017",
                       help="metadata CSV: the original 2017 one or the revised 2020 one")
    synth.add_argument("--workers", type=int, default=1, help="processes rendering PNGs")
    synth.set_defaults(run=run_synth)


def _check_fractions(args: argparse.Namespace) -> None:
    problems = []
    for name in ("val_fraction", "test_fraction"):
        value = getattr(args, name)
        if not 0 <= value < 1:
            problems.append(f"--{name.replace('_', '-')}: must be in [0, 1), got {value}")
    if args.val_fraction + args.test_fraction >= 1:
        problems.append("--val-fraction + --test-fraction must be below 1")
    if problems:
        raise ConfigError(problems)


def parse_split_files(values: list[str] | None) -> SplitFilesConfig | None:
    """``--split-file ROLE=PATH`` arguments as ``data.split_files``, or None without any.

    The combination of roles is checked by :class:`SplitFilesConfig` (the recipe's rules).

    Args:
        values: the ``ROLE=PATH`` strings in command-line order.

    Returns:
        The validated split files (paths as given), or None when ``values`` is empty.

    Raises:
        ConfigError: a value without ``=``, an unknown or repeated role, a combination the
            schema refuses, or a path that is not a file; every problem is listed.
    """
    if not values:
        return None
    problems: list[str] = []
    named: dict[str, str] = {}
    for value in values:
        role, sep, path = value.partition("=")
        role = role.strip()
        if not sep or not role or not path:
            problems.append(f"--split-file {value!r}: expected ROLE=PATH with ROLE one of "
                            f"{', '.join(SPLIT_ROLES)}, e.g. --split-file test=lists/test.txt")
        elif role in named:
            problems.append(f"--split-file {role}=: given twice ({named[role]} and {path}); "
                            "give each role once")
        else:
            named[role] = str(Path(path).expanduser())
    if problems:
        raise ConfigError(problems)
    try:
        split_files = SplitFilesConfig.model_validate(named)
    except ValidationError as exc:
        for error in exc.errors():
            if error["type"] == "extra_forbidden":
                role = str(error["loc"][-1])
                close = difflib.get_close_matches(role, SPLIT_ROLES, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.append(f"--split-file {role}={named[role]}: unknown role {role!r}; "
                                f"{hint}roles: {', '.join(SPLIT_ROLES)}")
            else:
                where = ".".join(str(x) for x in error["loc"])
                message = error["msg"].removeprefix("Value error, ")
                problems.append(f"--split-file{' ' + where if where else ''}: {message} "
                                f"(got roles: {', '.join(named)})")
        raise ConfigError(problems) from None
    problems = [f"--split-file {role}={path}: not a file; give an existing image list "
                "(relative paths are from the working directory)"
                for role, path in named.items() if not Path(path).is_file()]
    if problems:
        raise ConfigError(problems)
    return split_files


def _print_stats(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    patients = "" if doc["patients"] is None else f"{doc['patients']:,} patients · "
    source = doc.get("metadata") or " ".join([doc["format"], *(
        [Path(doc["source"]).name] if doc.get("source") else [])])
    console.print(
        f"[bold]{escape(doc['root'])}[/] · {escape(source)} · "
        f"{doc['images']:,} images · {patients}splits from {escape(doc['split_source'])}"
    )
    table = Table(title_justify="left")
    table.add_column("finding" if doc["format"] == "chestxray14" else "class")
    table.add_column("all", justify="right")
    for name in doc["splits"]:
        table.add_column(f"{name} ({doc['splits'][name]:,})", justify="right")
    for label, count in doc["labels"].items():
        table.add_row(escape(label), f"{count:,}", *(
            f"{doc['split_labels'].get(s, {}).get(label, 0):,}" for s in doc["splits"]))
    console.print(table)
    if doc["split_patients"] is not None:
        overlap = doc["patient_overlap"]
        style = "green" if overlap == 0 else "bold red"
        console.print("patients per split: " + ", ".join(
            f"{k} {v:,}" for k, v in doc["split_patients"].items()
        ) + f" · [{style}]patient overlap between splits: {overlap}[/]")
    if doc.get("excluded"):
        console.print(f"in no list file (excluded): {doc['excluded']:,}")
    for problem in doc.get("problems", []):
        console.print(f"[bold red]problem:[/] {escape(problem)}")
    missing = doc["missing_images"]
    if missing:
        console.print(f"[yellow]missing images: {missing:,}[/] of {doc['images']:,} "
                      f"(first: {escape(', '.join(doc['first_missing']))}); "
                      f"{escape(doc['searched'])}")
    else:
        console.print("missing images: 0")
    if doc["bad_images"] is None:
        console.print("bad images: not checked (--check-images decodes every image)")
    elif doc["bad_images"]:
        console.print(f"[yellow]bad images: {doc['bad_images']:,}[/]")
        for bad in doc["first_bad"]:
            console.print(f"  {escape(bad['reason'])}")
    else:
        console.print(f"bad images: 0 (all {doc['images_found']:,} found decode)")


def run_stats(args: argparse.Namespace) -> int:
    """``data stats``."""
    from dist_ft.data.stats import dataset_stats

    _check_fractions(args)
    if args.workers < 1:
        raise ConfigError(["--workers must be >= 1"])
    split_files = parse_split_files(args.split_file)
    doc = dataset_stats(args.root, args.format, args.data, args.val_fraction,
                        args.test_fraction, args.split_seed, split_files,
                        check_images=args.check_images, workers=args.workers)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_stats(doc)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    """``data prepare``."""
    from dist_ft.data.cache import prepare_cache

    _check_fractions(args)
    if args.size < 16 or args.shard_size < 1 or args.workers < 1:
        raise ConfigError(["--size must be >= 16, --shard-size and --workers >= 1"])
    split_files = parse_split_files(args.split_file)
    manifest = prepare_cache(
        args.root, args.out, size=args.size, shard_size=args.shard_size, workers=args.workers,
        on_bad_image=args.on_bad_image, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, split_seed=args.split_seed,
        progress=True, rebuild=args.rebuild,  # on stderr: a bar, or lines in a log
        split_files=split_files, fmt=args.format, data=args.data,
    )
    summary = {k: manifest[k] for k in ("num_images", "num_valid", "size", "splits", "bytes")}
    summary["skipped"] = len(manifest["skipped"])
    summary["not_found"] = manifest.get("missing_images", {}).get("count", 0)
    summary["shards"] = len(manifest["shards"])
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"cache {args.out}: {summary['num_valid']:,} images at {args.size}px in "
              f"{summary['shards']} shards ({summary['bytes'] / 2**20:.1f} MiB); splits "
              + ", ".join(f"{k} {v:,}" for k, v in summary["splits"].items())
              + (f"; skipped {summary['skipped']} (see manifest.json)" if summary["skipped"]
                 else "")
              + (f"; {summary['not_found']:,} listed images not found, left out (see "
                 "missing_images.txt)" if summary["not_found"] else ""))
    return 0


def run_synth(args: argparse.Namespace) -> int:
    """``data synth``."""
    from dist_ft.data.synth import write_synthetic

    if args.images < 1 or args.size < 16 or args.workers < 1:
        raise ConfigError(["--images and --workers must be >= 1, --size >= 16"])
    rows = write_synthetic(args.out, images=args.images, size=args.size, seed=args.seed,
                           dialect=args.dialect, workers=args.workers,
                           progress=True)
    patients = len({r.patient for r in rows})
    print(f"wrote {len(rows)} images of {patients} patients ({args.size}px, "
          f"{args.dialect} metadata) to {args.out}")
    return 0
