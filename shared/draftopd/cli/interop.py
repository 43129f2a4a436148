"""``draftopd export`` and ``draftopd import``: drafters to and from the layouts vLLM and SGLang
load (``draftopd.interop``, docs/interop.md)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from draftopd.cli.args import Subparsers, add_config_flags, config_from_args, positive_int
from draftopd.cli.jobs import add_registry_args, registry_session
from draftopd.training.configs import RunConfig


def add_export(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write an EAGLE-3 drafter in the layout vLLM (speculators) or SGLang loads",
        description="DRAFTER is a checkpoint directory, registry://NAME/VERSION (fetched from "
        "--registry-url) or random:SEED[:VOCAB]. docs/interop.md.",
    )
    p.add_argument("drafter", metavar="DRAFTER", help="the drafter to export")
    p.add_argument("--format", required=True, choices=("speculators", "sglang"), dest="fmt")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument(
        "--verifier",
        help="the target as the server should load it (hub id or path; default: the local "
        "directory draftopd loaded it from)",
    )
    p.add_argument(
        "--speculative-tokens",
        type=positive_int,
        default=4,
        help="K in the speculators proposal method (default 4)",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    add_registry_args(p)
    add_config_flags(p, RunConfig, title="target", only=("target",))
    p.set_defaults(handler=_run_export_command)


def add_import(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "import",
        help="bring an EAGLE-3 drafter in the speculators or SGLang layout into the registry",
        description="Reads DIR (either layout, detected), checks it against the target, and "
        "uploads it as the next version of --drafter (created if missing), or writes a draftopd "
        "checkpoint with --out instead. docs/interop.md.",
    )
    p.add_argument("directory", metavar="DIR", help="an exported drafter directory")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--drafter", help="registry drafter name to add a version to")
    where.add_argument("--out", help="write a draftopd checkpoint directory instead")
    add_registry_args(p)
    add_config_flags(p, RunConfig, title="target", only=("target",))
    p.set_defaults(handler=_run_import_command)


def _run_export_command(args: argparse.Namespace) -> int:
    from draftopd.bench import load_drafter_ref
    from draftopd.interop import export_drafter
    from draftopd.models.target import load_target
    from draftopd.wire.formats import parse_registry_ref

    where = config_from_args(args, RunConfig, out_dir=".")
    target = load_target(where.target)
    ref = args.drafter
    with tempfile.TemporaryDirectory(prefix="draftopd-export-") as cache:
        if parse_registry_ref(ref) is not None:
            from draftopd.wire.registry_client import resolve_drafter_ref

            with registry_session(args) as client:
                ref = str(resolve_drafter_ref(ref, client, cache))
        drafter = load_drafter_ref(ref, target, architecture="eagle3")
    verifier = args.verifier or str(getattr(target.config, "_name_or_path", "") or where.target)
    out = export_drafter(
        drafter,
        args.out,
        fmt=args.fmt,
        verifier=verifier,
        verifier_config=target.config.to_dict(),
        num_speculative_tokens=args.speculative_tokens,
        dtype=args.dtype,
    )
    sys.stdout.write(json.dumps({"out": str(out), "format": args.fmt, "verifier": verifier}) + "\n")
    return 0


def _run_import_command(args: argparse.Namespace) -> int:
    from draftopd.interop import detect_format, import_drafter
    from draftopd.models.checkpoint import save_drafter
    from draftopd.models.target import load_target

    where = config_from_args(args, RunConfig, out_dir=".")
    target = load_target(where.target)
    fmt = detect_format(args.directory)
    drafter = import_drafter(args.directory, target)
    provenance = {"kind": "import", "format": fmt, "source": str(Path(args.directory).resolve())}
    if args.out:
        save_drafter(drafter.float(), args.out, provenance=provenance)
        sys.stdout.write(json.dumps({"out": args.out, "format": fmt}) + "\n")
        return 0
    with tempfile.TemporaryDirectory(prefix="draftopd-import-") as tmp:
        checkpoint = save_drafter(drafter.float(), Path(tmp) / "checkpoint", provenance=provenance)
        with registry_session(args) as client:
            names = {d["name"] for d in client.list_drafters()}
            if args.drafter not in names:
                client.create_drafter(
                    args.drafter, target_model=where.target, architecture="eagle3",
                    description=f"imported from {fmt}",
                )  # fmt: skip
            version = client.upload_version(args.drafter, checkpoint)
    sys.stdout.write(json.dumps({"drafter": args.drafter, **version, "format": fmt}) + "\n")
    return 0


__all__ = ["add_export", "add_import"]
