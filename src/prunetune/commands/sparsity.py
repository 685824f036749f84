"""``prunetune sparsity MODEL``: per-block, per-module and overall sparsity (table or JSON)."""

from __future__ import annotations

from prunetune.commands.common import CommandParser


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="prunetune sparsity", description=__doc__)
    parser.add_argument("model", help="hub id, local model folder, or 'tiny'")
    parser.add_argument("--json", dest="json_path", default=None, help="write the report as JSON to this file ('-' prints it)")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)

    from prunetune.commands.common import print_json
    from prunetune.outputs import check_output_file
    from prunetune.errors import UsageError
    from prunetune.loading import LoadOptions, load_model
    from prunetune.masks import measure_sparsity
    from prunetune.outputs import write_json

    if args.json_path not in (None, "-"):
        check_output_file(args.json_path, "--json")  # before loading a model that may take minutes
    model = load_model(args.model, LoadOptions(trust_remote_code=args.trust_remote_code))
    report = measure_sparsity(model)
    if args.json_path == "-":
        print_json(report.to_dict())
        return 0
    print(report.table())
    if args.json_path:
        try:
            write_json(args.json_path, report.to_dict())
        except OSError as err:
            raise UsageError(f"Could not write --json {args.json_path!r}: {err.strerror or err}. The table is printed "
                             "above; give a file path in a writable folder with free space.") from err
    return 0
