#!/usr/bin/env python3
"""Validate one guard --json document against its schema in Docs/schema/.

Usage: validate-json.py SCHEMA [FILE]   (SCHEMA: run, history, ... or a path; FILE: default stdin)
Prints every violation with its place in the document; exits 0 when valid, 1 when not,
2 when the schema or the document cannot be read. Needs python3-jsonschema (Draft 2020-12).
"""
import json
import os
import sys

try:
    import jsonschema
except ImportError:
    sys.exit("validate-json: python3-jsonschema is not installed (apt-get install python3-jsonschema)")


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[2])
    name = sys.argv[1]
    path = name if os.sep in name else os.path.join(os.path.dirname(__file__), "..", "..", "Docs", "schema", name + ".schema.json")
    try:
        with open(path) as f:
            schema = json.load(f)
        jsonschema.Draft202012Validator.check_schema(schema)
    except (OSError, ValueError, jsonschema.SchemaError) as error:
        print(f"validate-json: {path}: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        document = json.load(open(sys.argv[2]) if len(sys.argv) == 3 else sys.stdin)
    except ValueError as error:
        print(f"validate-json: not one JSON document: {error}", file=sys.stderr)
        sys.exit(2)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    for error in errors:
        place = "/".join(map(str, error.absolute_path)) or "(the document)"
        print(f"{os.path.basename(path)}: {place}: {error.message}", file=sys.stderr)
    sys.exit(1 if errors else 0)


main()
