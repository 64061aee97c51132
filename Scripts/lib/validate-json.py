#!/usr/bin/env python3
"""Validate one guard --json document against its schema in Docs/schema/.

Usage: validate-json.py SCHEMA [FILE]   (SCHEMA: run, history, ... or a path; FILE: default stdin)
       validate-json.py --serve          (for test suites: one process validates many documents)
Prints every violation with its place in the document; exits 0 when valid, 1 when not,
2 when the schema or the document cannot be read. Needs python3-jsonschema (Draft 2020-12).

--serve reads lines "SCHEMA<TAB>FILE" on stdin and answers each with one line of JSON on
stdout: {"valid": true} or {"valid": false, "errors": "..."} (what the one-shot form prints).
"""
import json
import os
import sys

try:
    import jsonschema
except ImportError:
    sys.exit("validate-json: python3-jsonschema is not installed (apt-get install python3-jsonschema)")


def schema_path(name):
    return name if os.sep in name else os.path.join(os.path.dirname(__file__), "..", "..", "Docs", "schema", name + ".schema.json")


def load_validator(name):
    """The validator of a schema, or raises ValueError/OSError/SchemaError saying why not."""
    path = schema_path(name)
    with open(path) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return path, jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def violations(path, validator, document):
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return ["%s: %s: %s" % (os.path.basename(path), "/".join(map(str, e.absolute_path)) or "(the document)", e.message) for e in errors]


def serve():
    validators = {}
    for line in sys.stdin:
        name, _, file = line.rstrip("\n").partition("\t")
        try:
            if name not in validators:
                validators[name] = load_validator(name)
            path, validator = validators[name]
            with open(file) as f:
                document = json.load(f)
            errors = violations(path, validator, document)
        except (OSError, ValueError, jsonschema.SchemaError) as error:
            errors = ["%s: %s" % (name, error)]
        print(json.dumps({"valid": not errors, "errors": "\n".join(errors)}), flush=True)


def main():
    if sys.argv[1:] == ["--serve"]:
        return serve()
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[2])
    try:
        path, validator = load_validator(sys.argv[1])
    except (OSError, ValueError, jsonschema.SchemaError) as error:
        print(f"validate-json: {schema_path(sys.argv[1])}: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        document = json.load(open(sys.argv[2]) if len(sys.argv) == 3 else sys.stdin)
    except ValueError as error:
        print(f"validate-json: not one JSON document: {error}", file=sys.stderr)
        sys.exit(2)
    errors = violations(path, validator, document)
    for error in errors:
        print(error, file=sys.stderr)
    sys.exit(1 if errors else 0)


main()
