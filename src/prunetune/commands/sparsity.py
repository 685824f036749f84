"""``prunetune sparsity MODEL``: per-block, per-module and overall sparsity (table or JSON).

For a folder written by ``prunetune prune`` with a non-uniform ``--sparsity_profile`` (OWL or a
profile file), the per-block ratios the profile asked for are printed beside the measured ones
(and added to the JSON as ``sparsity_profile``).
"""

from __future__ import annotations

from pathlib import Path

from prunetune.commands.common import CommandParser, add_help_pages, print_json
from prunetune.errors import UsageError
from prunetune.loading import LoadOptions, load_model
from prunetune.masks import measure_sparsity
from prunetune.outputs import check_output_file, read_manifest, write_json


def profile_of(model: str) -> dict | None:
    """The non-uniform sparsity profile recorded in a local folder's manifest, if any."""
    if not Path(model).expanduser().is_dir():
        return None
    profile = (read_manifest(model) or {}).get("sparsity_profile")
    return profile if isinstance(profile, dict) and profile.get("block_ratios") else None


def profile_table(profile: dict, measured: dict[int, float]) -> str:
    """Per block: the ratio the profile asked for and the measured sparsity."""
    kind = profile.get("kind")
    source = f" from {profile['source']}" if profile.get("source") else ""
    owl = profile.get("owl") or {}
    settings = f" (m {owl.get('m')}, lambda {owl.get('lambda')})" if kind == "owl" else ""
    lines = [f"sparsity profile: {kind}{source}{settings}, target {profile.get('target')}",
             f"{'block':<8} {'profile':>9} {'measured':>9}" + (f" {'outliers':>9}" if owl else "")]
    outliers = owl.get("outlier_ratios") or {}
    for block, ratio in profile["block_ratios"].items():
        row = f"{block:<8} {ratio:>9.4f} {measured.get(int(block), float('nan')):>9.4f}"
        if owl:
            row += f" {outliers.get(block, float('nan')):>9.5f}"
        lines.append(row)
    return "\n".join(lines)


def build_parser() -> CommandParser:
    parser = CommandParser(prog="prunetune sparsity", description=__doc__)
    parser.add_argument("model", help="hub id, local model folder, or 'tiny'")
    parser.add_argument("--json", dest="json_path", default=None, help="write the report as JSON to this file ('-' prints it)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow code shipped with a hub model to run")
    return add_help_pages(parser, "sparsity")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    if args.json_path not in (None, "-"):
        check_output_file(args.json_path, "--json")  # before loading a model that may take minutes
    model = load_model(args.model, LoadOptions(trust_remote_code=args.trust_remote_code))
    report = measure_sparsity(model)
    profile = profile_of(args.model)
    payload = {**report.to_dict(), **({"sparsity_profile": profile} if profile else {})}
    if args.json_path == "-":
        print_json(payload)
        return 0
    print(report.table())
    if profile:
        print(profile_table(profile, report.per_block()))
    if args.json_path:
        try:
            write_json(args.json_path, payload)
        except OSError as err:
            raise UsageError(f"Could not write --json {args.json_path!r}: {err.strerror or err}. The table is printed "
                             "above; give a file path in a writable folder with free space.") from err
    return 0
