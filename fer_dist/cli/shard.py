"""`fer-dist shard` (data set -> shards) and `fer-dist inspect` (shard folder -> tables, checks, a sheet)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fer_dist import outputs
from fer_dist.classes import CLASSES, UNLABELLED_NAME
from fer_dist.cli.options import Progress, Seed, ShardDir, Workers
from fer_dist.errors import FerDistError

if TYPE_CHECKING:  # the data modules load torch (through webdataset): imported where a command runs
    from fer_dist.data.manifest import Manifest

SHOW_SKIPPED = 20  # skipped files listed by name; the manifest keeps them all
SHOW_PROBLEMS = 20  # problems `inspect` lists without --problems

Dataset = Annotated[str, typer.Option(
    "--dataset", "-d", show_default=False,
    help="Source: fer2013, ckplus, rafd, jaffe, imagefolder, unlabelled or synthetic.")]
Src = Annotated[list[Path] | None, typer.Option(
    show_default=False, help="Data set root (file or folder); repeat if the source takes several.")]
Out = Annotated[Path, typer.Option("--out", "-o", show_default=False,
                                   help="Output folder (written under a temporary name, then renamed).")]
Align = Annotated[str | None, typer.Option(help="Face alignment: haar or none; default: the source's own.")]
Size = Annotated[int, typer.Option(help="Side of the stored square faces, in pixels.")]
Channels = Annotated[int, typer.Option(help="1: convert to grey; 3: RGB.")]
Split = Annotated[str, typer.Option(help="train,val,test subject fractions (sets without official splits).")]
Folds = Annotated[int | None, typer.Option(help="Also give each subject a fold id 0..K-1 (cross-val).")]
PerShard = Annotated[int | None, typer.Option(
    help="Samples per shard; default: 16 shards per split, at most 1000 samples each.")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an earlier shard folder (one holding only what `shard` wrote).")]
PeakFrames = Annotated[int, typer.Option(help="ckplus, synthetic: label the last N frames of a sequence.")]
Angles = Annotated[str, typer.Option(help="rafd: camera angles to keep, e.g. 90,45.")]
ClassMap = Annotated[str | None, typer.Option(help="imagefolder: folder=class pairs, e.g. joy=happy,x=skip.")]
Subjects = Annotated[int, typer.Option(help="synthetic: number of subjects.")]
Frames = Annotated[int, typer.Option(help="synthetic: frames per sequence.")]
Sheet = Annotated[Path | None, typer.Option(
    show_default=False, help="Also write a contact sheet (.png or .jpg): random faces, a row per class.")]
PerClass = Annotated[int, typer.Option(help="Faces per row of the contact sheet.")]
SheetSeed = Annotated[int, typer.Option("--seed", help="Seed of the contact sheet's random faces.")]
SheetOverwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an earlier contact sheet of `inspect` (never another file).")]
Verify = Annotated[bool, typer.Option(help="Check every shard against the manifest.")]
ListProblems = Annotated[bool, typer.Option(
    "--problems", help=f"List every problem verification finds (default: the first {SHOW_PROBLEMS}).")]


def shard(
    dataset: Dataset,
    out: Out,
    src: Src = None,
    align: Align = None,
    size: Size = 48,
    channels: Channels = 1,
    split: Split = "0.8,0.1,0.1",
    folds: Folds = None,
    seed: Seed = 0,
    samples_per_shard: PerShard = None,
    workers: Workers = None,
    overwrite: Overwrite = False,
    peak_frames: PeakFrames = 1,
    angles: Angles = "90",
    class_map: ClassMap = None,
    subjects: Subjects = 60,
    frames: Frames = 10,
    progress: Progress = True,
) -> None:
    """Shard a data set: align faces on every core, split by subject, write WebDataset tars + manifest."""
    from rich.console import Console

    from fer_dist.data.sources import SourceOptions, source_spec

    source_spec(dataset)  # a mistyped --dataset is answered before torch loads (through pack)
    from fer_dist.data.pack import pack  # cv2 and the sources load only for commands that use them
    from fer_dist.data.splits import parse_split

    options = SourceOptions(peak_frames=peak_frames, angles=_parse_angles(angles), class_map=class_map,
                            subjects=subjects, frames=frames, image_size=size, seed=seed)
    summary = pack(dataset, src or [], out, align=align, size=size, channels=channels,
                   split=parse_split(split), folds=folds, seed=seed, samples_per_shard=samples_per_shard,
                   workers=workers, overwrite=overwrite, options=options, progress=progress)
    console = Console(highlight=False)
    print_manifest(console, summary.manifest)
    for warning in summary.warnings:
        typer.echo(f"warning: {warning}", err=True)
    shards = sum(len(s.shards) for s in summary.manifest.splits.values())
    console.print(f"wrote {summary.manifest.num_ids} faces in {shards} shards to {summary.out} "
                  f"in {summary.seconds:.1f} s")


def inspect(
    directory: ShardDir,
    sheet: Sheet = None,
    per_class: PerClass = 8,
    seed: SheetSeed = 0,
    verify: Verify = True,
    problems: ListProblems = False,
    overwrite: SheetOverwrite = False,
) -> None:
    """Show a shard folder's manifest, check every shard's checksum and samples, and draw a contact sheet."""
    from rich.console import Console

    from fer_dist.data.manifest import read_manifest

    if sheet is not None:  # before the verification pass, which reads every shard
        from fer_dist.data.sheet import check_sheet_path

        check_sheet_path(sheet, per_class)
        outputs.check_file(sheet, "inspect", overwrite=overwrite, ours=outputs.is_tagged_image,
                           flag="--sheet")
    console = Console(highlight=False)
    manifest = read_manifest(directory)
    print_manifest(console, manifest)
    if verify:
        from fer_dist.data.shards import verify_shards  # webdataset, torch: after the cheap checks

        report = verify_shards(directory)
        if not report.ok:
            shown = report.problems if problems else report.problems[:SHOW_PROBLEMS]
            for line in shown:
                console.print(f"problem: {line}", soft_wrap=True, markup=False)
            n = len(report.problems)
            rest = f", {n - len(shown)} not shown (--problems lists them all)" if n > len(shown) else ""
            more = f" (and {n - 1} more problem(s): {len(shown) - 1} listed above{rest})" if n > 1 else ""
            raise FerDistError(f"{report.problems[0]}{more}")
        console.print(f"verified {report.shards} shards, {report.samples} samples: all match the manifest")
    if sheet is not None:
        from fer_dist.data.sheet import contact_sheet

        with outputs.written_file(sheet, "inspect", overwrite=overwrite, ours=outputs.is_tagged_image,
                                  flag="--sheet") as tmp:
            contact_sheet(directory, tmp, per_class=per_class, seed=seed, suffix=sheet.suffix)
        console.print(f"wrote contact sheet {sheet}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("shard", epilog=(
        "Example: fer-dist shard --dataset fer2013 --src fer2013.csv --out shards/fer2013"))(shard)
    app.command("inspect", epilog=(
        "Example: fer-dist inspect shards/fer2013 --sheet sheet.png"))(inspect)


def _parse_angles(spec: str) -> tuple[int, ...]:
    """`--angles 90,45` as a tuple of ints."""
    try:
        return tuple(int(a) for a in spec.split(",") if a.strip())
    except ValueError:
        raise FerDistError(f"--angles: {spec!r} is not a comma-separated list of whole degrees") from None


def print_manifest(console: Any, m: Manifest) -> None:
    """A shard folder at a glance: samples per split and class, faces found, files skipped and why."""
    from rich.table import Table

    names = [c for c in (*CLASSES, UNLABELLED_NAME) if any(c in s.class_counts for s in m.splits.values())]
    table = Table(title=f"{m.dataset}: {m.num_ids} faces, {m.image.size}x{m.image.size}x{m.image.channels}"
                  + (f", {m.folds} folds" if m.folds else ""))
    # A column per split (few), a row per class (many): fits a terminal where the transpose would not.
    table.add_column("")
    for name in [*m.splits, "all"]:
        table.add_column(name, justify="right")
    splits = list(m.splits.values())
    rows = [("shards", [len(s.shards) for s in splits]), ("samples", [s.count for s in splits]),
            ("labelled", [s.labelled for s in splits])]
    rows += [(c, [s.class_counts.get(c, 0) for s in splits]) for c in names]
    for row, values in rows:
        table.add_row(row, *map(str, values), str(sum(values)), end_section=row == "labelled")
    console.print(table)
    faces = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in m.faces.items())
    console.print(f"faces: {faces}; source {m.source.get('fingerprint', '?')[:19]}... "
                  f"({m.source.get('files', 0)} files); {m.created_by}")
    if m.skipped:
        skipped = Table(title=f"{len(m.skipped)} files skipped", show_header=True)
        skipped.add_column("path")
        skipped.add_column("reason")
        for entry in m.skipped[:SHOW_SKIPPED]:
            skipped.add_row(str(entry.get("path")), str(entry.get("reason")))
        if len(m.skipped) > SHOW_SKIPPED:
            skipped.add_row(f"... and {len(m.skipped) - SHOW_SKIPPED} more", "listed in manifest.json")
        console.print(skipped)
